"""One backend's window: the requests of every part and stage in flight go to it together.

A GPU server decodes hundreds of sequences at once and queues what it cannot run yet; it is idle only when the
client has nothing in flight. So the driver computes several chunks (of several parts and stages) at once, each a
coroutine on one event loop, and they all send through one `Window` per backend, which keeps the backend's queue
full:

- a backend with an `answer(request)` coroutine (the HTTP backends) gets each request as a task on the window's
  event loop, with at most `size` samples in flight (its `window`; a request for n samples holds n of a server's
  slots): the moment one returns, the next waiting request goes out, whichever part or stage it comes from;
- any other backend (an engine in this process) gets what is waiting (up to `size` samples) as one batch, as soon
  as its previous batch returns: an engine that batches schedules them together.

The window is counted in samples, not requests, and kept near what the servers decode at once: what it holds
beyond that waits in the server's own queue, first come first served, where no priority reaches it.

Which waiting request goes first: the one of the earliest stage, then of the lowest part (`lane(priority)`). So
the attempts are all sampled as early as they can be, a part's next stage fills the server while the later parts
still sample (their requests wait behind the earlier parts'), and what is left at the end is the last stage's
short continuations: the server drains once, at the very end.

A `Window` speaks the backend protocol itself (`generate` from any thread, answers in order, `on_done` as each
arrives, on the window's thread), so `calls.run_requests` and the stages see no difference; `agenerate` is the same
awaited on the window's loop (`calls.arun_requests`: the driver's chunks). It does not close the backend: whoever
made the backend does.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from intgen.backends.base import Backend, Completion, OnDone, Request

T = TypeVar("T")

SYNC_BATCH = 1024  # at most this many samples in one batch to an in-process engine


class Window:
    def __init__(self, backend: Backend, size: int | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        """`loop`: an event loop running in another thread (`EventLoop`), shared with other windows and with the
        driver's chunks; by default the window runs its own."""
        self.backend = backend
        self.kind, self.model = backend.kind, backend.model
        self.supports_continuation = backend.supports_continuation
        self.token_counts = getattr(backend, "token_counts", "estimated")
        self.streams = callable(getattr(backend, "answer", None))
        self.size = size or getattr(backend, "window", None) or (256 if self.streams else SYNC_BATCH)
        self._closed = False
        self._order = itertools.count()  # first come, first served within one priority
        self._waiting: list[Any] = []  # a heap: (priority, order, ...)
        self._own_loop = EventLoop() if self.streams and loop is None else None
        self._loop = loop or (self._own_loop.loop if self._own_loop is not None else None)
        self._in_flight = 0
        self._thread: threading.Thread | None = None
        if not self.streams:
            self._wake = threading.Condition()
            self._thread = threading.Thread(target=self._batches, name="intgen-window", daemon=True)
            self._thread.start()

    @property
    def reply_settings(self) -> dict[str, Any]:
        return self.backend.reply_settings

    def __repr__(self) -> str:
        return f"Window({self.backend!r}, size={self.size})"

    def lane(self, priority: tuple[int, ...]) -> Lane:
        """The window as seen by one part: its requests wait behind those of a smaller `priority`."""
        return Lane(self, priority)

    def generate(self, requests: list[Request], on_done: OnDone | None = None,
                 priority: tuple[int, ...] = ()) -> list[list[Completion]]:
        """Every request's completions, in order, waiting beside whatever other threads sent."""
        if self._closed:
            raise RuntimeError("this window is closed")
        if not requests:
            return []
        if self.streams:  # one hand-off to the loop and one back, however many requests (each wakes a thread)
            return asyncio.run_coroutine_threadsafe(self.agenerate(requests, on_done, priority), self._loop).result()
        futures = [self.submit(request, on_done, index, priority) for index, request in enumerate(requests)]
        return [future.result() for future in futures]

    async def agenerate(self, requests: list[Request], on_done: OnDone | None = None,
                        priority: tuple[int, ...] = ()) -> list[list[Completion]]:
        """`generate` awaited on the loop this window shares (`loop`); `on_done` is called on that loop too."""
        if not requests:
            return []
        if self.streams:
            answers = [self._answer(request, on_done, index, priority) for index, request in enumerate(requests)]
        else:
            answers = [self._awaited(self.submit(request, None, index, priority), on_done, index)
                       for index, request in enumerate(requests)]
        return await gather_all(answers)  # a failed request cancels none of the others: they are paid for, cached

    @staticmethod
    async def _awaited(future: Future[list[Completion]], on_done: OnDone | None, index: int) -> list[Completion]:
        """An in-process engine's answer, told to `on_done` on the awaiting loop (not the engine's thread)."""
        completions = await asyncio.wrap_future(future)
        if on_done is not None:
            on_done(index, completions)
        return completions

    def submit(self, request: Request, on_done: OnDone | None = None, index: int = 0,
               priority: tuple[int, ...] = ()) -> Future[list[Completion]]:
        """Send one request when the window has room; `on_done(index, completions)` when it is answered."""
        if self.streams:
            return asyncio.run_coroutine_threadsafe(self._answer(request, on_done, index, priority), self._loop)
        future: Future[list[Completion]] = Future()
        with self._wake:
            heapq.heappush(self._waiting, (priority, next(self._order), request, future, on_done, index))
            self._wake.notify()
        return future

    async def _answer(self, request: Request, on_done: OnDone | None, index: int,
                      priority: tuple[int, ...]) -> list[Completion]:
        units = min(request.n, self.size)  # a request for n samples holds n of the server's slots
        if self._waiting or self._in_flight + units > self.size:  # wait for room, the smallest priority first
            turn = self._loop.create_future()
            heapq.heappush(self._waiting, (priority, next(self._order), units, turn))
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # cancelled once given room it will not use: hand it on
                    self._in_flight -= units
                    self._pass_on()
                raise
        else:
            self._in_flight += units
        try:
            completions = await self.backend.answer(request)  # type: ignore[attr-defined]
        finally:
            self._in_flight -= units
            self._pass_on()
        if on_done is not None:
            on_done(index, completions)
        return completions

    def _pass_on(self) -> None:
        """Room was made: it goes to the first waiting requests that fit (the event loop's thread only)."""
        while self._waiting and self._in_flight + self._waiting[0][2] <= self.size:
            _, _, units, turn = heapq.heappop(self._waiting)
            if not turn.cancelled():
                self._in_flight += units
                turn.set_result(None)

    def _batches(self) -> None:
        """The in-process engine's thread: each batch is everything waiting when the previous one returned."""
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if self._closed and not self._waiting:
                    return
                batch, units = [], 0
                while self._waiting and (not batch or units + self._waiting[0][2].n <= self.size):
                    units += self._waiting[0][2].n
                    batch.append(heapq.heappop(self._waiting)[2:])
            self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[Request, Future[list[Completion]], OnDone | None, int]]) -> None:
        def arrived(k: int, completions: list[Completion]) -> None:
            _, future, on_done, index = batch[k]
            if future.done():
                return
            try:
                if on_done is not None:
                    on_done(index, completions)
            except BaseException as exc:  # the caller's own failure (a full disk): theirs to raise
                future.set_exception(exc)
                return
            future.set_result(completions)

        try:
            answers = self.backend.generate([request for request, *_ in batch], on_done=arrived)
            for k, completions in enumerate(answers):  # a backend that did not say each as it arrived
                arrived(k, completions)
        except BaseException as exc:  # the engine failed (or the process is being killed): every waiter hears it
            for _, future, _, _ in batch:
                if not future.done():
                    future.set_exception(exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.streams:
            closing = getattr(self.backend, "aclose", None)
            if callable(closing):
                asyncio.run_coroutine_threadsafe(closing(), self._loop).result(timeout=30)
            if self._own_loop is not None:
                self._own_loop.close()
        else:
            with self._wake:
                self._wake.notify_all()
            if self._thread is not None:
                self._thread.join(timeout=30)


class Lane:
    """One chunk's view of a window: `agenerate` (what `calls.arun_requests` awaits), its requests sent at the
    chunk's priority."""

    def __init__(self, window: Window, priority: tuple[int, ...]) -> None:
        self.window, self.priority = window, priority
        self.kind, self.model = window.kind, window.model
        self.supports_continuation, self.token_counts = window.supports_continuation, window.token_counts
        self.reply_settings = window.reply_settings

    async def agenerate(self, requests: list[Request], on_done: OnDone | None = None) -> list[list[Completion]]:
        return await self.window.agenerate(requests, on_done, self.priority)

    def close(self) -> None:
        pass


async def gather_all(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Every coroutine's result, in order, once all are done; the first failure is raised only then (each one
    read, so asyncio logs none as never retrieved)."""
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        raise failed
    return results  # type: ignore[return-value]


class EventLoop:
    """An asyncio event loop running in a thread of its own, until `close`."""

    def __init__(self, name: str = "intgen-window") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.loop.close()
