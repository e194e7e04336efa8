"""Send a batch of requests through the cache: hits never reach the backend, misses are sent once.

A backend may return fewer samples than asked (llama.cpp's server ignores `n`); the missing ones are
asked for again, with the seed moved on so they differ. A request that fails after the backend's own
retries comes back as error completions, is counted, and is not cached, so a rerun tries it again.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from intgen.backends.base import Backend, Completion, Request, error_completion
from intgen.cache import CallCache, sample_key

MAX_ROUNDS = 4  # asks for missing samples of one request, in all


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input: float
    output: float


@dataclass
class CallStats:
    samples: int = 0  # samples asked for
    cache_hits: int = 0
    requests_sent: int = 0  # calls that reached the backend
    prompt_tokens: int = 0  # tokens of calls that reached the backend (what was paid for)
    completion_tokens: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallStats:
        """Totals saved by `to_dict` (the manifest), to add a new run's calls to."""
        stats = cls(failures=Counter(data.get("failures", {})))
        for name in ("samples", "cache_hits", "requests_sent", "prompt_tokens", "completion_tokens", "seconds"):
            setattr(stats, name, data.get(name, 0))
        return stats

    def add(self, other: CallStats) -> None:
        for name in ("samples", "cache_hits", "requests_sent", "prompt_tokens", "completion_tokens", "seconds"):
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
            "failures": dict(self.failures),
            "seconds": round(self.seconds, 3),
            "cost_usd": self.cost(price),
        }


def run_requests(
    backend: Backend, requests: list[Request], cache: CallCache | None, stats: CallStats | None = None
) -> list[list[Completion]]:
    """`request.n` completions for every request, in order; cached samples are not sent again, and
    identical requests in one batch are sent once."""
    stats = stats if stats is not None else CallStats()
    unique = list(dict.fromkeys(requests))
    if len(unique) < len(requests):
        answers = dict(zip(unique, run_requests(backend, unique, cache, stats)))
        return [answers[r] for r in requests]
    started = time.monotonic()
    keys = [[sample_key(backend.kind, backend.model, r, i) for i in range(r.n)] for r in requests]
    hits = cache.get_many([k for ks in keys for k in ks]) if cache is not None else {}
    results: list[list[Completion | None]] = [[hits.get(k) for k in ks] for ks in keys]
    stats.samples += sum(r.n for r in requests)
    stats.cache_hits += len(hits)

    for _ in range(MAX_ROUNDS):
        todo = [(i, [j for j, c in enumerate(row) if c is None]) for i, row in enumerate(results)]
        todo = [(i, missing) for i, missing in todo if missing]
        if not todo:
            break
        sent = [_ask_for(requests[i], missing) for i, missing in todo]
        stats.requests_sent += len(sent)
        for (i, missing), completions in zip(todo, backend.generate(sent)):
            if any(c.error is not None for c in completions):
                failed = next(c for c in completions if c.error is not None)
                for j in missing:
                    results[i][j] = failed
                stats.failures[_failure_kind(failed.error)] += len(missing)
                continue
            for j, completion in zip(missing, completions):
                results[i][j] = completion
                stats.prompt_tokens += completion.prompt_tokens
                stats.completion_tokens += completion.completion_tokens
                if cache is not None:
                    cache.put(keys[i][j], backend.kind, backend.model, completion)
    short = error_completion("too_few_samples: the engine returned fewer samples than asked for")
    missing = sum(c is None for row in results for c in row)
    if missing:
        stats.failures["too_few_samples"] += missing
    final = [[c if c is not None else short for c in row] for row in results]
    stats.seconds += time.monotonic() - started
    return final


def _ask_for(request: Request, missing: list[int]) -> Request:
    """The request for the missing samples; a fixed seed moves with the first missing index."""
    seed = request.sampling.seed
    sampling = request.sampling if seed is None else replace(request.sampling, seed=seed + missing[0])
    return replace(request, n=len(missing), sampling=sampling)


def _failure_kind(error: str | None) -> str:
    return (error or "error").split(":", 1)[0]
