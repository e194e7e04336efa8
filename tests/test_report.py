"""intgen report: what the page holds, and what a person sees in headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from intgen.cli import app
from intgen.report import CONTINUATION_HEAD_CHARS, CONTINUATION_TAIL_CHARS, cut, keep_some_texts, write_report
from intgen.rundir import RunDir

from report_checks import check_dataset_report, open_report
from synthetic_run import HOSTILE, write_synthetic_run

runner = CliRunner()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("report") / "run"
    write_synthetic_run(folder, problems=6, attempts=3)
    result = runner.invoke(app, ["report", str(folder)])
    assert result.exit_code == 0, result.output
    assert f"report: {folder / 'report.html'}" in result.output
    return folder


def summary_of(page_text: str) -> dict:
    return json.loads(
        re.search(r'<script type="application/json" id="summary">(.*?)</script>', page_text, re.S).group(1)
    )


def test_the_page_lists_every_proposal_and_keeps_hostile_text_as_data(synthetic: Path) -> None:
    text = (synthetic / "report.html").read_text()
    proposals = RunDir(synthetic).table("proposals")
    summary = summary_of(text)
    column = summary["proposal_columns"].index("proposal_id")  # the index is read by column name
    assert sorted(row[column] for row in summary["proposals"]) == sorted(proposals["proposal_id"])
    assert "<script>window.pwned" not in text and "onerror=\"window" not in text  # `<` is escaped in the data
    assert "\\u003c/script>\\u003cscript>window.pwned" in text
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text  # nothing fetched
    verified = RunDir(synthetic).table("verify").filter(pl.col("condition") == "intervention")
    table1 = summary["table1"]
    assert table1["conditions"]["intervention"]["problems"] == verified["problem_id"].n_unique() > 0
    # which proposal stood for each problem: the first accepted one of each problem
    first = verified.filter("matched").sort("problem_id")
    assert [u["proposal_id"] for u in table1["units"]] == first["proposal_id"].to_list()
    assert len(table1["units"]) == table1["problems"] and "first accepted proposal" in table1["selection"]


def test_long_continuations_keep_their_start_and_end() -> None:
    text = "a" * 5000 + "The answer is 42."
    kept = cut(text)
    assert kept.startswith("a" * CONTINUATION_HEAD_CHARS) and kept.endswith("The answer is 42.")
    assert len(kept) < CONTINUATION_HEAD_CHARS + CONTINUATION_TAIL_CHARS + 120 and "characters not shown" in kept
    assert cut("short") == "short"
    rows = [{"text": f"t{i}", "correct": c} for i, c in enumerate([False, False, True, None])]
    keep_some_texts(rows, 2)
    assert [r["text"] for r in rows] == ["t0", None, "t2", None]  # the first correct and the first wrong


def test_synthetic_report_in_chromium(synthetic: Path, browser) -> None:
    proposals = RunDir(synthetic).table("proposals")
    seen = check_dataset_report(browser, synthetic, proposals)
    page = seen["page"]
    # math is typeset, currency stays text, the hostile problem text is shown as text and never runs
    assert page.locator("#detail .katex").count() > 0
    problem = page.locator("#detail .text").first.inner_text()
    assert "$5 and $6" in problem
    first = proposals.filter(pl.col("problem_id") == "0000000000000000")["proposal_id"][0]
    page.goto((synthetic / "report.html").as_uri() + "#p=" + first.replace("/", "%2F"))
    page.wait_for_function("document.querySelector('#detail .text') && "
                           "document.querySelector('#detail .text').textContent.includes('window.pwned')")
    assert HOSTILE.strip().split(" @@")[0] in page.locator("#detail .text").first.inner_text()
    page.wait_for_timeout(500)  # an injected <img onerror> would have fired by now
    assert page.evaluate("window.pwned") is None
    # Table 1 (its selection rule, and a link to the proposal that stood for each problem) and the distributions
    assert page.locator("#table1 svg rect").count() >= 2 and page.locator("#distributions svg rect").count() > 10
    assert "matched set at equal budgets" in page.locator("#table1-rule").inner_text()
    units = page.locator("#table1-units li a")
    assert units.count() == summary_of((synthetic / "report.html").read_text())["table1"]["problems"]
    units.first.evaluate("a => a.closest('details').open = true")
    units.first.click()
    page.wait_for_function("location.hash.startsWith('#p=') && document.querySelector('#detail .text')")
    assert not seen["problems"]


def test_report_errors_are_one_line(tmp_path: Path, synthetic: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["report", str(synthetic), str(synthetic)])
    assert result.exit_code == 2 and "one dataset run" in result.output


def test_eval_report_in_chromium(tmp_path: Path, browser) -> None:
    """Two eval runs (written by the pipeline's own graded-table writer): pass@k curves, per-problem rows and
    the comparison."""
    from intgen.evals.metrics import eval_report

    graded = write_synthetic_run(tmp_path / "synthetic", problems=4, attempts=4).table("graded")
    runs = []
    for name, flip in (("base", 0), ("tuned", 1)):
        run = RunDir(tmp_path / name)
        table = graded.with_columns((pl.col("sample_index") < flip + 1).alias("correct"))
        run.write_part("graded", 0, table)
        run.record_stage("sample", {"status": "done"})
        sources = pl.DataFrame({"problem_id": table["problem_id"].unique(), "source": "synthetic"})
        report = {"protocol": {"samples": 4}} | eval_report(table, sources, 4, lambda a, b: [a == x for x in b])
        report["pass@8"] = float("nan")  # as evaluate writes it when no problem has 8 attempts: the page still loads
        run.write_json("eval.json", report)
        runs.append(run.path)
    out = write_report(runs, tmp_path / "eval.html")
    page, problems = open_report(browser, out)
    assert page.locator("#passk svg path").count() == 2
    assert page.locator("#problems tbody tr").count() == 4
    assert "tuned" in page.locator("#comparison").inner_text()
    assert not problems, problems
