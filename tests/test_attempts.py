"""--attempts: the pipeline starts from attempts made elsewhere, shaped like the release's
InT-hard-set-with-incorrect-attempts (problem, answer, reference_solution, incorrect_attempt; several rows per
problem). Nothing is sampled: the fast tier counts the requests at the in-memory backend, the slow tier at a real
HTTP server (the scripted one)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from intgen.cli import app
from intgen.config import EXAMPLE_PROBLEMS, RunConfig
from intgen.dataset.export import export_file
from intgen.errors import UserError
from intgen.io import load_problems, read_problems
from intgen.pipeline import build_dataset

from conftest import TEST_SEED
from memory_backend import MemoryBackend
from scripted import Script, ScriptedServer, answers_of, backend_args, wrong_answer

runner = CliRunner()
PER_PROBLEM = (2, 1, 3)  # attempts per problem, the release's "several rows per problem"


def release_rows(correct_column: bool = False) -> list[dict]:
    """Three problems of the bundled examples, each with attempts wrong at a known step (the scripted server's
    shape, so its proposer finds the step), and one right attempt, which grading must find right."""
    problems = load_problems(EXAMPLE_PROBLEMS).head(len(PER_PROBLEM))
    rows = []
    for problem, count in zip(problems.iter_rows(named=True), PER_PROBLEM):
        for k in range(count):
            text = Script.attempt(wrong_answer(problem["answer"], k), 7919 * k + len(rows))
            rows.append({"problem": problem["problem"], "answer": problem["answer"],
                         "reference_solution": problem["solution"], "incorrect_attempt": text})
    rows[-1]["incorrect_attempt"] = f"Adding up carefully.\n\nSo the answer is $\\boxed{{{rows[-1]['answer']}}}$."
    if correct_column:
        for row in rows:
            row["correct"] = False  # the file's own verdict: taken as incorrect, not graded
    return rows


def write_parquet(rows: list[dict], path: Path) -> Path:
    pl.DataFrame(rows).write_parquet(path)
    return path


def config(attempts: Path, **more) -> RunConfig:
    return RunConfig(attempts=str(attempts), proposals=2, continuations=4, batch_size=2, grade_workers=1,
                     seed=TEST_SEED, **more)


def test_the_release_columns_load_with_every_attempt_in_file_order(tmp_path: Path) -> None:
    rows = release_rows()
    loaded = read_problems(write_parquet(rows, tmp_path / "release.parquet"), attempts=True).frame
    assert loaded.height == len(PER_PROBLEM)
    given = loaded["given_attempts"].to_list()
    assert [len(g) for g in given] == list(PER_PROBLEM)
    assert [a["text"] for g in given for a in g] == [r["incorrect_attempt"] for r in rows]
    firsts = {r["problem"]: r for r in reversed(rows)}  # each problem's first row
    assert loaded["solution"].to_list() == [firsts[p]["reference_solution"] for p in loaded["problem"]]
    assert all(a["correct"] is None for g in given for a in g)


@pytest.mark.parametrize(("change", "message"), [
    ({"incorrect_attempt": ""}, "release.jsonl:2: empty or missing attempt (column 'incorrect_attempt')"),
    ({"correct": "no"}, "release.jsonl:2: column 'correct' holds 'no', not true or false"),
])
def test_a_bad_attempt_row_is_one_line_naming_the_file_and_row(tmp_path: Path, change: dict, message: str) -> None:
    rows = release_rows()
    rows[0]["correct"] = None
    rows[1] |= change
    path = tmp_path / "release.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError) as error:
        read_problems(path, attempts=True)
    assert str(error.value).startswith(message)


def test_a_repeated_row_is_one_attempt_and_a_disagreeing_answer_is_an_error(tmp_path: Path) -> None:
    rows = release_rows()
    loaded = read_problems(write_parquet([*rows, rows[0]], tmp_path / "twice.parquet"), attempts=True)
    assert [len(g) for g in loaded.frame["given_attempts"]] == list(PER_PROBLEM) and loaded.duplicates == 1
    other = rows[1] | {"answer": "12345"}
    path = tmp_path / "disagree.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], other]))
    with pytest.raises(UserError) as error:
        read_problems(path, attempts=True)
    assert str(error.value).startswith("disagree.jsonl:2: this problem's answer differs from its row at "
                                       "disagree.jsonl:1 ('12345' here,")


def test_a_csv_verdict_column_reads_as_true_or_false(tmp_path: Path) -> None:
    rows = [r | {"correct": v} for r, v in zip(release_rows(), ["false", "TRUE", "0", "1", "", "false"])]
    path = tmp_path / "release.csv"
    pl.DataFrame(rows).write_csv(path)
    given = read_problems(path, attempts=True).frame["given_attempts"].to_list()
    assert [a["correct"] for g in given for a in g] == [False, True, False, True, None, False]


def test_a_file_without_an_attempt_column_names_the_columns_tried(tmp_path: Path) -> None:
    path = write_parquet([{"problem": "1+1?", "answer": "2"}], tmp_path / "p.parquet")
    with pytest.raises(UserError, match="no attempt column \\(tried incorrect_attempt, attempt, response, completion"):
        read_problems(path, attempts=True)


def test_attempts_and_problems_together_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="attempts: the attempts file holds the problems too"):
        RunConfig(attempts=str(tmp_path / "a.parquet"), problems=str(EXAMPLE_PROBLEMS))


def test_given_attempts_send_no_sampling_request_and_yield_proposals(tmp_path: Path) -> None:
    rows = release_rows()
    path = write_parquet(rows, tmp_path / "release.parquet")
    script = Script(answers_of(EXAMPLE_PROBLEMS), seed=TEST_SEED)
    backend = MemoryBackend(script)
    summary = build_dataset(config(path), tmp_path / "run", progress=False, backends={"policy": backend})
    assert script.kinds["solve"] == 0 and script.kinds["critique"] > 0 and backend.sent
    assert not summary["failed"] and summary["kept"] > 0
    samples = pl.read_parquet(export_file(tmp_path / "run" / "dataset", "samples"))
    assert sorted(samples["text"].to_list()) == sorted(r["incorrect_attempt"] for r in rows)
    assert set(samples["finish_reason"]) == {"given"}
    graded = dict(zip(samples["text"], samples["correct"]))
    assert graded[rows[-1]["incorrect_attempt"]] is True  # graded, not taken on trust
    assert sum(v is False for v in graded.values()) == len(rows) - 1
    proposals = pl.read_parquet(tmp_path / "run" / "proposals")
    assert proposals["attempt_id"].n_unique() == len(rows) - 1  # every wrong attempt, none of the right one
    card = (tmp_path / "run" / "dataset" / "README.md").read_text()
    assert f"made elsewhere: {len(rows)} attempts at {len(PER_PROBLEM)} problems, from `{path}`" in card
    again = MemoryBackend(Script(answers_of(EXAMPLE_PROBLEMS), seed=TEST_SEED))
    build_dataset(config(path), tmp_path / "run", progress=False, backends={"policy": again})
    assert again.sent == []


def test_a_false_correct_column_is_taken_as_incorrect_without_grading(tmp_path: Path) -> None:
    rows = release_rows(correct_column=True)
    path = write_parquet(rows, tmp_path / "release.parquet")
    build_dataset(config(path), tmp_path / "run", progress=False,
                  backends={"policy": MemoryBackend(Script(answers_of(EXAMPLE_PROBLEMS), seed=TEST_SEED))})
    graded = pl.read_parquet(tmp_path / "run" / "graded")
    assert graded["correct"].to_list() == [False] * len(rows)
    assert set(graded["grade_reason"]) == {"given_incorrect"}
    assert pl.read_parquet(tmp_path / "run" / "proposals")["attempt_id"].n_unique() == len(rows)


@pytest.mark.slow
def test_the_cli_on_a_release_shaped_file_sends_no_sampling_request_to_a_real_server(tmp_path: Path) -> None:
    rows = release_rows()
    path = write_parquet(rows, tmp_path / "InT-hard-set-with-incorrect-attempts.parquet")
    server = ScriptedServer(answers_of(EXAMPLE_PROBLEMS), seed=TEST_SEED)
    try:
        args = ["build-dataset", "--attempts", str(path), "--run-dir", str(tmp_path / "run"), *backend_args(server.url),
                "--proposals", "2", "--continuations", "4", "--no-progress", "--samples", "8"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "warning: --samples not used: with --attempts no attempt is sampled" in result.output
        assert server.kinds["solve"] == 0 and server.kinds["critique"] > 0 and server.kinds["continuation"] > 0
        interventions = pl.read_parquet(export_file(tmp_path / "run" / "dataset", "interventions"))
        assert interventions.height > 0 and interventions["kept"].any()
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        assert manifest["stages"]["sample"]["last_run"]["requests_sent"] == 0
        assert manifest["stages"]["sample"]["attempts_given"] == str(path)
    finally:
        server.stop()
