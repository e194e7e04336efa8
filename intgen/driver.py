"""Runs any stage over a run directory, part by part. It knows no method rule: the stages do.

For each stage: check its fingerprint against the manifest (other settings are refused unless
`force`), then for each part `i` of its input tables skip it if its marker is current (same settings,
same input parts, no failures), else drive the stage's `compute` — answering its model calls through
the call cache and its grading through the worker pool — write its tables' part `i` atomically and
mark the part finished. A part with failed rows is computed again on the next run, and the cache
makes its good samples free. Finally the stage's figures go into the manifest.

Downstream stages follow their inputs by content: a part whose input parts changed (an upstream
failure retried, an upstream stage forced) is recomputed without asking.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import polars as pl
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from intgen.backends.base import Backend
from intgen.calls import CallStats, Price, run_requests
from intgen.grading import DEFAULT_TIMEOUT_S, grade_items
from intgen.rundir import RunDir, digest
from intgen.stages import Answer, Ask, Grading, ModelCalls, Part, Stage, run_by_hand

PROBLEMS = "problems"


class StageConfigChanged(RuntimeError):
    """A stage already in the run directory was computed with other settings."""


@dataclass(frozen=True)
class Grader:
    """How the driver grades: worker processes and the per-item time limit."""

    workers: int | None = 2
    timeout: float = DEFAULT_TIMEOUT_S


def begin(run: RunDir, name: str, tables: list[str], fingerprint: dict[str, Any], force: bool) -> dict[str, Any]:
    """Start (or resume) a stage. Returns its previous manifest entry when its finished parts may be kept;
    otherwise clears its tables and returns {}. The fingerprint is recorded before any work, so a killed
    stage resumes with its finished parts."""
    entry = run.stage_entry(name)
    old = entry.get("fingerprint")
    if old == fingerprint:
        return entry
    if old is not None and not force:
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        details = "; ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
        raise StageConfigChanged(
            f"{run.path}: stage {name!r} was computed with other settings ({details}). "
            "Use another --run-dir, or pass --force to recompute it (cached model calls are reused)."
        )
    for table in tables:  # parts without a matching fingerprint are of unknown origin
        run.clear_table(table)
    run.record_stage(name, {"status": "running", "fingerprint": fingerprint})
    return {}


def write_problems(run: RunDir, problems: pl.DataFrame, batch_size: int, force: bool = False) -> None:
    """The problem set as the first table, in parts of `batch_size` problems: part `i` of every later
    table covers the problems of part `i`."""
    fingerprint = {"problems": digest(problems["problem_id"].to_list()), "batch_size": batch_size}
    begin(run, PROBLEMS, [PROBLEMS], fingerprint, force)
    count = 0
    for index, start in enumerate(range(0, problems.height, batch_size)):
        if run.part_marker(PROBLEMS, index) is None:
            run.write_part(PROBLEMS, index, problems.slice(start, batch_size))
            run.finish_part(PROBLEMS, index, [PROBLEMS], {"failed": {}})
        count += 1
    run.clear_table(PROBLEMS, start=count)
    run.record_stage(PROBLEMS, {"status": "done", "fingerprint": fingerprint, "rows": problems.height})


def producers(stages: list[Stage]) -> dict[str, str]:
    """For each table, the table whose part markers record it (a stage's main table)."""
    return {PROBLEMS: PROBLEMS} | {table: stage.table for stage in stages for table in stage.writes}


def input_digest(run: RunDir, stage: Stage, index: int, producer: dict[str, str]) -> str | None:
    """A digest of the input parts `index` a stage reads; None while one of them is not finished."""
    found = []
    for table in stage.reads:
        marker = run.part_marker(producer[table], index)
        if marker is None or table not in marker["files"]:
            return None
        found.append(marker["files"][table]["sha256"])
    return digest(found)


def read_part(run: RunDir, stage: Stage, index: int) -> Part:
    return Part(index, {table: pl.read_parquet(run.part_path(table, index)).to_dicts() for table in stage.reads})


class Executor:
    """Answers a stage's asks in this process: model calls through the cache, grading in worker processes."""

    def __init__(self, run: RunDir, backend: Backend | None, grader: Grader, stats: CallStats) -> None:
        self.run, self.backend, self.grader, self.stats = run, backend, grader, stats

    def __call__(self, ask: Ask) -> Answer:
        if isinstance(ask, ModelCalls):
            if self.backend is None:
                raise RuntimeError("this stage asked for model calls but was given no backend")
            return run_requests(self.backend, ask.requests, self.run.cache, self.stats)
        if isinstance(ask, Grading):
            return grade_items(ask.items, workers=self.grader.workers, timeout=self.grader.timeout)
        raise TypeError(f"unknown ask {type(ask).__name__}")


def failures(frame: pl.DataFrame) -> dict[str, int]:
    """Failed rows by kind (the text of `error` before its first colon)."""
    if "error" not in frame.columns:
        return {}
    kinds = frame.filter(pl.col("error").is_not_null()).select(pl.col("error").str.split(":").list.first())
    return dict(Counter(kinds.to_series().to_list()))


def compute_part(run: RunDir, stage: Stage, settings: Any, index: int, execute: Executor, record: dict[str, Any]) -> None:
    tables = run_by_hand(stage.compute(read_part(run, stage, index), settings), execute)
    frames = {name: pl.DataFrame(tables[name], schema=schema) for name, schema in stage.writes.items()}
    for name, frame in frames.items():
        run.write_part(name, index, frame)
    run.finish_part(stage.table, index, list(frames), record | {"failed": failures(frames[stage.table])})


def run_stage(
    run: RunDir, stage: Stage, settings: Any, stages: list[Stage], *, backend: Backend | None = None,
    grader: Grader = Grader(), price: Price | None = None, force: bool = False, progress: bool = True,
) -> dict[str, Any]:
    """Run `stage` over every part of its input (`stages`: all the pipeline's stages, to find its inputs)."""
    fingerprint = stage.fingerprint(settings)
    if stage.uses_model and backend is not None:
        fingerprint |= {"backend": backend.kind, "model": backend.model}
    previous = begin(run, stage.name, list(stage.writes), fingerprint, force)
    producer = producers(stages)
    count = run.part_count(stage.reads[0])
    stats = CallStats()
    execute = Executor(run, backend, grader, stats)
    with stage_progress(stage.name, count, progress) as advance:
        for index in range(count):
            inputs = input_digest(run, stage, index, producer)
            if inputs is None:
                raise FileNotFoundError(f"{run.path}: the input of stage {stage.name!r} ({', '.join(stage.reads)}) "
                                        f"is not finished; run the stages before it first")
            marker = run.part_marker(stage.table, index)
            record = {"fingerprint": digest(fingerprint), "input": inputs}
            if marker is None or marker.get("failed") or {k: marker.get(k) for k in record} != record:
                compute_part(run, stage, settings, index, execute, record)
            advance(1)
    for table in stage.writes:
        run.clear_table(table, start=count)  # parts of problems no longer in the run
    return finish(run, stage, settings, fingerprint, previous, stats, price, backend)


def finish(run: RunDir, stage: Stage, settings: Any, fingerprint: dict[str, Any], previous: dict[str, Any],
           stats: CallStats, price: Price | None, backend: Backend | None = None) -> dict[str, Any]:
    """The stage's manifest entry: rows, failures, calls (this run and in all), and the stage's own figures."""
    scans = {name: run.scan(name) for name in (*stage.reads, *stage.writes)}
    failed: Counter[str] = Counter()
    for index in range(run.part_count(stage.table)):
        failed.update((run.part_marker(stage.table, index) or {}).get("failed", {}))
    entry: dict[str, Any] = {
        "status": "done_with_failures" if failed else "done", "fingerprint": fingerprint,
        "rows": scans[stage.table].select(pl.len()).collect().item(), "failed_rows": dict(failed),
    }
    if stage.uses_model:
        total = CallStats.from_dict(previous.get("calls", {}))
        total.add(stats)
        entry |= {"calls": total.to_dict(price), "last_run": stats.to_dict(price)}
        if backend is not None:  # how per-sample completion tokens are known: engine, tokenizer or estimated
            entry["token_counts"] = getattr(backend, "token_counts", "estimated")
    entry |= stage.summarize(scans, settings)
    run.record_stage(stage.name, entry)
    return entry


def finished_entry(run: RunDir, name: str) -> dict[str, Any]:
    entry = run.stage_entry(name)
    if not str(entry.get("status", "")).startswith("done"):
        raise FileNotFoundError(f"{run.path}: the {name!r} stage has not finished; run it first")
    return entry


@contextmanager
def stage_progress(stage: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    with Progress(
        TextColumn(f"[bold]{stage:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    ) as progress:
        task = progress.add_task(stage, total=total)
        yield lambda n: progress.advance(task, n)
