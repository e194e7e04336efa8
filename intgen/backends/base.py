"""The one protocol every model backend speaks.

A `Request` is a chat (optionally ending in an assistant message to *continue*), `n` samples, the
sampling parameters and an optional JSON schema the reply must follow. A backend turns a whole batch
of requests into completions in one call, so an engine can schedule them together. It may return
fewer completions than asked for a request (llama.cpp's server ignores `n`); `intgen.calls` asks
again for the missing ones and caches everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

log = logging.getLogger("intgen")

# finish reasons
STOP = "stop"
LENGTH = "length"  # hit max_tokens: the attempt is truncated
ERROR = "error"
TOO_LONG = "too_long"  # the prompt (with its prefix) does not fit the model's context: a final outcome, not a failure

# What servers say for "the model ended its turn" and "the token limit cut it" (OpenAI, vLLM, llama.cpp,
# Anthropic-style gateways, Gemini); any other reason is kept as it is, and warned of once.
STOP_REASONS = frozenset({None, "stop", "eos", "end_turn", "stop_sequence", "STOP", "FINISH_REASON_STOP"})
LENGTH_REASONS = frozenset({"length", "max_tokens", "MAX_TOKENS", "max_output_tokens", "model_length",
                            "FINISH_REASON_MAX_TOKENS"})
_warned_reasons: set[str] = set()
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class BadReply(ValueError):
    """A reply that is not an answer (a choice without a message, `content: null`, `finish_reason: "error"`,
    nonsense fields): a failed call, retried, never cached."""


def finish_reason(raw: Any) -> str:
    """A server's finish reason in intgen's words: stop, length, or the server's own (warned of once)."""
    if raw in STOP_REASONS:
        return STOP
    if raw in LENGTH_REASONS:
        return LENGTH
    if raw == ERROR:
        raise BadReply('finish_reason "error"')
    reason = str(raw)
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        log.warning("a server gave the finish reason %r, which intgen does not know: kept as it is, so such a reply "
                    "counts as neither finished nor truncated", reason)
    return reason


def repair_text(text: str) -> str:
    """A reply's text that can be stored: a lone surrogate (an emoji cut between two tokens, sent as `"\\ud83d"`)
    becomes U+FFFD, as a UTF-8 decoder would make it."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def usage_count(value: Any, what: str) -> int:
    """A token count from a reply's `usage`; nonsense (negative, not a number) counts 0, with a warning."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        log.warning("a server reported %s = %r; ignored (counted as 0)", what, value)
        return 0
    return int(value)


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
        # every field, shallowly (dataclasses.asdict deep-copies: a cost on every request's cache key)
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "stop": list(self.stop)}


@dataclass(frozen=True)
class Request:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1
    continue_final: bool = False  # the last message is an assistant prefix to continue, as the same turn
    json_schema: str | None = None  # canonical JSON text of a schema the reply must follow
    # Which independent draw this is (e.g. "verify/problem-only"): requests alike in all else but their draw are
    # answered independently, never from each other's cache. Not sent to the engine.
    draw: str = ""

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def schema(self) -> dict[str, Any] | None:
        return None if self.json_schema is None else json.loads(self.json_schema)

    def affinity(self) -> str:
        """What requests that share a long prompt prefix have in common: the conversation up to its first user
        message (a problem's attempts, its continuations and baselines; an attempt's two proposer turns). Several
        servers are picked by it, so that one server's prefix cache serves the shared prefix."""
        head = []
        for role, content in self.messages:
            head.append(f"{role}\x00{content}")
            if role == "user":
                break
        return hashlib.sha256("\x01".join(head).encode()).hexdigest()


def make_request(
    messages: list[dict[str, str]] | list[tuple[str, str]],
    sampling: Sampling | None = None,
    n: int = 1,
    continue_final: bool = False,
    json_schema: dict[str, Any] | None = None,
    draw: str = "",
) -> Request:
    pairs = tuple((m["role"], m["content"]) if isinstance(m, dict) else (m[0], m[1]) for m in messages)
    if continue_final and (not pairs or pairs[-1][0] != "assistant"):
        raise ValueError("continue_final needs the last message to be the assistant's prefix")
    # Not key-sorted: property order is generation order for constrained decoders.
    schema = None if json_schema is None else json.dumps(json_schema, separators=(",", ":"))
    return Request(pairs, sampling or Sampling(), n, continue_final, schema, draw)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # stop | length | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    true_continuation: bool = True  # False where the backend could only put the prefix in the prompt
    error: str | None = None
    cached: bool = False
    # prompt tokens the server's prefix cache served (usage.prompt_tokens_details.cached_tokens), on the first
    # choice like prompt_tokens; 0 where the server does not say. Counted per stage, never stored in the call cache
    cached_prompt_tokens: int = 0


OnDone = Callable[[int, list[Completion]], None]

# Backend settings that change a reply only for some requests: the JSON-schema mechanism for a request with a schema,
# the continuation mechanism for a request that continues an assistant message.
SCHEMA_SETTINGS = frozenset({"structured_output"})
CONTINUATION_SETTINGS = frozenset({"continuation", "chat_template"})


def relevant_settings(settings: dict[str, Any], schema: bool, continued: bool) -> dict[str, Any]:
    """The backend settings (besides its kind and model) that can change a reply to requests with a JSON schema
    or not (`schema`) and continuing an assistant message or not (`continued`); unset ones (None) are left out,
    so a backend without such settings keys its calls as before."""
    return {
        key: value for key, value in settings.items()
        if value is not None and not (key in SCHEMA_SETTINGS and not schema)
        and not (key in CONTINUATION_SETTINGS and not continued)
    }


def request_settings(settings: dict[str, Any], request: Request) -> dict[str, Any]:
    """The backend settings that can change the reply to `request` (its cache identity)."""
    return relevant_settings(settings, request.json_schema is not None, request.continue_final)


class Backend(Protocol):
    kind: str  # "openai", "vllm", "gemini", "local"
    model: str
    supports_continuation: bool  # can it truly continue an assistant message?
    token_counts: str  # how per-sample completion tokens are known: "engine", "tokenizer" or "estimated"
    # the settings besides kind and model that can change a reply (`BackendConfig.reply_settings`): in every call's
    # cache key (those relevant to the request) and in each stage's fingerprint
    reply_settings: dict[str, Any]

    def generate(self, requests: list[Request], on_done: OnDone | None = None) -> list[list[Completion]]:
        """One list of completions per request, at most `request.n` each (fewer where the engine gave fewer).
        `on_done(i, completions)` is called as soon as request `i` is answered (before the batch ends)."""
        ...

    def close(self) -> None: ...


def error_completion(message: str) -> Completion:
    return Completion("", ERROR, error=message)


def share_usage(
    texts: list[tuple[str, str | None]], prompt_tokens: int, completion_tokens: int, true_continuation: bool = True,
    max_tokens: int | None = None, count: Callable[[str], int] | None = None, cached_prompt_tokens: int = 0,
) -> list[Completion]:
    """Completions from one call's (text, finish reason) choices, with the call's token usage given out:
    the prompt to the first choice; completion tokens exactly where they are known (one choice; a choice
    stopped at `max_tokens` used exactly that many), counted by `count` (the model's tokenizer) where it
    is given, and otherwise the rest shared in proportion to text length (never above `max_tokens`)."""
    known: dict[int, int] = {}
    if len(texts) == 1:
        known[0] = completion_tokens
    elif count is not None:
        known = {i: count(text) for i, (text, _) in enumerate(texts)}
    elif max_tokens is not None:
        known = {i: max_tokens for i, (_, finish) in enumerate(texts) if finish in LENGTH_REASONS}
    rest = [i for i in range(len(texts)) if i not in known]
    left = max(0, completion_tokens - sum(known.values()))
    chars = sum(len(texts[i][0]) for i in rest) or 1
    for position, i in enumerate(rest):
        share = left if position == len(rest) - 1 else round(left * len(texts[i][0]) / chars)
        known[i] = share if max_tokens is None else min(share, max_tokens)
        left -= known[i]
    completions = []
    for index, (text, finish) in enumerate(texts):
        first = index == 0  # the call's prompt (and what the server's prefix cache served of it) goes to the first
        completions.append(Completion(text, finish_reason(finish), prompt_tokens if first else 0, known[index],
                                      true_continuation, cached_prompt_tokens=cached_prompt_tokens if first else 0))
    return completions
