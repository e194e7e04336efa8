"""The exported dataset as a Hub citizen: its card, `datasets` loading, and `intgen push` against a local
server that speaks the Hub's API (the Hub itself is out of reach here)."""

from __future__ import annotations

import threading
from pathlib import Path

import datasets
import polars as pl
import pytest
from huggingface_hub import DatasetCard
from typer.testing import CliRunner

from intgen.cli import app
from intgen.dataset.export import export_file
from intgen.rewards import compute_score, math_accuracy_reward

from scripted import backend_args
from servers import HubServer

runner = CliRunner()
TOKEN = "hf_test_token_never_printed_0123456789"


@pytest.fixture(scope="module")
def exported(scripted, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("hub") / "run"
    args = ["build-dataset", "--run-dir", str(run_dir), "--limit", "3", *backend_args(scripted.url), "--samples", "2",
            "--max-tokens", "400", "--proposals", "4", "--propose-max-tokens", "300", "--continuations", "2",
            "--verify-max-tokens", "100", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(export_file(run_dir / "dataset", "sft")).height == 6  # the premise: sft has rows
    return run_dir


def test_card_parses_and_tells_the_story(exported: Path) -> None:
    card = DatasetCard.load(exported / "dataset" / "README.md")
    data = card.data.to_dict()
    # no baseline ran: `preference` is empty, so the card does not list it (its empty file is still written)
    assert [c["config_name"] for c in data["configs"]] == ["sft", "rl", "interventions", "samples", "prm"]
    assert data["license"] == "other" and "text-generation" in data["task_categories"]
    text = card.text
    for needle in ("## Funnel", "| attempts | 6 |", "## Where intgen differs from the paper's release",
                   "without an end-of-turn", "## Intervention vs. the paper's baselines", "| proposals |",
                   "rejected, by reason", "## Tokens and cost",
                   "math-verify", "solve.md", "propose_single.md", "sha256", "## Caveats", "intgen train sft",
                   'load_dataset("' + str(exported / "dataset") + '", "sft"'):
        assert needle in text, needle


def test_configs_load_with_datasets(exported: Path) -> None:
    import polars as pl

    for name in ("sft", "rl", "interventions", "samples"):
        loaded = datasets.load_dataset(str(exported / "dataset"), name, split="train")
        # the rows of this run, not a cached copy of another run's folder of the same name
        assert loaded.num_rows == pl.read_parquet(export_file(exported / "dataset", name)).height
    rl = datasets.load_dataset(str(exported / "dataset"), "rl", split="train")
    assert rl.num_rows == 3 and rl[0]["prompt"][0]["role"] == "user" and rl[0]["answer"]


def test_push_uploads_the_dataset_with_a_retry(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = HubServer(fail_first=("create",))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    try:
        result = runner.invoke(app, ["push", str(exported), "me/int-data", "--endpoint", hub.url])
    finally:
        hub.stop()
    assert result.exit_code == 0, result.output
    assert [name for name, _ in hub.calls].count("create") == 2  # the 503 was retried
    files = hub.repos["me/int-data"]["main"]
    configs = ("sft", "rl", "interventions", "samples", "preference", "prm")
    assert set(files) == {"README.md", "report.html",
                          *(f"{c}/{export_file(exported / 'dataset', c).name}" for c in configs)}
    assert files["report.html"].startswith(b"<!doctype html>") and b'id="summary"' in files["report.html"]
    assert b'load_dataset("me/int-data", "sft"' in files["README.md"]
    assert hub.authorizations and all(a == f"Bearer {TOKEN}" for a in hub.authorizations)
    assert TOKEN not in result.output
    for content in files.values():
        assert TOKEN.encode() not in content
    for path in exported.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_push_to_a_private_branch(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = HubServer()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    try:
        result = runner.invoke(app, ["push", str(exported), "me/int-data", "--private", "--revision", "dev",
                                     "--endpoint", hub.url])
    finally:
        hub.stop()
    assert result.exit_code == 0, result.output
    assert hub.private["me/int-data"] is True
    assert "README.md" in hub.repos["me/int-data"]["dev"]
    hub = HubServer()
    try:
        result = runner.invoke(app, ["push", str(exported), "me/int-data", "--no-report", "--endpoint", hub.url])
    finally:
        hub.stop()
    assert result.exit_code == 0, result.output
    assert "report.html" not in hub.repos["me/int-data"]["main"]


def test_push_without_an_export_is_a_clear_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    result = runner.invoke(app, ["push", str(run_dir), "me/x", "--endpoint", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "no config.json" in result.output


# --- rewards ----------------------------------------------------------------------------------------

def test_trl_reward_on_strings_and_conversations() -> None:
    completions = ["so \\boxed{7}", [{"role": "assistant", "content": "it is \\boxed{8}"}], "no answer here"]
    assert math_accuracy_reward(completions, answer=["7", "7", "7"], problem_id=["a", "b", "c"]) == [1.0, 0.0, None]


def test_verl_compute_score() -> None:
    assert compute_score("math", "... \\boxed{\\frac12}", "0.5") == 1.0
    assert compute_score("math", "... \\boxed{3}", "0.5") == 0.0
    assert compute_score("math", "no box", "0.5", extra_info={"split": "train"}) == 0.0


def test_rewards_are_safe_in_threads() -> None:
    results: dict[int, list[float | None]] = {}

    def work(i: int) -> None:
        results[i] = math_accuracy_reward([f"\\boxed{{{i}}}", "\\boxed{0}"], answer=[str(i), str(i)])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: [1.0, 0.0] for i in range(1, 5)}
