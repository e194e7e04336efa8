"""Computing one part of a stage: its stage's generator driven to its end chunk by chunk, each chunk a coroutine on
an event loop, each ask answered (model calls through the call cache, a second turn as soon as its first is
answered, grading in worker processes), and its tables written and marked finished. The executors (`intgen.driver`
here, `intgen.ray_executor` on Ray actors) decide which parts, where and when; this is what each of them does with
a part.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import polars as pl

from intgen.backends.base import Completion
from intgen.cache import CallCache
from intgen.calls import CallStats, arun_requests
from intgen.grading import DEFAULT_TIMEOUT_S, grade_items
from intgen.rundir import RunDir
from intgen.stages import Answer, Ask, Chained, Grading, ModelCalls, Part, Rows, Stage, adrive
from intgen.window import gather_all


@dataclass(frozen=True)
class Grader:
    """How the driver grades: worker processes and the per-item time limit."""

    workers: int | None = 2
    timeout: float = DEFAULT_TIMEOUT_S


def read_rows(run: RunDir, table: str, index: int) -> Rows:
    return pl.read_parquet(run.part_path(table, index)).to_dicts()


def read_part(run: RunDir, stage: Stage, index: int) -> Part:
    return Part(index, {table: read_rows(run, table, index) for table in stage.reads})


class Answerer:
    """Answers a chunk's asks on an event loop, without a thread of its own: model calls through the cache on a
    window's lane (`agenerate`), each chain's second turns as soon as its first is answered, grading (which
    blocks) on `blocking`, an executor (None: the loop's default), in worker processes here or as Ray tasks
    (`grade`). `progress`: a `StageProgress`, or anything with `expect` and `advance(n)`."""

    def __init__(self, run: RunDir, backend: Any, grader: Grader, stats: CallStats,
                 cache: CallCache | None = None, grade: Callable[..., list[Any]] = grade_items) -> None:
        self.run, self.backend, self.grader, self.stats = run, backend, grader, stats
        self.cache = cache if cache is not None else run.cache
        self.grade = grade
        self.progress: Any = None
        self.blocking: Executor | None = None

    async def __call__(self, ask: Ask) -> Answer:
        # progress counts a model stage's samples, and a stage without a model's answers graded
        calls = isinstance(ask, (ModelCalls, Chained))
        counted = self.progress if calls is (self.backend is not None) else None
        advance = counted.advance if counted is not None else None
        if calls and self.backend is None:
            raise RuntimeError("this stage asked for model calls but was given no backend")
        if isinstance(ask, ModelCalls):
            return await arun_requests(self.backend, ask.requests, self.cache, self.stats, advance)
        if isinstance(ask, Chained):
            return await self.chained(ask, advance)
        if isinstance(ask, Grading):
            grade = functools.partial(self.grade, ask.items, workers=self.grader.workers, timeout=self.grader.timeout)
            verdicts = await asyncio.get_running_loop().run_in_executor(self.blocking, grade)
            if advance is not None:
                advance(len(ask.items))
            return verdicts
        raise TypeError(f"unknown ask {type(ask).__name__}")

    async def chained(self, ask: Chained, progress: Callable[[int], None] | None) -> Answer:
        """Each first request and then its second turns, every chain side by side: a second turn goes out as soon
        as its own first turn is answered. Every chain runs to its end (its calls are paid for) before a failure
        is raised."""

        async def chain(k: int) -> tuple[list[Completion], list[list[Completion]]]:
            first = (await arun_requests(self.backend, [ask.first[k]], self.cache, self.stats, progress))[0]
            then = ask.then(k, first)
            return first, (await arun_requests(self.backend, then, self.cache, self.stats, progress)) if then else []

        return await gather_all([chain(k) for k in range(len(ask.first))])  # type: ignore[return-value]


CHUNK = 16  # problems per chunk: what a stage computes at a time and hands on (a part is written when all its are)


def chunks(part: Part) -> list[Part]:
    """The part's problems in chunks of CHUNK, each with the rows of every table about them, in the part's order.
    A stage computes a part chunk by chunk (side by side), its rows the chunks' one after another: what it
    computes per problem is the same, and the parts it writes are the same whichever executor and schedule.
    A part without a problems table (an eval's items) is one chunk."""
    problems = part.tables.get("problems")
    if problems is None or len(problems) <= CHUNK:
        return [part]
    chunk_of = {row["problem_id"]: n // CHUNK for n, row in enumerate(problems)}
    pieces: list[dict[str, Rows]] = [{name: [] for name in part.tables} for _ in range(-(-len(problems) // CHUNK))]
    for name, rows in part.tables.items():
        for row in rows:
            pieces[chunk_of[row["problem_id"]]][name].append(row)
    return [Part(part.index, tables) for tables in pieces]


def chunks_in(run: RunDir, index: int) -> int:
    """The chunks of part `index` of a run (from its problems part's row count, not its rows); 1 where the run has
    no problems table."""
    path = run.part_path("problems", index)
    if not path.exists():
        return 1
    return max(1, -(-pl.scan_parquet(path).select(pl.len()).collect().item() // CHUNK))


def chunks_per_part(run: RunDir) -> int:
    """The chunks of a run's full part (its first)."""
    return chunks_in(run, 0)


async def compute_chunk(stage: Stage, settings: Any, chunk: Part, execute: Answerer,
                        key: Any = None) -> dict[str, Rows]:
    """A stage's rows for one chunk (its model calls and grading answered by `execute`); progress expects its work
    under `key` (default: its part)."""
    if execute.progress is not None and stage.work is not None:
        execute.progress.expect(chunk.index if key is None else key, stage.work(chunk, settings))
    return await adrive(stage.compute(chunk, settings), execute)


def write_computed(run: RunDir, stage: Stage, index: int, outputs: list[dict[str, Rows]],
                   record: dict[str, Any]) -> None:
    """Write part `index` of a stage's tables from its chunks' rows (in order) and mark it finished."""
    frames = {name: pl.DataFrame([row for out in outputs for row in out[name]], schema=schema)
              for name, schema in stage.writes.items()}
    for name, frame in frames.items():
        run.write_part(name, index, frame)
    run.finish_part(stage.table, index, list(frames), record | {"failed": stage.failures(frames[stage.table])})


async def compute_part(run: RunDir, stage: Stage, settings: Any, index: int, execute: Answerer,
                       record: dict[str, Any]) -> int:
    """Compute part `index` of a stage, its chunks side by side, and write it, marked finished; returns its units
    of work. Every chunk finishes (its calls are paid for) before a failure is raised."""
    pieces = chunks(read_part(run, stage, index))
    work = sum(stage.work(piece, settings) for piece in pieces) if stage.work is not None else 0
    outputs = await gather_all([compute_chunk(stage, settings, piece, execute) for piece in pieces])
    await asyncio.get_running_loop().run_in_executor(execute.blocking, write_computed, run, stage, index, outputs,
                                                     record)
    return work
