"""An in-memory backend for the fast tier's driver tests: the scripted answers (tests/scripted.py) without a
server, so the driver, resume, part markers, the refusal of changed settings and the retry of failed rows are
tested in milliseconds. Everything that can run for real elsewhere (the HTTP backends, llama.cpp) is tested
against real servers in the slow tier.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from intgen.backends.base import Completion, OnDone, Request, error_completion

from scripted import Script, tokens


class Killed(BaseException):
    """The process died here (as SIGKILL would: nothing after it runs, no `except Exception` catches it)."""


class MemoryBackend:
    """Answers each request from `script` in this process. `fail(request)` may name an error for a request
    (a failed call, as a server error is recorded); after `kill_after` answered requests the next one raises
    `Killed`. `sent` holds every request that reached it; `window` caps the samples of one batch."""

    kind = "memory"
    supports_continuation = True
    token_counts = "engine"

    def __init__(self, script: Script, fail: Callable[[Request], str | None] | None = None,
                 kill_after: int | None = None, window: int | None = None) -> None:
        self.script, self.fail, self.kill_after = script, fail, kill_after
        self.model = script.model
        self.reply_settings: dict[str, Any] = {}
        self.sent: list[Request] = []
        self.batches: list[int] = []  # the size of each batch it was given
        if window is not None:
            self.window = window  # samples per batch (the driver's default otherwise)

    def generate(self, requests: list[Request], on_done: OnDone | None = None) -> list[list[Completion]]:
        self.batches.append(len(requests))
        results = []
        for index, request in enumerate(requests):
            if self.kill_after is not None and len(self.sent) >= self.kill_after:
                raise Killed(f"killed after {len(self.sent)} requests")
            self.sent.append(request)
            error = self.fail(request) if self.fail else None
            completions = [error_completion(error)] if error else self._answer(request)
            results.append(completions)
            if on_done is not None:
                on_done(index, completions)
        return results

    def _answer(self, request: Request) -> list[Completion]:
        s = request.sampling
        body: dict[str, Any] = {"messages": request.message_dicts(), "n": request.n, "seed": s.seed,
                                "max_tokens": s.max_tokens, "temperature": s.temperature}
        if request.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": json.loads(request.json_schema)}
        status, reply = self.script.answer("/v1/chat/completions", body)
        if status != 200:
            return [error_completion(f"http_{status}: {reply['error']['message']}")]
        prompt, cached = reply["usage"]["prompt_tokens"], reply["usage"]["prompt_tokens_details"]["cached_tokens"]
        return [Completion(c["message"]["content"], c["finish_reason"], prompt if i == 0 else 0,
                           tokens(c["message"]["content"]), cached_prompt_tokens=cached if i == 0 else 0)
                for i, c in enumerate(reply["choices"])]

    def close(self) -> None:
        pass
