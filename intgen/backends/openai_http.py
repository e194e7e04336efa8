"""Any OpenAI-compatible HTTP server: OpenAI, vLLM serve, SGLang, llama.cpp's servers, hosted providers.

Requests go out concurrently (asyncio, a bounded number in flight per server) as the OpenAI wire format's JSON
posted with `aiohttp`, with retries (tenacity): exponential backoff with jitter on 429, 5xx, timeouts and dropped
connections, and a server's `Retry-After` honoured. After the last try the request comes back as an error completion —
recorded against its row, never a crashed run. Several servers (a comma-separated `base_url`; the CLI's
`--base-url` is repeatable) share the load, requests sharing a prompt prefix on one server within a bounded load,
and a failing one is rested (`ServerPool`).

Why aiohttp and not the `openai` client: at a million requests the client's own CPU matters. Posting the same
request cost the driver 4.2 ms of CPU through `openai.AsyncOpenAI` (its request building and httpx's connection
pool, which checks every idle connection's socket on each request), 1.9 ms through the same client on its aiohttp
transport, 0.4 ms through aiohttp itself (`python bench/http_clients.py`, one run: 10x and 4.4x aiohttp's). The wire
format is the same; the endpoint, the `Authorization: Bearer` key, the error body's message, Retry-After and the
environment's proxy settings are read as the `openai` client reads them.

Continuing an assistant message:
- `continuation="chat"`: the chat endpoint with vLLM's `continue_final_message` (vLLM, SGLang).
- `continuation="completions"`: the completions endpoint with the chat rendered on the client from
  the model's chat template (any server with /v1/completions, llama.cpp's included).

The model's context: a request whose prompt plus `max_tokens` does not fit is sent again once with
`max_tokens` cut to what fits (the context comes from the server's error message, `/v1/models`, or
`max_model_len`); a prompt that does not fit at all comes back as `too_long`, a final outcome that is
not retried.

Structured output, by the server's own mechanism:
- `structured_output="json_schema"`: OpenAI's `response_format={"type": "json_schema", ...}` (OpenAI, vLLM, SGLang).
- `structured_output="json_object"`: `response_format={"type": "json_object", "schema": ...}` (llama-cpp-python).
- `structured_output="none"`: the schema is not sent; the reply is parsed as free text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import ssl
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from typing import Any, Literal

import aiohttp

from intgen.backends.base import (
    LENGTH_REASONS,
    TOO_LONG,
    BadReply,
    Completion,
    OnDone,
    Request,
    error_completion,
    share_usage,
    usage_count,
)
from intgen.backends.retry import BackoffWait, bounded_gather, retrying, run_sync
from intgen.chat_template import ChatTemplate
from intgen.errors import UserError

StructuredOutput = Literal["json_schema", "json_object", "none"]
Continuation = Literal["chat", "completions"]


_CONTEXT = re.compile(r"(?:maximum context length is|context window of|context length (?:is|of)|n_ctx[:=]?|"
                      r"context length \(|maximum number of tokens allowed \(|tokens >)\s*(\d+)", re.I)
_PROMPT = re.compile(r"(\d+) in the messages|has (\d+) input tokens|messages resulted in (\d+) tokens|"
                     r"Requested tokens \((\d+)\)|prompt (?:has|is|of) (\d+) tokens|The input \((\d+) tokens\)|"
                     r"input token count \((\d+)\)|too long: (\d+) tokens", re.I)
# A message about the context itself, and one saying that something is over it: "context length/size/window" or
# the input's token count, against "exceeds", "too long", "longer than", "must be <=". Quotas and limits on other
# things ("n=2 exceeds the maximum number of choices", "Daily token quota exceeded") are not overflows.
_ABOUT_CONTEXT = re.compile(r"context (?:length|size|window)|maximum context|n_ctx|input token count|"
                            r"(?:input|prompt) (?:is )?too long|`inputs` tokens", re.I)
_OVER = re.compile(r"exceed|too long|longer than|must be <=|reduce the length", re.I)
_NOT_CONTEXT = re.compile(r"quota|rate.?limit|billing|credit", re.I)


def context_overflow(message: str, known_context: int | None) -> tuple[int | None, int | None] | None:
    """(context, prompt tokens) read from a server's "does not fit the context" error; None if it is not one."""
    if _NOT_CONTEXT.search(message):
        return None
    context = _CONTEXT.search(message)
    if context is None and not (_ABOUT_CONTEXT.search(message) and _OVER.search(message)):
        return None
    prompt = _PROMPT.search(message)
    return (int(context.group(1)) if context else known_context,
            int(next(g for g in prompt.groups() if g)) if prompt else None)


class StatusError(Exception):
    """A reply with an error status: the status, the server's message, and the reply's headers (Retry-After)."""

    def __init__(self, status: int, message: str, headers: Any) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.headers = status, message, headers


def error_message(raw: bytes) -> str:
    """The message of an error reply: OpenAI's `{"error": {"message": ...}}`, vLLM's older `{"message": ...}`,
    or the body itself."""
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        return text
    if not isinstance(body, dict):
        return text
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(body.get("message") or error or text)


# A connection refused, dropped or timed out (aiohttp's total timeout raises asyncio's TimeoutError), or a reply
# that is not HTTP (ClientResponseError: the server answered garbage) — retried, as the openai client retries them.
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError,
                     asyncio.TimeoutError)


def choice_text(choice: dict[str, Any], completions: bool) -> tuple[str, Any]:
    """(text, finish reason) of one choice. `content` may be a list of parts (joined); `content: null` is a
    failed call, except where the token limit cut the reply before any content (a reasoning model cut off while
    thinking: an empty, truncated answer)."""
    finish = choice.get("finish_reason")
    if finish == "error":
        raise BadReply(f'finish_reason "error": {str(choice.get("error") or "")[:200]}')
    if completions:
        content = choice.get("text")
    else:
        message = choice.get("message")
        if not isinstance(message, dict):
            raise BadReply("a choice without a message")
        content = message.get("content")
    if isinstance(content, list):
        content = "".join(str(part.get("text") or "") for part in content
                          if isinstance(part, dict) and part.get("type") in ("text", "output_text"))
    if content is None and finish in LENGTH_REASONS:
        content = ""
    if not isinstance(content, str):
        raise BadReply(f"a choice whose content is {type(content).__name__}, not text")
    return content, finish


# What one server of several says about itself, not about the request (a replica serving another model name, or
# holding another key): the server rests and the call goes to another. With one server they fail the call at once.
SERVER_STATUSES = (401, 403, 404)


def _retryable(exc: BaseException, servers: int) -> bool:
    if isinstance(exc, (*CONNECTION_ERRORS, BadReply)):
        return True
    return isinstance(exc, StatusError) and (exc.status >= 500 or exc.status in (408, 409, 429)
                                             or (servers > 1 and exc.status in SERVER_STATUSES))


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for a server (HTTP_PROXY/HTTPS_PROXY, unless NO_PROXY covers it), as the
    `openai` client would use. Read once per server: aiohttp's `trust_env` reads it (and ~/.netrc) on every request."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


def tls_context() -> ssl.SSLContext:
    """Certificates from certifi where it is installed (as httpx, which the openai client uses), else the system's."""
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


@dataclass
class Server:
    url: str
    session: aiohttp.ClientSession
    proxy: str | None = None
    in_flight: int = 0
    failures: int = 0  # in a row
    resting_until: float = 0.0
    answered: float = 0.0  # when it last sent a whole reply (to any call)


class ServerPool:
    """Several servers of one model (8 `vllm serve` processes, or replicas behind no router). A call with an
    affinity key (requests that share a long prompt prefix share it: `Request.affinity`) goes where the key's
    other calls in flight went (a problem's critiques, sent together, share one server's cache of its first turn),
    unless that server holds more than `1 + sticky_slack` times the mean in flight; a key with none in flight goes
    to the server it ranks first (rendezvous hashing), unless that server holds more than `1 + slack` times the
    mean (bounded load), then to the next in the key's order: so one server's prefix cache serves the prefix, and
    no server is left idle. Load counts samples (a request for n holds n of a server's sequences). A call without
    a key goes to the server with the fewest in flight. A server whose call fails (a dropped connection, a
    timeout, a 5xx or 429) rests for `rest_s` (doubling while it keeps failing, at most `max_rest_s`) and is then
    tried again. When every server rests, the one back soonest is used."""

    def __init__(self, servers: list[Server], rest_s: float = 5.0, max_rest_s: float = 120.0,
                 slack: float = 0.25, sticky_slack: float = 1.0) -> None:
        self.servers, self.rest_s, self.max_rest_s, self.slack = servers, rest_s, max_rest_s, slack
        self.sticky_slack = sticky_slack
        self.placed: dict[str, tuple[Server, int]] = {}  # key -> its server and its calls in flight there

    def pick(self, key: str | None = None) -> Server:
        """The server for one call; a call picked with a key is `release`d when it is over."""
        server = self._choose(key)
        if key is not None:
            self.placed[key] = (server, self.placed.get(key, (server, 0))[1] + 1)
        return server

    def _choose(self, key: str | None) -> Server:
        now = time.monotonic()
        ready = [s for s in self.servers if s.resting_until <= now]
        if not ready:
            return min(self.servers, key=lambda s: s.resting_until)
        if key is None or len(ready) == 1:
            return min(ready, key=lambda s: s.in_flight)
        mean = (sum(s.in_flight for s in ready) + 1) / len(ready)
        held = self.placed.get(key, (None, 0))[0]  # where the key's calls in flight went
        if held is not None and held.resting_until <= now and held.in_flight < (1 + self.sticky_slack) * mean:
            return held
        bound = math.ceil((1 + self.slack) * mean)
        ranked = sorted(ready, key=lambda s: hashlib.blake2b(f"{key}|{s.url}".encode(), digest_size=8).digest(),
                        reverse=True)
        return next(s for s in ranked if s.in_flight < bound)

    def release(self, key: str) -> None:
        """One call of `key` is over."""
        server, calls = self.placed[key]
        if calls > 1:
            self.placed[key] = (server, calls - 1)
        else:
            del self.placed[key]

    def failed(self, server: Server) -> None:
        server.failures += 1
        server.resting_until = time.monotonic() + min(self.max_rest_s, self.rest_s * 2 ** (server.failures - 1))

    def succeeded(self, server: Server) -> None:
        server.failures = 0
        server.resting_until = 0.0

    async def close(self) -> None:
        for server in self.servers:
            await server.session.close()


def base_urls(base_url: str | None) -> list[str]:
    """The servers of a `--base-url` setting: several are comma-separated (the option is repeatable); none means
    `$OPENAI_BASE_URL` or OpenAI's own API, as for the `openai` client."""
    urls = [u.strip().rstrip("/") for u in (base_url or "").split(",") if u.strip()]
    return urls or [(os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")]


class OpenAIBackend:
    kind = "openai"
    reply_settings: dict[str, Any] = {}  # set by make_backend (BackendConfig.reply_settings)

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
        max_model_len: int | None = None,
    ) -> None:
        if continuation == "completions" and chat_template is None:
            raise UserError("continuation='completions' needs the model's chat template (--chat-template)")
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
        self.max_model_len = max_model_len
        self.supports_continuation = True
        count = chat_template.count_tokens if chat_template is not None else None
        self._count = count
        self.token_counts = "tokenizer" if count is not None else "estimated"
        self._shared_pool: ServerPool | None = None

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r})"

    def generate(self, requests: list[Request], on_done: OnDone | None = None) -> list[list[Completion]]:
        return run_sync(self.agenerate(requests, on_done))

    def close(self) -> None:
        pass

    @property
    def window(self) -> int:
        """Requests in flight at once: `concurrency` per server."""
        return self.concurrency * len(base_urls(self.base_url))

    def _pool(self) -> ServerPool:
        """The servers' connection pools, made in the running event loop."""
        headers = {"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"}
        urls = base_urls(self.base_url)
        tls = tls_context() if any(url.startswith("https:") for url in urls) else None
        # No connection may wait in aiohttp's queue: while other servers rest, one server may hold the whole window.
        # No total timeout either: a request waiting in the server's own queue is not late (`_call_one` times out a
        # server that answers nothing).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(self.timeout_s, 60.0))
        return ServerPool([
            Server(url, aiohttp.ClientSession(headers=headers, timeout=timeout,
                                              connector=aiohttp.TCPConnector(limit=self.window, ssl=tls or True)),
                   env_proxy(url))
            for url in urls
        ])

    async def answer(self, request: Request) -> list[Completion]:
        """One request on the backend's long-lived pool (the driver's `Window` streams requests through it)."""
        if self._shared_pool is None:
            self._shared_pool = self._pool()
        return await self._answer(self._shared_pool, request)

    async def aclose(self) -> None:
        if self._shared_pool is not None:
            await self._shared_pool.close()
            self._shared_pool = None

    async def agenerate(self, requests: list[Request], on_done: OnDone | None = None) -> list[list[Completion]]:
        pool = self._pool()

        async def one(index: int, request: Request) -> list[Completion]:
            completions = await self._answer(pool, request)
            if on_done is not None:
                on_done(index, completions)
            return completions

        try:
            return await bounded_gather([one(i, r) for i, r in enumerate(requests)], self.window)
        finally:
            await pool.close()

    async def _answer(self, pool: ServerPool, request: Request) -> list[Completion]:
        """The request's completions after retries; failures and prompts too long for the context as rows."""
        try:
            return await self._try(pool, request)
        except StatusError as exc:
            overflow = context_overflow(exc.message, self.max_model_len) if exc.status == 400 else None
            if overflow is None:
                return self._failed(exc)
            context, prompt = overflow
            context = context or await self._served_context(pool.pick())
            if context is None or prompt is None or prompt >= context:
                return [Completion("", TOO_LONG) for _ in range(request.n)]
            try:  # cut max_tokens to what fits, once
                shorter = replace(request.sampling, max_tokens=context - prompt)
                return await self._try(pool, replace(request, sampling=shorter))
            except StatusError as again:
                if again.status == 400:
                    return [Completion("", TOO_LONG) for _ in range(request.n)]
                return self._failed(again)
            except Exception as again:
                return self._failed(again)
        except Exception as exc:
            return self._failed(exc)

    def _failed(self, exc: Exception) -> list[Completion]:
        """A request given up, as an error row: never the run's failure."""
        if isinstance(exc, StatusError):
            return [error_completion(f"http_{exc.status}: {exc.message}"[:500])]
        if isinstance(exc, CONNECTION_ERRORS):
            return [error_completion(f"connection: {type(exc).__name__} (after {self.max_tries} tries)")]
        if isinstance(exc, BadReply):
            return [error_completion(f"bad_response: {exc} (after {self.max_tries} tries)"[:500])]
        return [error_completion(f"bad_response: {type(exc).__name__}: {exc}"[:500])]  # a malformed reply

    async def _served_context(self, server: Server) -> int | None:
        """The model's context as the server reports it (vLLM's `/v1/models` gives `max_model_len`)."""
        if self.max_model_len is None:
            try:
                async with server.session.get(server.url + "/models", proxy=server.proxy) as response:
                    models = (await response.json(content_type=None)).get("data") or []
                for model in models:
                    if model.get("id") == self.model and isinstance(model.get("max_model_len"), int):
                        self.max_model_len = model["max_model_len"]
            except (*CONNECTION_ERRORS, aiohttp.ClientResponseError, ValueError, AttributeError):
                return None
        return self.max_model_len

    async def _try(self, pool: ServerPool, request: Request) -> list[Completion]:
        return await retrying(lambda: self._call_one(pool, request),
                              lambda exc: _retryable(exc, len(pool.servers)), self.max_tries, self.wait)

    async def _call_one(self, pool: ServerPool, request: Request) -> list[Completion]:
        """One try, on the server the pool picks for the request's prompt prefix."""
        key = request.affinity()
        server = pool.pick(key)
        server.in_flight += request.n  # samples: what the server decodes
        try:
            completions = await self._watched(server, request)
        except BaseException as exc:
            if _retryable(exc, len(pool.servers)):
                pool.failed(server)
            raise
        finally:
            server.in_flight -= request.n
            pool.release(key)
        pool.succeeded(server)
        return completions

    async def _watched(self, server: Server, request: Request) -> list[Completion]:
        """The call, given up (asyncio's TimeoutError, retried) once its server has answered nothing, to anyone,
        for `timeout_s` since it was sent: a stalled server. A request waiting its turn in a busy server's queue is
        not late while the server answers others (a window far larger than the server's slots is the point)."""
        call = asyncio.ensure_future(self._call(server, request))
        sent = time.monotonic()
        try:
            while True:
                left = max(sent, server.answered) + self.timeout_s - time.monotonic()
                if left <= 0:
                    raise asyncio.TimeoutError(f"the server answered nothing for {self.timeout_s:g} s")
                done, _ = await asyncio.wait({call}, timeout=left)
                if done:
                    return call.result()
        finally:
            if not call.done():
                call.cancel()

    def body(self, request: Request) -> tuple[str, dict[str, Any]]:
        """The endpoint and the JSON body of one request (the OpenAI wire format, with vLLM's extras)."""
        s = request.sampling
        body: dict[str, Any] = {"model": self.model, "n": request.n, "temperature": s.temperature, "top_p": s.top_p,
                                "max_tokens": s.max_tokens}
        if s.stop:
            body["stop"] = list(s.stop)
        if s.seed is not None:
            body["seed"] = s.seed
        if s.top_k is not None:
            body["top_k"] = s.top_k
        if request.continue_final and self.continuation == "completions":
            assert self.chat_template is not None
            body["prompt"] = self.chat_template.render(request.message_dicts(), continue_final=True)
            return "/completions", body
        body["messages"] = request.message_dicts()
        if request.continue_final:
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        schema = request.schema()
        if schema is not None and self.structured_output == "json_schema":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "reply", "schema": schema, "strict": True}}
        elif schema is not None and self.structured_output == "json_object":
            body["response_format"] = {"type": "json_object", "schema": schema}
        return "/chat/completions", body

    async def _call(self, server: Server, request: Request) -> list[Completion]:
        path, body = self.body(request)
        data = json.dumps(body).encode()
        async with server.session.post(server.url + path, data=data, proxy=server.proxy) as response:
            raw = await response.read()
            server.answered = time.monotonic()
            if response.status >= 400:
                raise StatusError(response.status, error_message(raw), response.headers)
        try:
            reply = json.loads(raw)
        except ValueError:
            raise BadReply(f"not JSON: {raw[:80]!r}") from None
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise BadReply("a reply without a list of choices")
        choices = sorted(choices, key=lambda c: c.get("index") or 0)
        texts = [choice_text(c, path == "/completions") for c in choices]
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
        return share_usage(texts, usage_count(usage.get("prompt_tokens"), "prompt_tokens"),
                           usage_count(usage.get("completion_tokens"), "completion_tokens"),
                           max_tokens=body["max_tokens"], count=self._count,
                           cached_prompt_tokens=usage_count(details.get("cached_tokens"), "cached_tokens"))
