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

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from intgen.backends.base import Backend, relevant_settings
from intgen.cache import CallCache
from intgen.calls import CallStats, Price, run_requests
from intgen.errors import MissingFile, UserError
from intgen.grading import DEFAULT_TIMEOUT_S, grade_items
from intgen.rundir import RunDir, digest
from intgen.stages import Answer, Ask, Grading, ModelCalls, Part, Stage, run_by_hand

log = logging.getLogger("intgen")

PROBLEMS = "problems"


class StageConfigChanged(UserError):
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


def write_input(run: RunDir, table: str, frame: pl.DataFrame, id_column: str, batch_size: int,
                force: bool = False, facts: dict[str, Any] | None = None) -> None:
    """An input set (the problems; eval-localize's items) as the first table, in parts of `batch_size` rows:
    part `i` of every later table covers the rows of part `i`. A part whose rows changed in any column (a
    corrected answer or reference solution keeps the problem's id) is written again: its new content is every
    later stage's changed input, so grading and what follows it are recomputed (model calls from the cache)."""
    fingerprint = {table: digest(frame[id_column].to_list()), "batch_size": batch_size}
    begin(run, table, [table], fingerprint, force)
    count, changed = 0, 0
    for index, start in enumerate(range(0, frame.height, batch_size)):
        rows = frame.slice(start, batch_size)
        written = run.part_marker(table, index) is not None
        if not written or not _same_rows(run, table, index, rows):
            changed += written
            run.write_part(table, index, rows)
            run.finish_part(table, index, [table], {"failed": {}})
        count += 1
    if changed:
        log.warning("%s: %d part(s) changed since the last run (a corrected answer or solution?); the stages "
                    "after it follow", table, changed)
    run.clear_table(table, start=count)
    run.record_stage(table, {"status": "done", "fingerprint": fingerprint, "rows": frame.height} | (facts or {}))


def _same_rows(run: RunDir, table: str, index: int, rows: pl.DataFrame) -> bool:
    try:
        stored = pl.read_parquet(run.part_path(table, index))
    except (OSError, pl.exceptions.PolarsError):
        return False
    return stored.columns == rows.columns and stored.equals(rows)


def write_problems(run: RunDir, problems: pl.DataFrame, batch_size: int, force: bool = False,
                   facts: dict[str, Any] | None = None) -> None:
    write_input(run, PROBLEMS, problems, "problem_id", batch_size, force, facts)


def producers(stages: list[Stage]) -> dict[str, str]:
    """For each table, the table whose part markers record it (a stage's main table; an input table itself)."""
    return {table: stage.table for stage in stages for table in stage.writes}


def input_digest(run: RunDir, stage: Stage, index: int, producer: dict[str, str]) -> str | None:
    """A digest of the input parts `index` a stage reads; None while one of them is not finished."""
    found = []
    for table in stage.reads:
        marker = run.part_marker(producer.get(table, table), index)
        if marker is None or table not in marker["files"]:
            return None
        found.append(marker["files"][table]["sha256"])
    return digest(found)


class StaleRun(UserError):
    """What a run's outputs show no longer follows its inputs; the message names the command that updates it."""


def out_of_date(run: RunDir, stages: list[Stage]) -> list[str]:
    """The stages (in order) with a part computed from inputs that changed after it ran, or not computed."""
    producer = producers(stages)
    stale = []
    for stage in stages:
        for index in range(run.part_count(stage.reads[0])):
            marker = run.part_marker(stage.table, index)
            if marker is None or marker.get("input") != input_digest(run, stage, index, producer):
                stale.append(stage.name)
                break
    return stale


def require_up_to_date(run: RunDir, stages: list[Stage], before: str) -> None:
    stale = out_of_date(run, stages)
    if stale:
        raise StaleRun(f"{run.path}: the {stale[0]!r} stage is out of date (its input changed after it ran; "
                       f"{', '.join(stale)} must follow it): run `intgen {stale[0]} --run-dir {run.path}`, or the "
                       f"same build-dataset command again, before {before}")


def state_digest(run: RunDir, stages: list[Stage]) -> str:
    """A digest of every stage's finished parts: what an export was made from."""
    found = []
    for stage in stages:
        for index in range(run.part_count(stage.table)):
            marker = run.part_marker(stage.table, index)
            found.append(None if marker is None else sorted((t, f.get("sha256")) for t, f in marker["files"].items()))
    return digest(found)


def read_part(run: RunDir, stage: Stage, index: int) -> Part:
    return Part(index, {table: pl.read_parquet(run.part_path(table, index)).to_dicts() for table in stage.reads})


class Executor:
    """Answers a stage's asks: model calls through the cache, grading in worker processes (here, or as Ray
    tasks under the Ray executor: `grade`)."""

    def __init__(self, run: RunDir, backend: Backend | None, grader: Grader, stats: CallStats,
                 cache: CallCache | None = None, grade: Callable[..., list[Any]] = grade_items) -> None:
        self.run, self.backend, self.grader, self.stats = run, backend, grader, stats
        self.cache = cache if cache is not None else run.cache
        self.grade = grade
        self.progress: StageProgress | None = None

    def __call__(self, ask: Ask) -> Answer:
        # progress counts a model stage's samples, and a stage without a model's answers graded
        counted = self.progress if (isinstance(ask, ModelCalls)) is (self.backend is not None) else None
        if isinstance(ask, ModelCalls):
            if self.backend is None:
                raise RuntimeError("this stage asked for model calls but was given no backend")
            return run_requests(self.backend, ask.requests, self.cache, self.stats,
                                counted.advance if counted is not None else None)
        if isinstance(ask, Grading):
            verdicts = self.grade(ask.items, workers=self.grader.workers, timeout=self.grader.timeout)
            if counted is not None:
                counted.advance(len(ask.items))
            return verdicts
        raise TypeError(f"unknown ask {type(ask).__name__}")


def compute_part(run: RunDir, stage: Stage, settings: Any, index: int, execute: Executor,
                 record: dict[str, Any]) -> int:
    """Compute part `index` of a stage and write it, marked finished; returns its units of work."""
    part = read_part(run, stage, index)
    work = stage.work(part, settings) if stage.work is not None else 0
    if execute.progress is not None and stage.work is not None:
        execute.progress.expect(index, work)
    tables = run_by_hand(stage.compute(part, settings), execute)
    frames = {name: pl.DataFrame(tables[name], schema=schema) for name, schema in stage.writes.items()}
    for name, frame in frames.items():
        run.write_part(name, index, frame)
    run.finish_part(stage.table, index, list(frames), record | {"failed": stage.failures(frames[stage.table])})
    return work


def due_parts(run: RunDir, stage: Stage, fingerprint: dict[str, Any],
              stages: list[Stage]) -> list[tuple[int, dict[str, Any]]]:
    """The parts to compute, each with the record its marker will carry: those without a current marker (other
    settings, other input parts, or failed rows to retry)."""
    producer = producers(stages)
    due = []
    for index in range(run.part_count(stage.reads[0])):
        inputs = input_digest(run, stage, index, producer)
        if inputs is None:
            raise MissingFile(f"{run.path}: the input of stage {stage.name!r} ({', '.join(stage.reads)}) "
                                    f"is not finished; run the stages before it first")
        marker = run.part_marker(stage.table, index)
        record = {"fingerprint": digest(fingerprint), "input": inputs}
        if marker is None or marker.get("failed") or {k: marker.get(k) for k in record} != record:
            due.append((index, record))
    return due


@dataclass(frozen=True)
class Engine:
    """What answers a stage's model calls: a backend in this process (the local executor), or, under the Ray
    executor, the backend's settings, from which each actor makes its own."""

    backend: Backend | None = None
    config: Any = None  # BackendConfig, for Ray actors
    ray: Any = None  # RaySettings: None runs the parts here

    def identity(self, sends: tuple[str, ...] = ("schema", "continuation")) -> dict[str, Any]:
        """The backend, the model and the settings that can change its replies to the kinds of request a stage
        `sends` (set ones only: a backend without any keeps the fingerprint it had)."""
        if self.backend is not None:
            found = {"backend": self.backend.kind, "model": self.backend.model}
            settings = self.backend.reply_settings
        else:
            kind, model = self.config.identity()
            found, settings = {"backend": kind, "model": model}, self.config.reply_settings()
        settings = relevant_settings(settings, "schema" in sends, "continuation" in sends)
        return found | ({"settings": settings} if settings else {})


def run_stage(
    run: RunDir, stage: Stage, settings: Any, stages: list[Stage], *, backend: Backend | None = None,
    grader: Grader = Grader(), price: Price | None = None, force: bool = False, progress: bool = True,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """Run `stage` over every part of its input (`stages`: all the pipeline's stages, to find its inputs).
    Model calls go to `backend` here, or to `engine` (a backend, or Ray actors made from its settings)."""
    engine = engine or Engine(backend)
    has_model = engine.backend is not None or engine.config is not None
    fingerprint = stage.fingerprint(settings)
    if stage.uses_model and has_model:
        fingerprint |= engine.identity(stage.sends)
    previous = begin(run, stage.name, list(stage.writes), fingerprint, force)
    count = run.part_count(stage.reads[0])
    stats = CallStats()
    due = due_parts(run, stage, fingerprint, stages)
    token_counts = getattr(engine.backend, "token_counts", "estimated") if engine.backend is not None else None
    with StageProgress(stage.name, count, progress) as shown:
        if engine.ray is not None:
            from intgen.ray_executor import merge_part_caches, run_parts

            merge_part_caches(run)  # a killed run's part caches first: their calls are paid for
            try:
                token_counts = run_parts(run, stage, settings, due, engine.config if stage.uses_model else None,
                                         grader, engine.ray, stats, shown)
            finally:
                merge_part_caches(run)
        else:
            execute = Executor(run, engine.backend, grader, stats)
            execute.progress = shown
            for index, record in due:
                compute_part(run, stage, settings, index, execute, record)
    for table in stage.writes:
        run.clear_table(table, start=count)  # parts of problems no longer in the run
    return finish(run, stage, settings, fingerprint, previous, stats, price,
                  token_counts if stage.uses_model and has_model else None)


def finish(run: RunDir, stage: Stage, settings: Any, fingerprint: dict[str, Any], previous: dict[str, Any],
           stats: CallStats, price: Price | None, token_counts: str | None = None) -> dict[str, Any]:
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
        # how per-sample completion tokens are known: engine, tokenizer or estimated
        token_counts = token_counts or previous.get("token_counts")
        if token_counts is not None:
            entry["token_counts"] = token_counts
    entry |= stage.summarize(scans, settings)
    run.record_stage(stage.name, entry)
    return entry


def finished_entry(run: RunDir, name: str) -> dict[str, Any]:
    entry = run.stage_entry(name)
    if not str(entry.get("status", "")).startswith("done"):
        raise MissingFile(f"{run.path}: the {name!r} stage has not finished; run it first")
    return entry


class StageProgress:
    """What the user waits for: samples (model calls) and answers graded, with a rate and an ETA. The total
    grows as each part says what it needs; parts not yet started are estimated from the ones seen. On a
    terminal it is a live bar; elsewhere (a log file, CI) a line every `every` seconds."""

    def __init__(self, stage: str, parts: int, enabled: bool, every: float = 30.0) -> None:
        self.stage, self.parts, self.enabled, self.every = stage, parts, enabled, every
        self.done = self.known = 0
        self.parts_seen: set[int] = set()
        self.part = 0
        self.started = self.logged = time.monotonic()
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> StageProgress:
        console = Console(stderr=True)
        if self.enabled and console.is_terminal:
            self._bar = Progress(
                TextColumn(f"[bold]{self.stage:<8}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=console,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.stage, total=None, unit="", rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and self.known:
            self._log(final=True)

    def expect(self, part: int, n: int) -> None:
        """Part `part` asks for `n` more units of work."""
        self.part = part
        self.parts_seen.add(part)
        self.known += n
        self._show()

    def advance(self, n: int) -> None:
        self.done += n
        self._show()

    def estimated_total(self) -> int:
        """The work known so far, plus the parts not started yet at the average of the ones seen."""
        seen = len(self.parts_seen)
        if not seen:
            return self.known
        return self.known + round(self.known / seen * max(0, self.parts - self.part - 1))

    def _rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def _show(self) -> None:
        total = max(self.estimated_total(), self.done)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=total or None, unit="done",
                             rate=f"{self._rate():.2f}/s, part {self.part + 1}/{self.parts}")
        elif self.enabled and time.monotonic() - self.logged >= self.every:
            self._log()

    def _log(self, final: bool = False) -> None:
        self.logged = time.monotonic()
        total = max(self.estimated_total(), self.done)
        rate = self._rate()
        eta = "" if final or not rate else f", about {format_seconds((total - self.done) / rate)} left"
        print(f"{self.stage}: {self.done}/{total} done (part {self.part + 1}/{self.parts}, {rate:.2f}/s{eta})",
              file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
