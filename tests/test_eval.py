"""`intgen eval`: the pass@k estimator against exact values and brute force, maj@K by math equivalence, the report
and the comparison on hand-made tables, and end to end through the real llama.cpp server and the local engine."""

from __future__ import annotations

import itertools
import json
from math import comb
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from intgen.cli import app
from intgen.evals.metrics import compare, eval_report, ks, majority_correct, pass_at_k
from intgen.grading import are_equivalent

from conftest import TEST_SEED

runner = CliRunner()


def equivalent(answer: str, representatives: list[str]) -> list[bool | None]:
    return are_equivalent([(r, answer) for r in representatives], workers=1)


@pytest.mark.parametrize(
    "n, c, k, expected",
    [(1, 1, 1, 1.0), (1, 0, 1, 0.0), (4, 4, 4, 1.0), (4, 0, 4, 0.0), (4, 1, 4, 1.0), (10, 0, 1, 0.0),
     (10, 10, 1, 1.0), (10, 3, 1, 0.3), (10, 3, 2, 1 - comb(7, 2) / comb(10, 2)), (128, 1, 64, 0.5),
     (128, 2, 1, 2 / 128), (5, 2, 3, 1 - comb(3, 3) / comb(5, 3))],
)
def test_pass_at_k_exact_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_brute_force_enumeration() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(outcomes[i] for i in subset) for subset in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_the_ks_reported() -> None:
    assert ks(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert ks(6) == [1, 2, 4] and ks(1) == [1]


def test_majority_vote_is_by_math_equivalence_not_strings() -> None:
    # 2 correct; the wrong "1/2", "0.5" and "\frac{1}{2}" are one answer given 3 times: the majority is wrong
    assert majority_correct(2, ["1/2", "0.5", "\\frac{1}{2}"], equivalent) == 0.0
    # 2 correct against three different wrong answers: the majority is right
    assert majority_correct(2, ["1/2", "3", "7"], equivalent) == 1.0
    # a tie with one wrong answer: a fair tie-break is right half the time
    assert majority_correct(2, ["3", "3.0"], equivalent) == 0.5
    assert majority_correct(0, ["3"], equivalent) == 0.0 and majority_correct(3, [], equivalent) == 1.0


def graded(rows: list[tuple[str, bool | None, str | None, bool]]) -> pl.DataFrame:
    return pl.DataFrame({"problem_id": [r[0] for r in rows], "correct": [r[1] for r in rows],
                         "predicted": [r[2] for r in rows], "truncated": [r[3] for r in rows]},
                        schema={"problem_id": pl.String, "correct": pl.Boolean, "predicted": pl.String,
                                "truncated": pl.Boolean})


def test_report_on_a_hand_made_table() -> None:
    table = graded([
        ("a", True, "5", False), ("a", True, "5", False), ("a", False, "4", False), ("a", None, None, True),
        ("b", False, "7", False), ("b", False, "7", False), ("b", True, "9", False), ("b", False, "8", False),
    ])
    sources = pl.DataFrame({"problem_id": ["a", "b"], "source": ["x", "y"]})
    report = eval_report(table, sources, 4, equivalent)
    assert report["avg@4"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert report["pass@1"] == pytest.approx(report["avg@4"])
    assert report["pass@4"] == 1.0 and report["maj@4"] == pytest.approx(0.5)  # a: 2 vs 1; b: 1 vs "7" x2
    assert report["ungradable"] == pytest.approx(1 / 8) and report["truncated"] == pytest.approx(1 / 8)
    low, high = report["ci95"]["avg@4"]
    assert low <= report["avg@4"] <= high
    assert report["by_source"]["x"]["avg@4"] == pytest.approx(0.5) and report["by_source"]["y"]["problems"] == 1


def test_compare_is_paired_over_shared_problems() -> None:
    base = graded([("a", False, "1", False), ("a", False, "1", False), ("b", True, "2", False),
                   ("b", False, "3", False)])
    better = graded([("a", True, "5", False), ("a", False, "1", False), ("b", True, "2", False),
                     ("b", True, "2", False), ("c", True, "9", False)])
    result = compare({"base": base, "trained": better})
    assert result["problems"] == 2  # c is only in one run
    trained = result["runs"]["trained"]
    assert trained["difference"] == pytest.approx((0.5 + 1.0) / 2 - (0 + 0.5) / 2)
    assert trained["difference_ci95"][0] <= trained["difference"] <= trained["difference_ci95"][1]
    assert trained["solved_only_here"] == ["a"] and trained["solved_only_by_base"] == []


# --- end to end ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_eval_through_the_llama_server_writes_eval_json_and_resumes(llama_server, gsm8k: Path, tmp_path: Path) -> None:
    from servers import Proxy

    proxy = Proxy(llama_server.url)
    args = ["eval", "--problems", str(gsm8k), "--backend", "openai", "--model", "smollm2", "--base-url", proxy.url,
            "--samples", "4", "--max-tokens", "96", "--lenient-answers", "--run-dir", str(tmp_path / "eval"),
            "--seed", str(TEST_SEED), "--no-progress"]
    try:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        sent = len(proxy.forwarded)
        assert "K=4" in result.output and "solve.md" in result.output and "avg@4" in result.output
        report = json.loads((tmp_path / "eval" / "eval.json").read_text())
        assert {"avg@4", "pass@1", "pass@2", "pass@4", "maj@4", "ungradable", "truncated"} <= set(report)
        assert report["problems"] == 4 and 0 <= report["avg@4"] <= 1
        assert pl.read_parquet(tmp_path / "eval" / "graded").height == 16  # the graded attempts stay
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and len(proxy.forwarded) == sent  # a rerun sends nothing
        compared = runner.invoke(app, ["eval", "compare", str(tmp_path / "eval"), str(tmp_path / "eval")])
        assert compared.exit_code == 0 and "difference" in compared.output
        reported = runner.invoke(app, ["report", str(tmp_path / "eval")])
        assert reported.exit_code == 0 and (tmp_path / "eval" / "report.html").is_file(), reported.output
    finally:
        proxy.stop()


@pytest.mark.slow
def test_eval_on_the_embedded_engine_with_the_paper_protocol_named(gsm8k: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "--problems", str(gsm8k), "--samples", "2", "--max-tokens", "48",
                                 "--limit", "2", "--run-dir", str(tmp_path / "local"), "--seed", str(TEST_SEED),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "local" / "eval.json").read_text())["problems"] == 2
    from intgen.evals.metrics import PAPER_PROTOCOL

    assert PAPER_PROTOCOL == {"samples": 128, "max_tokens": 16384, "temperature": 0.7, "top_p": 0.8, "top_k": 20}


def test_benchmarks_load_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the shipped sets, from any folder: no $INTGEN_DATA, no ./data, nothing of the checkout on the path
    from intgen.benchmarks import resolve_localize_set
    from intgen.pipeline import load_problem_set

    monkeypatch.delenv("INTGEN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_localize_set(Path("processbench-gsm8k")).is_file()
    expected = {"math500": 500, "gsm8k": 1319, "aime24": 30, "amc23": 40, "imo-answerbench": 399}
    for name, count in expected.items():
        loaded = load_problem_set(name)
        assert loaded.frame.height == count, name
        assert loaded.frame["answer"].is_not_null().all(), name
    # IMO-AnswerBench's one malformed row is skipped and reported, never dropped silently
    assert [str(row) for row in load_problem_set("imo-answerbench").skipped] != []
