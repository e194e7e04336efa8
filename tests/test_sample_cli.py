"""`intgen sample` end to end: through llama.cpp's server, through a faulty proxy, and on the local engine."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from intgen.cli import app

from conftest import TEST_SEED
from servers import Proxy

pytestmark = pytest.mark.slow  # the local engine and the llama.cpp server

runner = CliRunner()
SECRET = "sk-test-0123456789-never-written"


@pytest.fixture()
def problems(tmp_path: Path) -> Path:
    path = tmp_path / "problems.jsonl"
    rows = [
        {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
         "answer": "Tom has 3+4=7.\n#### 7"},
        {"question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "answer": "6*2=12\n#### 12"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sample_args(problems: Path, run_dir: Path, *backend: str) -> list[str]:
    return ["sample", "--problems", str(problems), "--run-dir", str(run_dir), "--samples", "3",
            "--max-tokens", "48", "--seed", str(TEST_SEED), *backend]


def openai_args(url: str) -> list[str]:
    return ["--backend", "openai", "--model", "smollm2", "--base-url", url, "--structured-output", "json_object"]


def check_attempts(run_dir: Path, problems: int = 2, samples: int = 3) -> pl.DataFrame:
    attempts = pl.read_parquet(run_dir / "samples")
    assert attempts.height == problems * samples
    assert attempts["error"].null_count() == attempts.height
    assert attempts["text"].null_count() == 0  # a text for every attempt (what it says is the model's affair)
    assert attempts.group_by("problem_id").len()["len"].to_list() == [samples] * problems
    assert sorted(attempts["attempt_id"].to_list()) == sorted(
        f"{pid}/a{i}" for pid in attempts["problem_id"].unique() for i in range(samples)
    )
    return attempts


def test_sample_through_llama_server_and_rerun_sends_nothing(
    proxy: Proxy, problems: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    run_dir = tmp_path / "run"
    result = runner.invoke(app, sample_args(problems, run_dir, *openai_args(proxy.url)))
    assert result.exit_code == 0, result.output
    check_attempts(run_dir)
    sent = len(proxy.forwarded)
    assert sent >= 2
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stage = manifest["stages"]["sample"]
    assert stage["rows"] == 6 and stage["calls"]["requests_sent"] == sent
    assert stage["calls"]["completion_tokens"] > 0 and stage["failed_rows"] == {}

    result = runner.invoke(app, sample_args(problems, run_dir, *openai_args(proxy.url)))
    assert result.exit_code == 0, result.output
    assert len(proxy.forwarded) == sent  # counted at the server: nothing was sent again
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["sample"]["last_run"]["requests_sent"] == 0

    # the API key never reaches the run directory
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_sample_through_a_proxy_that_answers_429_and_503(llama_server, problems: Path, tmp_path: Path) -> None:
    proxy = Proxy(llama_server.url, fault_every=2)  # every 2nd request: 429 (Retry-After: 1) or 503
    try:
        run_dir = tmp_path / "run"
        result = runner.invoke(app, sample_args(problems, run_dir, *openai_args(proxy.url)))
        assert result.exit_code == 0, result.output
        check_attempts(run_dir)
        assert proxy.received > len(proxy.forwarded)  # faults were served and retried
        forwarded = len(proxy.forwarded)
        result = runner.invoke(app, sample_args(problems, run_dir, *openai_args(proxy.url)))
        assert result.exit_code == 0 and len(proxy.forwarded) == forwarded
    finally:
        proxy.stop()


def test_sample_on_the_local_engine(problems: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = runner.invoke(app, sample_args(problems, run_dir, "--backend", "local"))
    assert result.exit_code == 0, result.output
    first = check_attempts(run_dir)
    result = runner.invoke(app, sample_args(problems, run_dir, "--backend", "local"))
    assert result.exit_code == 0
    stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["sample"]
    assert stage["last_run"]["requests_sent"] == 0
    assert pl.read_parquet(run_dir / "samples").equals(first)


def test_changed_settings_are_refused_unless_forced(problems: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert runner.invoke(app, sample_args(problems, run_dir, "--backend", "local")).exit_code == 0
    result = runner.invoke(app, sample_args(problems, run_dir, "--backend", "local", "--temperature", "0.9"))
    assert result.exit_code == 2
    assert "computed with other settings" in result.output and "--force" in result.output
    result = runner.invoke(app, sample_args(problems, run_dir, "--backend", "local", "--temperature", "0.9", "--force"))
    assert result.exit_code == 0, result.output
    check_attempts(run_dir)


def test_price_table_gives_cost(problems: Path, tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('["SmolLM2-135M-Instruct.Q4_1.gguf"]\ninput = 1.0\noutput = 2.0\n')
    run_dir = tmp_path / "run"
    result = runner.invoke(app, sample_args(problems, run_dir, "--backend", "local", "--prices", str(prices)))
    assert result.exit_code == 0, result.output
    calls = json.loads((run_dir / "manifest.json").read_text())["stages"]["sample"]["calls"]
    assert calls["cost_usd"] == pytest.approx((calls["prompt_tokens"] * 1.0 + calls["completion_tokens"] * 2.0) / 1e6)
