"""Send a batch of requests through the cache: hits never reach the backend, misses are sent once.

A backend may return fewer samples than asked (llama.cpp's server, Ollama and LM Studio ignore `n`);
once one does, every missing sample is asked for on its own, with the seed moved on by its index so
they differ. A request that fails after the backend's own
retries comes back as error completions, is counted, and is not cached, so a rerun tries it again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any

from intgen.backends.base import Backend, Completion, Request, error_completion, repair_text
from intgen.cache import CallCache, sample_keys

log = logging.getLogger("intgen")
MAX_ROUNDS = 4  # asks for missing samples of one request, in all (after the first short answer, one at a time)


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input: float
    output: float


COUNTS = ("samples", "cache_hits", "requests_sent", "prompt_tokens", "completion_tokens", "cached_prompt_tokens",
          "seconds")  # what CallStats adds up


@dataclass
class CallStats:
    samples: int = 0  # samples asked for
    cache_hits: int = 0
    requests_sent: int = 0  # calls that reached the backend
    prompt_tokens: int = 0  # tokens of calls that reached the backend (what was paid for)
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, those the server's prefix cache served (where it says)
    failures: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallStats:
        """Totals saved by `to_dict` (the manifest), to add a new run's calls to."""
        stats = cls(failures=Counter(data.get("failures", {})))
        for name in COUNTS:
            setattr(stats, name, data.get(name, 0))
        return stats

    def add(self, other: CallStats) -> None:
        for name in COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures.update(other.failures)

    def cost(self, price: Price | None) -> float | None:
        if price is None:
            return None
        return (self.prompt_tokens * price.input + self.completion_tokens * price.output) / 1e6

    def to_dict(self, price: Price | None = None) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "cache_hits": self.cache_hits,
            "requests_sent": self.requests_sent,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "failures": dict(self.failures),
            "seconds": round(self.seconds, 3),
            "cost_usd": self.cost(price),
        }


def run_requests(
    backend: Backend, requests: list[Request], cache: CallCache | None, stats: CallStats | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[list[Completion]]:
    """`request.n` completions for every request, in order; cached samples are not sent again, and
    identical requests in one batch are sent once. Each answer is written to the cache as soon as it
    arrives, so a killed run keeps what it was paid for. `progress(k)` is told of every k samples done."""
    rounds = _rounds(backend, requests, cache, stats if stats is not None else CallStats(), progress)
    try:
        asks, arrived = next(rounds)
        while True:
            backend.generate(asks, on_done=arrived)
            asks, arrived = rounds.send(None)
    except StopIteration as done:
        return done.value


async def arun_requests(
    backend: Any, requests: list[Request], cache: CallCache | None, stats: CallStats | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[list[Completion]]:
    """`run_requests` on the event loop of a backend that is awaited (`backend.agenerate`: a window's lane)."""
    rounds = _rounds(backend, requests, cache, stats if stats is not None else CallStats(), progress)
    try:
        asks, arrived = next(rounds)
        while True:
            await backend.agenerate(asks, on_done=arrived)
            asks, arrived = rounds.send(None)
    except StopIteration as done:
        return done.value


Rounds = Generator[tuple[list[Request], Callable[[int, list[Completion]], None]], None, list[list[Completion]]]


def _rounds(backend: Backend, requests: list[Request], cache: CallCache | None, stats: CallStats,
            progress: Callable[[int], None] | None) -> Rounds:
    """What `run_requests` sends, round by round: yields (the requests to send, what to call as each is
    answered) and, once every sample is there or given up, returns the completions."""
    unique = list(dict.fromkeys(requests))
    if len(unique) < len(requests):
        answers = dict(zip(unique, (yield from _rounds(backend, unique, cache, stats, progress))))
        return [answers[r] for r in requests]
    started = time.monotonic()
    keys = [sample_keys(backend.kind, backend.model, r, backend.reply_settings) for r in requests]
    hits = cache.get_many([k for ks in keys for k in ks]) if cache is not None else {}
    results: list[list[Completion | None]] = [[hits.get(k) for k in ks] for ks in keys]
    stats.samples += sum(r.n for r in requests)
    stats.cache_hits += len(hits)
    if progress and hits:
        progress(len(hits))
    one_at_a_time = False  # set once the engine is seen to return fewer samples than asked (ignores `n`)
    for _ in range(MAX_ROUNDS):
        todo = [(i, [j for j, c in enumerate(row) if c is None]) for i, row in enumerate(results)]
        asks = [(i, [j]) for i, missing in todo for j in missing] if one_at_a_time else [t for t in todo if t[1]]
        if not asks:
            break
        stats.requests_sent += len(asks)
        fewer = False

        def arrived(k: int, completions: list[Completion], asks: list[tuple[int, list[int]]] = asks) -> None:
            nonlocal fewer
            i, missing = asks[k]
            fewer |= 0 < len(completions) < len(missing)
            _record(backend, cache, stats, results[i], keys[i], missing, completions)
            if progress:
                progress(len(completions) if completions and completions[0].error is None else len(missing))

        yield [_ask_for(requests[i], missing) for i, missing in asks], arrived
        one_at_a_time = one_at_a_time or fewer
    short = error_completion("too_few_samples: the engine returned fewer samples than asked for")
    missing = sum(c is None for row in results for c in row)
    if missing:
        stats.failures["too_few_samples"] += missing
    final = [[c if c is not None else short for c in row] for row in results]
    stats.seconds += time.monotonic() - started
    return final


def _record(backend: Backend, cache: CallCache | None, stats: CallStats, row: list[Completion | None],
            keys: list[str], missing: list[int], completions: list[Completion]) -> None:
    """Put one answer in its slots (a failure in every slot it was asked for) and in the cache."""
    failed = next((c for c in completions if c.error is not None), None)
    if failed is not None:
        for j in missing:
            row[j] = failed
        kind = _failure_kind(failed.error)
        if not stats.failures[kind]:  # say it once per kind, as it happens; the summary counts them all
            log.warning("a request to %s was given up (%s); the run goes on, and a rerun retries it",
                        backend.model, (failed.error or "")[:200])
        stats.failures[kind] += len(missing)
        return
    # every backend's text can be stored (a lone surrogate would stop the cache's insert), and no count is negative
    completions = [c if (text := repair_text(c.text)) == c.text and c.prompt_tokens >= 0 and c.completion_tokens >= 0
                   else replace(c, text=text, prompt_tokens=max(0, c.prompt_tokens),
                                completion_tokens=max(0, c.completion_tokens)) for c in completions]
    for j, completion in zip(missing, completions):
        row[j] = completion
        stats.prompt_tokens += completion.prompt_tokens
        stats.completion_tokens += completion.completion_tokens
        stats.cached_prompt_tokens += completion.cached_prompt_tokens
    if cache is not None:
        cache.put_many([(keys[j], c) for j, c in zip(missing, completions)], backend.kind, backend.model)


def _ask_for(request: Request, missing: list[int]) -> Request:
    """The request for the missing samples; a fixed seed moves with the first missing index, so that
    samples asked for one at a time still differ (and are the same on every run)."""
    seed = request.sampling.seed
    sampling = request.sampling if seed is None else replace(request.sampling, seed=seed + missing[0])
    return replace(request, n=len(missing), sampling=sampling)


def _failure_kind(error: str | None) -> str:
    return (error or "error").split(":", 1)[0]
