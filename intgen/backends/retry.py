"""What the HTTP backends share: retries with backoff that honour Retry-After, bounded concurrency,
and running a coroutine from synchronous code."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
)

T = TypeVar("T")


def retry_after_seconds(exc: BaseException | None) -> float | None:
    """The server's Retry-After (seconds or an HTTP date), if the error carries one."""
    headers = getattr(exc, "headers", None) or getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            from datetime import datetime, timezone

            return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
        except (TypeError, ValueError):
            return None


class BackoffWait:
    """Retry-After when the server sends one (capped), else exponential backoff with full jitter."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum

    def seconds(self, exc: BaseException | None, attempt: int) -> float:
        """How long to wait after try number `attempt` failed with `exc`."""
        told = retry_after_seconds(exc)
        if told is not None:
            return min(told, self.maximum)
        return random.uniform(0, min(self.maximum, self.initial * 2 ** (attempt - 1)))


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion, also from code that already runs an event loop (notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(result=asyncio.run(coro)))
    thread.start()
    thread.join()
    return box["result"]


async def retrying(
    call: Callable[[], Awaitable[T]], retryable: Callable[[BaseException], bool], max_tries: int, wait: BackoffWait
) -> T:
    """`await call()`, retried on retryable errors; the last error is raised after `max_tries` tries.

    The first try runs outside tenacity's loop: nearly every call succeeds at once, and building the loop cost the
    driver about a tenth of its CPU per request at thousands of requests a second (bench/scale.py)."""
    try:
        return await call()
    except Exception as exc:
        if max_tries <= 1 or not retryable(exc):
            raise
        await asyncio.sleep(wait.seconds(exc, 1))
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(retryable), stop=stop_after_attempt(max_tries - 1), reraise=True,
        wait=lambda state: wait.seconds(state.outcome.exception() if state.outcome else None, state.attempt_number + 1),
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity re-raises the last error")


async def bounded_gather(coroutines: list[Coroutine[Any, Any, T]], limit: int) -> list[T]:
    """Run the coroutines with at most `limit` in flight; results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def bounded(coroutine: Coroutine[Any, Any, T]) -> T:
        async with semaphore:
            return await coroutine

    return list(await asyncio.gather(*(bounded(c) for c in coroutines)))
