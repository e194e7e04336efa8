"""The one protocol every model backend speaks.

A `Request` is a chat (optionally ending in an assistant message to *continue*), `n` samples, the
sampling parameters and an optional JSON schema the reply must follow. A backend turns a whole batch
of requests into completions in one call, so an engine can schedule them together. It may return
fewer completions than asked for a request (llama.cpp's server ignores `n`); `intgen.calls` asks
again for the missing ones and caches everything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

# finish reasons
STOP = "stop"
LENGTH = "length"  # hit max_tokens: the attempt is truncated
ERROR = "error"


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters (defaults: the InT paper's)."""

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int | None = 20
    max_tokens: int = 2048
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}


@dataclass(frozen=True)
class Request:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1
    continue_final: bool = False  # the last message is an assistant prefix to continue, as the same turn
    json_schema: str | None = None  # canonical JSON text of a schema the reply must follow

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def schema(self) -> dict[str, Any] | None:
        return None if self.json_schema is None else json.loads(self.json_schema)


def make_request(
    messages: list[dict[str, str]] | list[tuple[str, str]],
    sampling: Sampling | None = None,
    n: int = 1,
    continue_final: bool = False,
    json_schema: dict[str, Any] | None = None,
) -> Request:
    pairs = tuple((m["role"], m["content"]) if isinstance(m, dict) else (m[0], m[1]) for m in messages)
    if continue_final and (not pairs or pairs[-1][0] != "assistant"):
        raise ValueError("continue_final needs the last message to be the assistant's prefix")
    # Not key-sorted: property order is generation order for constrained decoders.
    schema = None if json_schema is None else json.dumps(json_schema, separators=(",", ":"))
    return Request(pairs, sampling or Sampling(), n, continue_final, schema)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # stop | length | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    true_continuation: bool = True  # False where the backend could only put the prefix in the prompt
    error: str | None = None
    cached: bool = False


class Backend(Protocol):
    kind: str  # "openai", "vllm", "gemini", "local"
    model: str
    supports_continuation: bool  # can it truly continue an assistant message?

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        """One list of completions per request, at most `request.n` each (fewer where the engine gave fewer)."""
        ...

    def close(self) -> None: ...


def error_completion(message: str) -> Completion:
    return Completion("", ERROR, error=message)


def share_usage(
    texts: list[tuple[str, str | None]], prompt_tokens: int, completion_tokens: int, true_continuation: bool = True
) -> list[Completion]:
    """Completions from one call's (text, finish reason) choices. The call's usage is shared out so that
    the parts add up to what the engine billed: the prompt to the first choice, completion tokens in
    proportion to length."""
    total_chars = sum(len(t) for t, _ in texts) or 1
    completions = []
    given = 0
    for index, (text, finish) in enumerate(texts):
        share = completion_tokens - given if index == len(texts) - 1 else round(completion_tokens * len(text) / total_chars)
        given += share
        reason = LENGTH if finish == "length" else STOP if finish in ("stop", "eos", None, "end_turn") else finish
        completions.append(
            Completion(text, reason or ERROR, prompt_tokens if index == 0 else 0, share, true_continuation)
        )
    return completions
