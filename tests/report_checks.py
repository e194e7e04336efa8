"""What a person sees in a report, checked in headless Chromium (used by the report, pipeline and eval tests)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import polars as pl

from intgen.rundir import RunDir
from intgen.steps import steps_at

ARTIFACTS = Path(os.environ.get("INTGEN_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def open_report(browser, path: Path, fragment: str = ""):
    """A page on the report; the list it returns collects console errors and warnings, and uncaught errors."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
    page.goto(path.as_uri() + fragment)
    page.wait_for_selector("#main section")
    return page, problems


def visible_rows(page) -> int:
    return page.locator(".trace-row:not([hidden])").count()


def check_dataset_report(browser, run_dir: Path, proposals: pl.DataFrame, screenshot_name: str | None = None) -> dict:
    """Every proposal listed by id; a chosen proposal's error step highlighted with the attempt's own step text;
    each filter changes what is shown; no console errors. Returns what a caller may check further."""
    report = run_dir / "report.html"
    page, problems = open_report(browser, report)
    listed = page.locator(".trace-row").evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert sorted(listed) == sorted(proposals["proposal_id"].to_list())
    assert visible_rows(page) == proposals.height
    if screenshot_name:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{screenshot_name}-overview.png"))

    # the dataset's configs, each with its rows and what a row is
    from intgen.dataset.export import CONFIG_DEFINITIONS, export_file

    shown = page.locator("#configs tbody tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    exported = [name for name in CONFIG_DEFINITIONS if (run_dir / "dataset" / name).is_dir()]
    assert [row[0] for row in shown] == exported
    for name, rows, rule in shown:
        assert rows.replace(",", "") == str(pl.read_parquet(export_file(run_dir / "dataset", name)).height), name
        assert rule == CONFIG_DEFINITIONS[name]

    # filters: by status, by problem, by text
    statuses = page.locator("#f-status option").evaluate_all("os => os.map(o => o.value).filter(Boolean)")
    expected = dict(zip(listed, page.locator(".trace-row").evaluate_all("rows => rows.map(r => r.dataset.status)")))
    for status in statuses:
        page.select_option("#f-status", status)
        assert visible_rows(page) == sum(s == status for s in expected.values())
    page.select_option("#f-status", "")
    problem = proposals["problem_id"][0]
    page.select_option("#f-problem", problem)
    assert visible_rows(page) == proposals.filter(pl.col("problem_id") == problem).height
    page.select_option("#f-problem", "")
    sources = dict(zip(*RunDir(run_dir).table("problems").select("problem_id", "source").get_columns()))
    source = sources[problem]
    page.select_option("#f-source", "source:" + (source or ""))
    assert visible_rows(page) == sum(sources.get(p) == source for p in proposals["problem_id"])
    page.select_option("#f-source", "")
    page.fill("#f-search", proposals["proposal_id"][-1])
    assert visible_rows(page) == 1
    page.fill("#f-search", "")
    assert visible_rows(page) == proposals.height

    # one proposal by its link: the error step is highlighted and is the attempt's own step
    located = proposals.filter(pl.col("error_step").is_not_null() & pl.col("step_ends").is_not_null())
    chosen = located.row(located.height // 2, named=True)
    attempt = RunDir(run_dir).table("graded").filter(pl.col("attempt_id") == chosen["attempt_id"])["text"][0]
    steps = steps_at(attempt, chosen["step_ends"])
    page.goto(report.as_uri() + "#p=" + quote(chosen["proposal_id"], safe=""))
    highlighted = page.locator(".step.error")
    highlighted.wait_for()
    assert highlighted.count() == 1
    assert highlighted.get_attribute("data-step") == str(chosen["error_step"])
    assert highlighted.get_attribute("data-text") == steps[chosen["error_step"] - 1]
    assert page.locator(".step").count() == len(steps) + (1 if chosen["intervention"] else 0)
    if chosen["intervention"]:
        assert page.locator("#intervention").is_visible()
    assert page.locator(".trace-row.selected").get_attribute("data-id") == chosen["proposal_id"]
    if screenshot_name:
        page.locator("#detail").screenshot(path=str(ARTIFACTS / f"{screenshot_name}-trace.png"))
    assert not problems, problems
    return {"page": page, "chosen": chosen, "problems": problems}
