"""Gemini through `google-genai`'s async client.

Gemini cannot continue a partial assistant answer. For a continuation request this backend says so
(`supports_continuation = False`): it puts the prefix in the prompt, asks for the rest, and marks
the completions `true_continuation=False` so rows made that way can be told apart.
"""

from __future__ import annotations

import os
from typing import Any

from intgen.backends.base import (
    BadReply,
    Completion,
    OnDone,
    Request,
    error_completion,
    share_usage,
)
from intgen.backends.retry import BackoffWait, bounded_gather, retrying, run_sync
from intgen.errors import UserError
from intgen.extras import need

CONTINUE_INSTRUCTION = (
    "Below is the beginning of your answer to the problem above. Continue it from exactly where it stops, "
    "as the same answer: do not repeat it, do not restart, do not comment on it.\n\n{prefix}"
)


def _retryable(exc: BaseException) -> bool:
    from google.genai import errors

    if isinstance(exc, errors.APIError):
        return exc.code in (408, 409, 429) or exc.code >= 500
    if isinstance(exc, BadReply):
        return True
    return type(exc).__name__ in ("ConnectError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError", "ReadError")


class GeminiBackend:
    kind = "gemini"
    supports_continuation = False
    token_counts = "estimated"
    reply_settings: dict[str, Any] = {}  # set by make_backend (BackendConfig.reply_settings)

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "GEMINI_API_KEY",
        concurrency: int = 16,
        max_tries: int = 6,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        timeout_s: float = 600.0,
        thinking_budget: int | None = None,
    ) -> None:
        need("google.genai", "the gemini backend")
        from google import genai
        from google.genai import types
        self.model = model
        options = types.HttpOptions(base_url=base_url, timeout=int(timeout_s * 1000))  # milliseconds
        key = os.environ.get(api_key_env) or os.environ.get("GOOGLE_API_KEY")
        if not key:
            raise UserError(f"the gemini backend needs an API key in ${api_key_env} (or $GOOGLE_API_KEY)")
        self._client = genai.Client(api_key=key, http_options=options)
        self.concurrency = concurrency
        self.max_tries = max_tries
        self.wait = BackoffWait(backoff_initial_s, backoff_max_s)
        self.thinking_budget = thinking_budget

    def __repr__(self) -> str:
        return f"GeminiBackend(model={self.model!r})"

    def generate(self, requests: list[Request], on_done: OnDone | None = None) -> list[list[Completion]]:
        return run_sync(self.agenerate(requests, on_done))

    @property
    def window(self) -> int:
        return self.concurrency

    async def answer(self, request: Request) -> list[Completion]:
        """One request, after retries; its failure is a row, never the run's."""
        try:
            return await retrying(lambda: self._call(request), _retryable, self.max_tries, self.wait)
        except Exception as exc:  # after the last try: this request's failure, not the run's
            code = getattr(exc, "code", None)
            label = f"http_{code}" if isinstance(code, int) else "bad_response"
            return [error_completion(f"{label}: {type(exc).__name__}: {exc}"[:500])]

    async def agenerate(self, requests: list[Request], on_done: OnDone | None = None) -> list[list[Completion]]:
        async def one(index: int, request: Request) -> list[Completion]:
            completions = await self.answer(request)
            if on_done is not None:
                on_done(index, completions)
            return completions

        return await bounded_gather([one(i, r) for i, r in enumerate(requests)], self.concurrency)

    def _config(self, request: Request, system: str | None) -> Any:
        from google.genai import types

        s = request.sampling
        config: dict[str, Any] = {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_output_tokens": s.max_tokens,
            "candidate_count": request.n,
        }
        if s.top_k is not None:
            config["top_k"] = s.top_k
        if s.stop:
            config["stop_sequences"] = list(s.stop)
        if s.seed is not None:
            config["seed"] = s.seed
        if system:
            config["system_instruction"] = system
        if request.json_schema is not None:
            config["response_mime_type"] = "application/json"
            config["response_json_schema"] = request.schema()
        if self.thinking_budget is not None:
            config["thinking_config"] = types.ThinkingConfig(thinking_budget=self.thinking_budget)
        return types.GenerateContentConfig(**config)

    async def _call(self, request: Request) -> list[Completion]:
        from google.genai import types

        messages = list(request.messages)
        system = "\n\n".join(c for r, c in messages if r == "system") or None
        turns = [(r, c) for r, c in messages if r != "system"]
        if request.continue_final:
            prefix = turns.pop()[1]
            turns.append(("user", CONTINUE_INSTRUCTION.format(prefix=prefix)))
        contents = [
            types.Content(role="model" if r == "assistant" else "user", parts=[types.Part(text=c)]) for r, c in turns
        ]
        response = await self._client.aio.models.generate_content(
            model=self.model, contents=contents, config=self._config(request, system)
        )
        usage = response.usage_metadata
        prompt_tokens = (usage.prompt_token_count or 0) if usage else 0
        completion_tokens = ((usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)) if usage else 0
        texts = []
        for candidate in response.candidates or []:
            parts = candidate.content.parts if candidate.content and candidate.content.parts else []
            text = "".join(p.text or "" for p in parts if not getattr(p, "thought", False))
            finish = str(candidate.finish_reason.value if candidate.finish_reason else "STOP")
            texts.append((text, finish))  # STOP, MAX_TOKENS; SAFETY, RECITATION, ... are kept and warned of
        cached = (getattr(usage, "cached_content_token_count", None) or 0) if usage else 0  # context caching
        return share_usage(texts, prompt_tokens, completion_tokens, true_continuation=not request.continue_final,
                           max_tokens=request.sampling.max_tokens, cached_prompt_tokens=cached)

    def close(self) -> None:
        pass
