"""What a stage is. Each stage module (`sample`, `grade`, `propose`, `verify`) defines one `Stage`.

A stage works on one *part* at a time: the rows of the tables it reads for one batch of problems
(part `i` of every table covers the same problems). Its `compute` is a generator, pure and free of
I/O: it yields what it needs done — `ModelCalls` (requests for its model), `Chained` (first turns and the
second turns made from each) or `Grading` (answers to check) — receives the results, and finally returns the
rows it writes, table by table. The driver (`intgen.driver`) does the rest: fingerprints, resume, the call
cache, atomic writes, the manifest, progress. A stage can be tested alone by driving its generator with plain data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from intgen.backends.base import Completion, Request
from intgen.grading import Verdict

Rows = list[dict[str, Any]]
Schema = Mapping[str, Any]  # column name -> polars type


@dataclass(frozen=True)
class ModelCalls:
    """Ask the driver to send these requests to the stage's model (through the cache)."""

    requests: list[Request]


@dataclass(frozen=True)
class Chained:
    """Ask for the `first` requests and, as soon as each is answered, for the requests `then(i, its completions)`
    builds from it (a second turn that continues the first): no second turn waits for another's first. Answered
    with, for each first request, (its completions, the completions of each request `then` made for it)."""

    first: list[Request]
    then: Callable[[int, list[Completion]], list[Request]]


@dataclass(frozen=True)
class Grading:
    """Ask the driver to grade these items: (gold answer, text, how to find the answer in the text:
    `grading.BARE`, `BOXED` or `LENIENT`), each in a time-limited worker."""

    items: list[tuple[str, str | None, str]]


Ask = ModelCalls | Chained | Grading
Answer = list[list[Completion]] | list[tuple[list[Completion], list[list[Completion]]]] | list[Verdict]
Compute = Generator[Ask, Answer, dict[str, Rows]]


@dataclass(frozen=True)
class Part:
    """One part of the tables a stage reads, as rows, by table name."""

    index: int
    tables: dict[str, Rows]

    def problems(self) -> dict[str, dict[str, Any]]:
        return {row["problem_id"]: row for row in self.tables.get("problems", [])}


@dataclass(frozen=True)
class Stage:
    """A stage: the tables it reads and writes (each part by part), and its pure logic.

    - `name`: the command that runs it, and its key in the manifest.
    - `reads`: the tables it reads, part `i` of each for its part `i`.
    - `writes`: the tables it writes, with their schemas; the first is its main table.
    - `fingerprint(settings)`: the settings that decide its output (a changed one is refused unless forced).
    - `compute(part, settings)`: the generator described above.
    - `summarize(tables, settings)`: the figures the manifest records, from the whole finished tables.
    - `failures(frame)`: the stage's own failed rows in a part of its main table, by kind (a part with any is
      computed again on the next run); by default, the rows with an `error`.
    - `work(part, settings)`: how many units progress counts for a part (model samples, or answers graded
      for a stage without a model), known before it starts; None: counted as the stage asks.
    - `sends`: the kinds of request it sends beyond plain chats, "schema" (a JSON schema) and "continuation"
      (an assistant message continued): the backend settings about those are part of its fingerprint.
    """

    name: str
    reads: tuple[str, ...]
    writes: dict[str, Schema]
    fingerprint: Callable[[Any], dict[str, Any]]
    compute: Callable[[Part, Any], Compute]
    summarize: Callable[[dict[str, pl.LazyFrame], Any], dict[str, Any]]
    uses_model: bool = True
    failures: Callable[[pl.DataFrame], dict[str, int]] = field(default_factory=lambda: count_failures)
    work: Callable[[Part, Any], int] | None = None
    sends: tuple[str, ...] = ()

    @property
    def table(self) -> str:
        return next(iter(self.writes))


def count_failures(frame: pl.DataFrame, prefix: str = "") -> dict[str, int]:
    """Rows with an `error` (starting with `prefix`), by kind: the error's text before its first colon."""
    if "error" not in frame.columns:
        return {}
    # in Python: a polars filter costs ~0.5 ms of CPU per call (its thread pool), a part's rows are few
    return dict(Counter(e.split(":")[0] for e in frame["error"].to_list() if e is not None and e.startswith(prefix)))


def drive(compute: Compute, answer: Callable[[Ask], Answer]) -> dict[str, Rows]:
    """Drive a stage's generator to its end, answering each ask with `answer(ask)` (the driver's executor)."""
    try:
        ask = next(compute)
        while True:
            ask = compute.send(answer(ask))
    except StopIteration as done:
        return done.value


async def adrive(compute: Compute, answer: Callable[[Ask], Awaitable[Answer]]) -> dict[str, Rows]:
    """`drive` on an event loop: each ask answered by awaiting `answer(ask)`."""
    try:
        ask = next(compute)
        while True:
            ask = compute.send(await answer(ask))
    except StopIteration as done:
        return done.value


def run_by_hand(compute: Compute, answer: Callable[[Ask], Answer]) -> dict[str, Rows]:
    """`drive` with an `answer` that knows only `ModelCalls` and `Grading`: a `Chained` ask is answered as its first
    requests' `ModelCalls`, then each one's second turns' (one after another)."""
    return drive(compute, lambda ask: _chained_by_hand(ask, answer) if isinstance(ask, Chained) else answer(ask))


def _chained_by_hand(ask: Chained, answer: Callable[[Ask], Answer]) -> Answer:
    chains = []
    for k, first in enumerate(answer(ModelCalls(ask.first))):
        then = ask.then(k, first)  # type: ignore[arg-type]
        chains.append((first, answer(ModelCalls(then)) if then else []))
    return chains  # type: ignore[return-value]
