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

import heapq
import logging
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import polars as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from intgen.backends.base import Backend, relevant_settings
from intgen.calls import CallStats, Price
from intgen.errors import MissingFile, UserError
from intgen.parts import Answerer, Grader, compute_part
from intgen.rundir import RunDir, digest
from intgen.stages import Stage
from intgen.window import Window

log = logging.getLogger("intgen")

PROBLEMS = "problems"


class StageConfigChanged(UserError):
    """A stage already in the run directory was computed with other settings."""


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


@dataclass(frozen=True)
class Planned:
    """One stage of a run, with its settings and what answers its model calls (None: it has no model)."""

    stage: Stage
    settings: Any
    engine: Engine | None = None
    price: Price | None = None


def run_stage(
    run: RunDir, stage: Stage, settings: Any, stages: list[Stage], *, backend: Backend | None = None,
    grader: Grader = Grader(), price: Price | None = None, force: bool = False, progress: bool = True,
    engine: Engine | None = None, parts_in_flight: int = 8,
) -> dict[str, Any]:
    """Run `stage` over every part of its input (`stages`: all the pipeline's stages, to find its inputs), its model
    calls answered by `backend` (or `engine`)."""
    planned = Planned(stage, settings, engine or Engine(backend), price)
    return run_stages(run, [planned], stages, grader=grader, force=force, progress=progress,
                      parts_in_flight=parts_in_flight)[stage.name]


def stage_fingerprint(stage: Stage, settings: Any, engine: Engine | None) -> dict[str, Any]:
    fingerprint = stage.fingerprint(settings)
    if stage.uses_model and engine is not None and (engine.backend is not None or engine.config is not None):
        fingerprint |= engine.identity(stage.sends)
    return fingerprint


def run_stages(run: RunDir, plan: list[Planned], stages: list[Stage], *, grader: Grader = Grader(),
               force: bool = False, progress: bool = True, parts_in_flight: int = 8) -> dict[str, dict[str, Any]]:
    """Run the planned stages (in pipeline order) over every part, as a dataflow: part `i` of a stage is computed
    as soon as part `i` of each table it reads is settled (written, or found current), up to `parts_in_flight`
    parts at once, of any stages, a later stage's part first. Every model call goes through one `Window` per
    backend, so a server's queue is fed from all of them. Each part is written and marked as it finishes, exactly
    as one stage after another would write it; each stage's manifest entry once its last part is settled. Every
    stage's settings are checked against the run before any work. Returns the stages' manifest entries."""
    fingerprints = [stage_fingerprint(p.stage, p.settings, p.engine) for p in plan]
    previous = [begin(run, p.stage.name, list(p.stage.writes), f, force) for p, f in zip(plan, fingerprints)]
    windows: dict[int, Window] = {}
    for p in plan:
        if p.stage.uses_model and p.engine is not None and p.engine.backend is not None:
            windows.setdefault(id(p.engine.backend), Window(p.engine.backend))
    flow = Dataflow(run, plan, fingerprints, producers(stages), parts_in_flight)
    entries: dict[str, dict[str, Any]] = {}
    try:
        with PipelineProgress(progress) as shown:
            bars = [shown.stage(p.stage.name, flow.count) for p in plan]
            begun = time.monotonic()

            def compute(k: int, index: int, record: dict[str, Any], stats: CallStats) -> None:
                p = plan[k]
                window = windows.get(id(p.engine.backend)) if p.engine is not None else None
                lane = window.lane((k, index)) if window is not None and p.stage.uses_model else None
                execute = Answerer(run, lane, grader, stats)  # an earlier stage's calls, then a lower part's, first
                execute.progress = bars[k]
                started = time.monotonic()
                compute_part(run, p.stage, p.settings, index, execute, record)
                log.debug("%s part %d: %.2f s to %.2f s", p.stage.name, index, started - begun,
                          time.monotonic() - begun)

            for k, stats in flow.parts(compute):  # each stage as its last part is settled
                p = plan[k]
                for table in p.stage.writes:
                    run.clear_table(table, start=flow.count)  # parts of problems no longer in the run
                window = windows.get(id(p.engine.backend)) if p.engine is not None else None
                has_model = p.engine is not None and (p.engine.backend is not None or p.engine.config is not None)
                tokens = window.token_counts if window is not None else None
                entries[p.stage.name] = finish(run, p.stage, p.settings, fingerprints[k], previous[k], stats,
                                               p.price, tokens if p.stage.uses_model and has_model else None)
    finally:
        for window in windows.values():
            window.close()
    return entries


class Dataflow:
    """Which parts are due and when: (stage k, part i) waits until part i of each table it reads is settled, then
    is due if its marker is not current (other settings, other input parts, failed rows to retry). Due parts run
    on `width` threads, a later stage's first; a failure stops new parts, lets the running ones finish (their
    calls are paid for), and is raised."""

    def __init__(self, run: RunDir, plan: list[Planned], fingerprints: list[dict[str, Any]],
                 producer: dict[str, str], width: int) -> None:
        self.run, self.plan, self.producer, self.width = run, plan, producer, max(1, width)
        self.fingerprints = [digest(f) for f in fingerprints]
        made_by = {table: k for k, p in enumerate(plan) for table in p.stage.writes}
        self.needs = [sorted({made_by[t] for t in p.stage.reads if t in made_by}) for p in plan]
        first = plan[0].stage.reads[0]
        self.count = run.part_count(first)
        for p in plan:  # a table read but made by none of the planned stages must be there in full
            for table in p.stage.reads:
                if table not in made_by and run.part_count(producer.get(table, table)) != self.count:
                    raise MissingFile(f"{run.path}: the input of stage {p.stage.name!r} ({', '.join(p.stage.reads)}) "
                                      f"is not finished; run the stages before it first")

    def record(self, k: int, index: int) -> dict[str, Any] | None:
        """The marker record of part `index` of stage `k` when it is due, else None (its marker is current)."""
        stage = self.plan[k].stage
        inputs = input_digest(self.run, stage, index, self.producer)
        if inputs is None:
            raise MissingFile(f"{self.run.path}: the input of stage {stage.name!r} ({', '.join(stage.reads)}) "
                              f"is not finished; run the stages before it first")
        marker = self.run.part_marker(stage.table, index)
        record = {"fingerprint": self.fingerprints[k], "input": inputs}
        if marker is None or marker.get("failed") or {key: marker.get(key) for key in record} != record:
            return record
        return None

    def parts(self, compute: Callable[[int, int, dict[str, Any], CallStats], None]) -> Iterator[tuple[int, CallStats]]:
        """Compute every due part; yields (k, its calls' figures) as stage k's last part is settled."""
        stages = len(self.plan)
        self.settled = [[False] * self.count for _ in range(stages)]
        self.left = [self.count] * stages
        stats = [CallStats() for _ in range(stages)]
        self.waiting = [(-k, i) for k in range(stages) if not self.needs[k] for i in range(self.count)]
        heapq.heapify(self.waiting)  # parts whose inputs are settled: a later stage's first, then by part
        jobs: queue.SimpleQueue[tuple[int, int, dict[str, Any]] | None] = queue.SimpleQueue()
        done: queue.SimpleQueue[tuple[int, int, CallStats, BaseException | None]] = queue.SimpleQueue()
        workers = start_workers(compute, jobs, done, self.width)
        failure: BaseException | None = None
        running = 0
        try:
            complete = [k for k in range(stages) if not self.count]
            while True:
                yield from ((k, stats[k]) for k in complete)
                complete = []
                while self.waiting and running < self.width and failure is None:
                    order, index = heapq.heappop(self.waiting)
                    record = self.record(-order, index)
                    if record is None:
                        complete += self.settle(-order, index)
                    else:
                        jobs.put((-order, index, record))
                        running += 1
                if complete:
                    continue
                if not running:
                    break
                k, index, part_stats, exc = done.get()
                running -= 1
                stats[k].add(part_stats)
                if exc is not None:
                    failure = failure or exc
                elif failure is None:
                    complete = self.settle(k, index)
            if failure is not None:
                raise failure
        finally:
            for _ in workers:
                jobs.put(None)

    def settle(self, k: int, index: int) -> list[int]:
        """Part `index` of stage k is settled: the parts that read it may be due. Returns [k] if stage k is now
        complete."""
        self.settled[k][index] = True
        self.left[k] -= 1
        for later in range(k + 1, len(self.plan)):
            if k in self.needs[later] and all(self.settled[n][index] for n in self.needs[later]):
                heapq.heappush(self.waiting, (-later, index))
        return [k] if not self.left[k] else []


def start_workers(compute: Callable[[int, int, dict[str, Any], CallStats], None], jobs: queue.SimpleQueue[Any],
                  done: queue.SimpleQueue[Any], width: int) -> list[threading.Thread]:
    """`width` threads computing parts from `jobs` (None ends one) and telling `done` of each, failed or not."""

    def work() -> None:
        while (job := jobs.get()) is not None:
            k, index, record = job
            part_stats = CallStats()
            try:
                compute(k, index, record, part_stats)
                done.put((k, index, part_stats, None))
            except BaseException as exc:  # noqa: BLE001 - raised in the driver's thread
                done.put((k, index, part_stats, exc))

    workers = [threading.Thread(target=work, name=f"intgen-part-{n}", daemon=True) for n in range(width)]
    for worker in workers:
        worker.start()
    return workers


def finish(run: RunDir, stage: Stage, settings: Any, fingerprint: dict[str, Any], previous: dict[str, Any],
           stats: CallStats, price: Price | None, token_counts: str | None = None) -> dict[str, Any]:
    """The stage's manifest entry: rows, failures, calls (this run and in all), and the stage's own figures."""
    scans = {name: run.scan(name, stage.writes.get(name)) for name in (*stage.reads, *stage.writes)}
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


def live_display(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console)


class PipelineProgress:
    """The stages' progress shown together: one live display on a terminal (a bar per stage), else each stage's
    own line every so often."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Progress | None = None
        self.stages: list[StageProgress] = []

    def __enter__(self) -> PipelineProgress:
        console = Console(stderr=True)
        if self.enabled and console.is_terminal:
            self.bar = live_display(console)
            self.bar.start()
        return self

    def stage(self, name: str, parts: int) -> StageProgress:
        shown = StageProgress(name, parts, self.enabled, bar=self.bar)
        self.stages.append(shown)
        return shown.__enter__()

    def __exit__(self, *exc: object) -> None:
        for shown in self.stages:
            shown.__exit__()
        if self.bar is not None:
            self.bar.stop()


class StageProgress:
    """What the user waits for: samples (model calls) and answers graded, with a rate and an ETA. The total
    grows as each part says what it needs; parts not yet started are estimated from the ones seen. On a
    terminal it is a live bar (`bar`: a display shared with other stages); elsewhere (a log file, CI) a line every
    `every` seconds. Parts of the stage report from several threads."""

    def __init__(self, stage: str, parts: int, enabled: bool, every: float = 30.0, bar: Progress | None = None) -> None:
        self.stage, self.parts, self.enabled, self.every = stage, parts, enabled, every
        self.done = self.known = 0
        self.parts_seen: set[int] = set()
        self.part = 0
        self.started = self.logged = time.monotonic()
        self._shared = bar is not None
        self._bar: Progress | None = bar
        self._task: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> StageProgress:
        console = Console(stderr=True)
        if self._bar is None and self.enabled and console.is_terminal:
            self._bar = live_display(console)
            self._bar.start()
        if self._bar is not None:
            self._task = self._bar.add_task(self.stage, total=None, unit="", rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            if not self._shared:
                self._bar.stop()
        elif self.enabled and self.known:
            self._log(final=True)

    def expect(self, part: int, n: int) -> None:
        """Part `part` asks for `n` more units of work."""
        with self._lock:
            self.part = part
            self.parts_seen.add(part)
            self.known += n
            self._show()

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            self._show()

    def estimated_total(self) -> int:
        """The work known so far, plus the parts not started yet at the average of the ones seen."""
        seen = len(self.parts_seen)
        if not seen:
            return self.known
        return self.known + round(self.known / seen * max(0, self.parts - seen))

    def _rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def _show(self) -> None:
        total = max(self.estimated_total(), self.done)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=total or None, unit="done",
                             rate=f"{self._rate():.2f}/s, {len(self.parts_seen)}/{self.parts} parts")
        elif self.enabled and time.monotonic() - self.logged >= self.every:
            self._log()

    def _log(self, final: bool = False) -> None:
        self.logged = time.monotonic()
        total = max(self.estimated_total(), self.done)
        rate = self._rate()
        eta = "" if final or not rate else f", about {format_seconds((total - self.done) / rate)} left"
        print(f"{self.stage}: {self.done}/{total} done ({len(self.parts_seen)}/{self.parts} parts started, "
              f"{rate:.2f}/s{eta})", file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
