from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from typer.testing import CliRunner

from intgen import __version__
from intgen.cli import app

runner = CliRunner()


def test_help_and_version() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "build-dataset" in result.output and "problems" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"intgen {__version__}"


def test_problems_command_reports_and_saves(tmp_path: Path) -> None:
    source = tmp_path / "p.jsonl"
    source.write_text(
        json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n{broken\n" + json.dumps({"problem": "3?", "answer": "3"}) + "\n"
    )
    result = runner.invoke(app, ["problems", str(source)])
    assert result.exit_code == 2
    assert "p.jsonl:2: not valid JSON" in result.output
    out = tmp_path / "clean.parquet"
    result = runner.invoke(app, ["problems", str(source), "--skip-bad-rows", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "skipped p.jsonl:2" in result.output
    assert pl.read_parquet(out)["answer"].to_list() == ["2", "3"]


def test_build_dataset_says_it_is_not_built_yet() -> None:
    result = runner.invoke(app, ["build-dataset"])
    assert result.exit_code == 2
    assert "not built yet" in result.output
