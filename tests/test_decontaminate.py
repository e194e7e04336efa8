"""Decontamination: the normalisation, real benchmark problems found under other spelling, and
`build-dataset --decontaminate` dropping them before sampling, counted in the funnel and the card."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from intgen.cli import app
from intgen.config import EXAMPLE_PROBLEMS
from intgen.decontaminate import NgramIndex, drop_contaminated, words

from conftest import TEST_SEED

runner = CliRunner()


@pytest.mark.parametrize(
    "text, expected",
    [("Find $x$ if \\left( x + 1 \\right) = 3.", ["find", "x", "if", "x", "1", "3"]),
     ("What  is\n\\frac{1}{2}\\,+\\;\\quad 1?", ["what", "is", "frac", "1", "2", "1"]),
     ("ÉCOLE  Ünïcode", ["école", "ünïcode"]),
     ("\\[ a_1 + a_2 \\]", ["a", "1", "a", "2"])],
)
def test_words_ignore_case_spacing_and_punctuation(text: str, expected: list[str]) -> None:
    assert words(text) == expected


def test_a_benchmark_problem_respelled_is_found_and_an_unrelated_one_is_not(evalsets: Path) -> None:
    rows = [json.loads(line) for line in (evalsets / "math500/test.jsonl").read_text().splitlines()[:50]]
    index = NgramIndex()
    index.add(row["problem"] for row in rows)
    original = rows[7]["problem"]
    respelled = "  " + original.upper().replace(" ", "\n  ").replace("$", "\\(", 1) + "  "
    assert index.contaminated(original) and index.contaminated(respelled)
    assert index.contaminated("Please solve: " + original[: len(original) // 2])  # a long enough quote
    assert not index.contaminated("A farmer has 17 sheep and buys 5 more on Tuesday. How many sheep does he have?")
    short = NgramIndex()
    short.add(["Compute $2+2$."])  # shorter than n words: one n-gram of its own
    assert short.contaminated("compute 2 + 2.") and not short.contaminated("Compute 2+3.")


def test_drop_contaminated_returns_the_dropped_ids() -> None:
    problems = pl.DataFrame({"problem_id": ["a", "b", "c"],
                             "problem": ["one two three four five six seven eight nine",
                                         "alpha beta gamma delta epsilon zeta eta theta",
                                         "two three four five six seven eight nine ten"]})
    index = NgramIndex()
    index.add(["zero one two three four five six seven eight nine"])
    kept, dropped = drop_contaminated(problems, index)
    assert kept["problem_id"].to_list() == ["b"] and dropped == ["a", "c"]


@pytest.mark.slow
def test_build_dataset_drops_them_before_sampling_and_says_so(tmp_path: Path) -> None:
    bundled = [json.loads(line) for line in EXAMPLE_PROBLEMS.read_text().splitlines()]
    eval_set = tmp_path / "heldout.jsonl"  # two of the first four bundled problems, re-spaced and re-cased
    eval_set.write_text("".join(json.dumps({"problem": "  " + row["problem"].lower().replace(" ", "  "),
                                            "answer": row["answer"]}) + "\n" for row in bundled[1:3]))
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["build-dataset", "--run-dir", str(run_dir), "--limit", "4", "--samples", "1",
                                 "--max-tokens", "24", "--proposals", "1", "--propose-max-tokens", "24",
                                 "--continuations", "1", "--verify-max-tokens", "16", "--decontaminate",
                                 str(eval_set), "--seed", str(TEST_SEED), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "dropped before sampling" in result.output
    assert pl.read_parquet(run_dir / "samples").height == 2  # nothing was spent on the dropped problems
    manifest = json.loads((run_dir / "manifest.json").read_text())
    checked = manifest["stages"]["problems"]["decontamination"]
    assert checked["dropped"] == 2 and checked["sets"] == [{"set": str(eval_set), "problems": 2}]
    assert len(checked["dropped_ids"]) == 2
    card = (run_dir / "dataset" / "README.md").read_text()
    assert "2 more dropped before sampling for sharing 8 consecutive words" in card and "heldout.jsonl" in card
