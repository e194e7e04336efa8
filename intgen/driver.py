"""Runs any stage over a run directory, part by part. It knows no method rule: the stages do.

For each stage: check its fingerprint against the manifest (other settings are refused unless
`force`), then for each part `i` of its input tables skip it if its marker is current (same settings,
same input parts, no failures), else drive the stage's `compute` chunk by chunk (16 problems each, a
chunk's rows handed to the next stage in memory) — answering its model calls through the call cache and
its grading through the worker pool — write its tables' part `i` atomically and mark the part finished.
A part with failed rows is computed again on the next run, and the cache makes its good samples free.
Finally the stage's figures go into the manifest.

Downstream stages follow their inputs by content: a part whose input parts changed (an upstream
failure retried, an upstream stage forced) is recomputed without asking.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import polars as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from intgen.backends.base import Backend, relevant_settings
from intgen.calls import CallStats, Price
from intgen.errors import MissingFile, UserError
from intgen.parts import Answerer, Grader, chunks, chunks_in, chunks_per_part, compute_chunk, read_rows, write_computed
from intgen.rundir import RunDir, digest
from intgen.stages import Part, Rows, Stage
from intgen.window import EventLoop, Window

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
    old = run.stage_entry(table).get("fingerprint") or {}
    if not force and old.get(table) == fingerprint[table] and old.get("batch_size") not in (None, batch_size):
        raise StageConfigChanged(f"{run.path}: its parts hold {old['batch_size']} problems each, not {batch_size}: "
                                 f"pass --batch-size {old['batch_size']} to go on with it (intgen's default was 16 "
                                 "before 128), or use another --run-dir")
    begin(run, table, [table], fingerprint, force)
    count, changed = 0, 0
    for index, start in enumerate(range(0, frame.height, batch_size)):
        rows = frame.slice(start, batch_size)
        written = run.part_marker(table, index) is not None
        if not written or not _same_rows(run, table, index, rows):
            changed += written
            # the old marker goes first: a kill between the file and its new marker must leave none, or the next
            # run would find the new rows under the old marker's digest, and no stage after it would follow
            run.marker_path(table, index).unlink(missing_ok=True)
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
    producer, fingerprint_digest = producers(stages), digest(fingerprint)
    found = ((index, due_record(run, stage, index, fingerprint_digest, producer))
             for index in range(run.part_count(stage.reads[0])))
    return [(index, record) for index, record in found if record is not None]


def due_record(run: RunDir, stage: Stage, index: int, fingerprint: str,
               producer: dict[str, str]) -> dict[str, Any] | None:
    """The marker record of part `index` of `stage` (settings digest `fingerprint`) when it is due, else None (its
    marker is current)."""
    inputs = input_digest(run, stage, index, producer)
    if inputs is None:
        raise MissingFile(f"{run.path}: the input of stage {stage.name!r} ({', '.join(stage.reads)}) "
                          f"is not finished; run the stages before it first")
    marker = run.part_marker(stage.table, index)
    record = {"fingerprint": fingerprint, "input": inputs}
    if marker is None or marker.get("failed") or {key: marker.get(key) for key in record} != record:
        return record
    return None


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
    engine: Engine | None = None, chunks_in_flight: int = 8,
) -> dict[str, Any]:
    """Run `stage` over every part of its input (`stages`: all the pipeline's stages, to find its inputs), its model
    calls answered by `backend` (or `engine`)."""
    planned = Planned(stage, settings, engine or Engine(backend), price)
    return run_stages(run, [planned], stages, grader=grader, force=force, progress=progress,
                      chunks_in_flight=chunks_in_flight)[stage.name]


def stage_fingerprint(stage: Stage, settings: Any, engine: Engine | None) -> dict[str, Any]:
    fingerprint = stage.fingerprint(settings)
    if stage.uses_model and engine is not None and (engine.backend is not None or engine.config is not None):
        fingerprint |= engine.identity(stage.sends)
    return fingerprint


def run_stages(run: RunDir, plan: list[Planned], stages: list[Stage], *, grader: Grader = Grader(),
               force: bool = False, progress: bool = True, chunks_in_flight: int = 8) -> dict[str, dict[str, Any]]:
    """Run the planned stages (in pipeline order) over every part, as a dataflow over chunks (`Dataflow`): chunk `j`
    of part `i` of a stage is computed as soon as chunk `j` of each table it reads is there, up to
    `chunks_in_flight` chunks at once, of any stages, a later stage's first. Every model call goes through one
    `Window` per backend, so a server's queue is fed from all of them; the windows and the chunks share one event
    loop, in a thread of its own. Each part is written and marked once all its chunks are, exactly as one stage
    after another would write it; each stage's manifest entry once its last part is settled. Every stage's settings
    are checked against the run before any work. Returns the stages' manifest entries."""
    fingerprints = [stage_fingerprint(p.stage, p.settings, p.engine) for p in plan]
    previous = [begin(run, p.stage.name, list(p.stage.writes), f, force) for p, f in zip(plan, fingerprints)]
    events = EventLoop("intgen-loop")
    windows: dict[int, Window] = {}
    entries: dict[str, dict[str, Any]] = {}
    try:
        for p in plan:
            if p.stage.uses_model and p.engine is not None and p.engine.backend is not None:
                windows.setdefault(id(p.engine.backend), Window(p.engine.backend, loop=events.loop))
        flow = Dataflow(run, plan, fingerprints, producers(stages), chunks_in_flight, events.loop)
        with PipelineProgress(progress) as shown:
            units = flow.count * chunks_per_part(run) if flow.chunked else flow.count
            bars = [shown.stage(p.stage.name, units, "chunks" if flow.chunked else "parts") for p in plan]

            def answerer(k: int, index: int, j: int, stats: CallStats) -> Answerer:
                p = plan[k]
                window = windows.get(id(p.engine.backend)) if p.engine is not None else None
                # an earlier stage's calls, then a lower part's, then a lower chunk's, first
                lane = window.lane((k, index, j)) if window is not None and p.stage.uses_model else None
                execute = Answerer(run, lane, grader, stats)
                execute.progress = bars[k]
                return execute

            for k, stats in flow.parts(answerer):  # each stage as its last part is settled
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
        events.close()
    return entries


class Dataflow:
    """Which chunks are computed and when. Part i of stage k is due if its marker is not current (other settings,
    other input parts, failed rows to retry). It is computed chunk by chunk (`parts.chunks`): chunk j as soon as
    chunk j of each table it reads is there, read from a settled part or handed on in memory by the stage that
    computed it in this run; the part is written and marked when its last chunk is computed. A part whose marker
    is current but for its input, while that input is being computed again (it may come out the same), waits for
    its inputs to be settled and is decided then, as one stage after another would decide it.

    At most `width` chunks are in flight, a later stage's first, then by part and chunk; each is a coroutine on
    `loop` (the windows' event loop), so a chunk waiting for its answers holds no thread, and what blocks (grading,
    a part's files) runs on `width` threads beside it. This thread only decides. A failure stops new chunks, lets
    the running ones finish (their calls are paid for) and the parts they complete be written, and is raised."""

    def __init__(self, run: RunDir, plan: list[Planned], fingerprints: list[dict[str, Any]],
                 producer: dict[str, str], width: int, loop: asyncio.AbstractEventLoop) -> None:
        self.run, self.plan, self.producer, self.width, self.loop = run, plan, producer, max(1, width), loop
        self.fingerprints = [digest(f) for f in fingerprints]
        self.made_by = {table: k for k, p in enumerate(plan) for table in p.stage.writes}
        self.needs = [sorted({self.made_by[t] for t in p.stage.reads if t in self.made_by}) for p in plan]
        self.readers = [[later for later in range(len(plan)) if k in self.needs[later]] for k in range(len(plan))]
        self.handed = {t for p in plan for t in p.stage.reads if t in self.made_by}  # tables handed on in memory
        first = plan[0].stage.reads[0]
        self.count = run.part_count(first)
        for p in plan:  # a table read but made by none of the planned stages must be there in full
            for table in p.stage.reads:
                if table not in self.made_by and run.part_count(producer.get(table, table)) != self.count:
                    raise MissingFile(f"{run.path}: the input of stage {p.stage.name!r} ({', '.join(p.stage.reads)}) "
                                      f"is not finished; run the stages before it first")
        # chunks of several problems only where every stage reads the problems (an eval's items: one per part)
        self.chunked = all(PROBLEMS in p.stage.reads for p in plan)
        self._read: dict[tuple[str, int], list[Rows]] = {}  # (table, part): a settled part's rows, by chunk
        self._reading = threading.RLock()

    def record(self, k: int, index: int) -> dict[str, Any] | None:
        """The marker record of part `index` of stage `k` when it is due, else None (its marker is current)."""
        return due_record(self.run, self.plan[k].stage, index, self.fingerprints[k], self.producer)

    def due_whatever_its_input(self, k: int, index: int) -> bool:
        """Part `index` of stage k is due whatever its input parts turn out to be: no marker, failed rows, other
        settings."""
        marker = self.run.part_marker(self.plan[k].stage.table, index)
        return marker is None or bool(marker.get("failed")) or marker.get("fingerprint") != self.fingerprints[k]

    def read(self, table: str, index: int) -> list[Rows]:
        """A settled part of `table`, its rows by chunk (read once, by whichever thread needs it first)."""
        with self._reading:
            if (table, index) not in self._read:
                tables = {table: read_rows(self.run, table, index)}
                if self.chunked and table != PROBLEMS:
                    tables[PROBLEMS] = [row for rows in self.read(PROBLEMS, index) for row in rows]
                pieces = chunks(Part(index, tables)) if self.chunked else [Part(index, tables)]
                self._read[(table, index)] = [piece.tables[table] for piece in pieces]
            return self._read[(table, index)]

    def chunk_input(self, k: int, index: int, j: int) -> Part:
        tables = {}
        for table in self.plan[k].stage.reads:
            made = self.made_by.get(table)
            handed = self.handed_on[made][index] if made is not None else None
            tables[table] = handed[j][table] if handed is not None else self.read(table, index)[j]
        return Part(index, tables)

    def pieces(self, index: int) -> int:
        return chunks_in(self.run, index) if self.chunked else 1

    def parts(self, answerer: Callable[[int, int, int, CallStats], Answerer]) -> Iterator[tuple[int, CallStats]]:
        """Compute every due part, chunk by chunk, its chunks' model calls and grading answered by
        `answerer(k, part, chunk, stats)`; yields (k, its calls' figures) as stage k's last part is settled."""
        stages = len(self.plan)
        self.state: list[list[str | None]] = [[None] * self.count for _ in range(stages)]
        self.records: list[list[dict[str, Any] | None]] = [[None] * self.count for _ in range(stages)]
        # a part computed in this run: its chunks' rows (None until computed), until `release` drops them
        self.handed_on: list[list[list[Any] | None]] = [[None] * self.count for _ in range(stages)]
        self.pushed: list[list[set[int]]] = [[set() for _ in range(self.count)] for _ in range(stages)]
        self.left = [self.count] * stages
        self.complete: list[int] = [k for k in range(stages) if not self.count]
        stats = [CallStats() for _ in range(stages)]
        self.ready: list[tuple[int, int, int]] = []  # a heap of chunks: a later stage's first, then by part, chunk
        self.answerer = answerer
        self.done: queue.SimpleQueue[tuple[str, int, int, int, Any, CallStats, BaseException | None]] = \
            queue.SimpleQueue()
        self.in_flight: set[Future[Any]] = set()
        self.blocking = ThreadPoolExecutor(self.width, thread_name_prefix="intgen-part")
        self.failure: BaseException | None = None
        self.running = 0
        try:
            for k in range(stages):
                if not self.needs[k]:
                    for index in range(self.count):
                        self.consider(k, index)
            while True:
                yield from ((k, stats[k]) for k in self.complete)
                self.complete = []
                while self.ready and self.running < self.width and self.failure is None:
                    order, index, j = heapq.heappop(self.ready)
                    self.start(("chunk", -order, index, j))
                if self.complete:
                    continue
                if not self.running:
                    break
                kind, k, index, j, result, part_stats, exc = self.done.get()
                self.running -= 1
                stats[k].add(part_stats)
                if exc is not None:
                    self.failure = self.failure or exc
                elif kind == "chunk":
                    self.chunk_done(k, index, j, result)
                else:
                    self.settle(k, index)
            if self.failure is not None:
                raise self.failure
        finally:
            for future in list(self.in_flight):  # interrupted: nothing more is sent
                future.cancel()
            self.blocking.shutdown(wait=False, cancel_futures=True)

    def start(self, job: tuple[str, int, int, int]) -> None:
        """Start a job on the event loop; `done` hears of it, failed or not."""
        part_stats = CallStats()
        future = asyncio.run_coroutine_threadsafe(self.work(job, part_stats), self.loop)
        self.in_flight.add(future)
        self.running += 1

        def told(future: Future[Any]) -> None:
            self.in_flight.discard(future)
            exc = CancelledError() if future.cancelled() else future.exception()
            self.done.put((*job, None if exc is not None else future.result(), part_stats, exc))

        future.add_done_callback(told)

    async def work(self, job: tuple[str, int, int, int], part_stats: CallStats) -> Any:
        """One job: a chunk computed (its rows, those the next stages read as they would read them back from the
        part's file), or a part written (on a thread: it blocks)."""
        kind, k, index, j = job
        stage, settings = self.plan[k].stage, self.plan[k].settings
        if kind == "write":
            await self.loop.run_in_executor(self.blocking, self.write, k, index)
            return None
        execute = self.answerer(k, index, j, part_stats)
        execute.blocking = self.blocking
        rows = await compute_chunk(stage, settings, self.chunk_input(k, index, j), execute, key=(index, j))
        for table, schema in stage.writes.items():
            if table in self.handed:  # as the next stages would read them back from the part's file
                rows[table] = pl.DataFrame(rows[table], schema=schema).to_dicts()
        return rows

    def write(self, k: int, index: int) -> None:
        stage = self.plan[k].stage
        record = self.records[k][index] or {"fingerprint": self.fingerprints[k],
                                            "input": input_digest(self.run, stage, index, self.producer)}
        write_computed(self.run, stage, index, self.handed_on[k][index], record)

    def consider(self, k: int, index: int) -> None:
        """Part `index` of stage k: each stage it reads has settled the part or is computing it."""
        if all(self.state[n][index] == "settled" for n in self.needs[k]):
            record = self.record(k, index)
            if record is None:
                self.settle(k, index)
                return
            self.records[k][index] = record
        elif not self.due_whatever_its_input(k, index):
            self.state[k][index] = "deferred"
            return
        self.state[k][index] = "due"
        self.handed_on[k][index] = [None] * self.pieces(index)
        self.push_ready(k, index)

    def push_ready(self, k: int, index: int) -> None:
        """Queue the chunks of a due part whose inputs are all there."""
        for j in range(len(self.handed_on[k][index] or [])):
            if j not in self.pushed[k][index] and all(
                    self.state[n][index] == "settled" or (self.handed_on[n][index] or [None] * (j + 1))[j] is not None
                    for n in self.needs[k]):
                self.pushed[k][index].add(j)
                heapq.heappush(self.ready, (-k, index, j))

    def chunk_done(self, k: int, index: int, j: int, result: Any) -> None:
        self.handed_on[k][index][j] = result
        self.write_when_ready(k, index)
        self.follow(k, index)

    def write_when_ready(self, k: int, index: int) -> None:
        """A due part is written once all its chunks are computed and the parts it read are settled (its marker
        records theirs)."""
        if self.state[k][index] == "due" and all(piece is not None for piece in self.handed_on[k][index]) \
                and all(self.state[n][index] == "settled" for n in self.needs[k]):
            self.state[k][index] = "writing"
            self.start(("write", k, index, -1))  # beside the chunks in flight: it is short

    def follow(self, k: int, index: int) -> None:
        """Something of part `index` of stage k is there: the stages that read it may go on."""
        for later in range(k + 1, len(self.plan)):
            if k not in self.needs[later]:
                continue
            state = self.state[later][index]
            needs = [self.state[n][index] for n in self.needs[later]]
            if state is None and all(s in ("settled", "due", "writing") for s in needs) \
                    or state == "deferred" and all(s == "settled" for s in needs):
                self.consider(later, index)
            elif state == "due":
                self.push_ready(later, index)
                self.write_when_ready(later, index)

    def settle(self, k: int, index: int) -> None:
        """Part `index` of stage k is settled (written, or found current)."""
        self.state[k][index] = "settled"
        self.left[k] -= 1
        if not self.left[k]:
            self.complete.append(k)
        self.follow(k, index)
        self.release(index)

    def release(self, index: int) -> None:
        """Drop the rows of part `index` that no stage computing it now reads: a stage that starts on it later
        reads them back from the part's file, so memory stays bounded by what is being computed."""
        busy = {k for k, states in enumerate(self.state) if states[index] in ("due", "writing")}
        for n, rows in enumerate(self.handed_on):
            if rows[index] is not None and self.state[n][index] == "settled" and not busy & set(self.readers[n]):
                rows[index] = None
        with self._reading:
            for table, part in [key for key in self._read if key[1] == index]:
                if not any(table in self.plan[k].stage.reads for k in busy):
                    del self._read[(table, part)]


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

    def stage(self, name: str, parts: int, unit: str = "parts") -> StageProgress:
        shown = StageProgress(name, parts, self.enabled, bar=self.bar, unit=unit)
        self.stages.append(shown)
        return shown.__enter__()

    def __exit__(self, *exc: object) -> None:
        for shown in self.stages:
            shown.__exit__()
        if self.bar is not None:
            self.bar.stop()


class StageProgress:
    """What the user waits for: samples (model calls) and answers graded, with a rate and an ETA. The total
    grows as each part (or chunk: `unit`) says what it needs; those not yet started are estimated from the ones
    seen. On a terminal it is a live bar (`bar`: a display shared with other stages); elsewhere (a log file, CI) a
    line every `every` seconds. Parts of the stage report from several threads."""

    def __init__(self, stage: str, parts: int, enabled: bool, every: float = 30.0, bar: Progress | None = None,
                 unit: str = "parts") -> None:
        self.stage, self.parts, self.enabled, self.every, self.unit = stage, parts, enabled, every, unit
        self.done = self.known = 0
        self.parts_seen: set[Any] = set()
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

    def expect(self, part: Any, n: int) -> None:
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
                             rate=f"{self._rate():.2f}/s, {len(self.parts_seen)}/{self.parts} {self.unit}")
        elif self.enabled and time.monotonic() - self.logged >= self.every:
            self._log()

    def _log(self, final: bool = False) -> None:
        self.logged = time.monotonic()
        total = max(self.estimated_total(), self.done)
        rate = self._rate()
        eta = "" if final or not rate else f", about {format_seconds((total - self.done) / rate)} left"
        print(f"{self.stage}: {self.done}/{total} done ({len(self.parts_seen)}/{self.parts} {self.unit} started, "
              f"{rate:.2f}/s{eta})", file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
