"""Any OpenAI-compatible HTTP server: OpenAI, vLLM serve, SGLang, llama.cpp's servers, hosted providers.

Requests go out concurrently (asyncio, a bounded number in flight) through the `openai` client, with
retries (tenacity): exponential backoff with jitter on 429, 5xx, timeouts and dropped connections, and
a server's `Retry-After` honoured. After the last try the request comes back as an error completion —
recorded against its row, never a crashed run.

Continuing an assistant message:
- `continuation="chat"`: the chat endpoint with vLLM's `continue_final_message` (vLLM, SGLang).
- `continuation="completions"`: the completions endpoint with the chat rendered on the client from
  the model's chat template (any server with /v1/completions, llama.cpp's included).

Structured output, by the server's own mechanism:
- `structured_output="json_schema"`: OpenAI's `response_format={"type": "json_schema", ...}` (OpenAI, vLLM, SGLang).
- `structured_output="json_object"`: `response_format={"type": "json_object", "schema": ...}` (llama-cpp-python).
- `structured_output="none"`: the schema is not sent; the reply is parsed as free text.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import openai
from intgen.backends.base import Completion, Request, error_completion, share_usage
from intgen.backends.retry import BackoffWait, bounded_gather, retrying, run_sync
from intgen.chat_template import ChatTemplate

StructuredOutput = Literal["json_schema", "json_object", "none"]
Continuation = Literal["chat", "completions"]


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError)):
        return True
    return isinstance(exc, openai.APIStatusError) and (exc.status_code >= 500 or exc.status_code in (408, 409, 429))


class OpenAIBackend:
    kind = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 32,
        max_tries: int = 6,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        timeout_s: float = 600.0,
        structured_output: StructuredOutput = "json_schema",
        continuation: Continuation = "chat",
        chat_template: ChatTemplate | None = None,
    ) -> None:
        if continuation == "completions" and chat_template is None:
            raise ValueError("continuation='completions' needs the model's chat template (--chat-template)")
        self.model = model
        self.base_url = base_url
        # The key is read from the environment and handed to the client only; it is never stored
        # on this object's public state, logged, cached or written.
        self._api_key = os.environ.get(api_key_env) or "EMPTY"
        self.concurrency = concurrency
        self.max_tries = max_tries
        self.wait = BackoffWait(backoff_initial_s, backoff_max_s)
        self.timeout_s = timeout_s
        self.structured_output = structured_output
        self.continuation = continuation
        self.chat_template = chat_template
        self.supports_continuation = True

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r})"

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        return run_sync(self.agenerate(requests))

    def close(self) -> None:
        pass

    async def agenerate(self, requests: list[Request]) -> list[list[Completion]]:
        client = openai.AsyncOpenAI(
            api_key=self._api_key, base_url=self.base_url, max_retries=0, timeout=self.timeout_s
        )

        async def one(request: Request) -> list[Completion]:
            try:
                return await retrying(lambda: self._call(client, request), _retryable, self.max_tries, self.wait)
            except openai.APIStatusError as exc:
                return [error_completion(f"http_{exc.status_code}: {exc.message}"[:500])]
            except (openai.APIConnectionError, openai.APITimeoutError) as exc:
                return [error_completion(f"connection: {type(exc).__name__}")]
            except Exception as exc:  # a malformed reply is this request's failure, not the run's
                return [error_completion(f"bad_response: {type(exc).__name__}: {exc}"[:500])]

        try:
            return await bounded_gather([one(r) for r in requests], self.concurrency)
        finally:
            await client.close()

    def _sampling(self, request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        s = request.sampling
        args: dict[str, Any] = {
            "model": self.model,
            "n": request.n,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
        }
        if s.stop:
            args["stop"] = list(s.stop)
        if s.seed is not None:
            args["seed"] = s.seed
        extra: dict[str, Any] = {}
        if s.top_k is not None:
            extra["top_k"] = s.top_k
        return args, extra

    async def _call(self, client: openai.AsyncOpenAI, request: Request) -> list[Completion]:
        args, extra = self._sampling(request)
        if request.continue_final and self.continuation == "completions":
            assert self.chat_template is not None
            prompt = self.chat_template.render(request.message_dicts(), continue_final=True)
            response = await client.completions.create(prompt=prompt, extra_body=extra or None, **args)
            texts = [(c.text, c.finish_reason) for c in response.choices]
        else:
            if request.continue_final:
                extra |= {"continue_final_message": True, "add_generation_prompt": False}
            schema = request.schema()
            if schema is not None and self.structured_output == "json_schema":
                args["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "reply", "schema": schema, "strict": True},
                }
            elif schema is not None and self.structured_output == "json_object":
                args["response_format"] = {"type": "json_object", "schema": schema}
            response = await client.chat.completions.create(
                messages=request.message_dicts(), extra_body=extra or None, **args  # type: ignore[arg-type]
            )
            texts = [(c.message.content or "", c.finish_reason) for c in response.choices]
        usage = response.usage
        return share_usage(texts, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)
