"""vLLM in-process, streaming (`vllm.AsyncLLMEngine`, V1's `AsyncLLM`): requests are fed to the engine one by
one as the driver's window sends them, each answered (and cached) the moment its samples are done, so the engine
never drains between batches and a kill loses only what was decoding. `n` native, prefix caching on.

The chat is rendered with the model's own chat template (the tokenizer's `apply_chat_template`, as `LLM.chat`
does); a continuation renders the conversation with `continue_final_message=True` and no generation prompt, so
the last assistant message is continued as the same turn. Structured output uses vLLM's guided decoding. The
engine runs on an event loop of its own (its output handler is bound to the loop of its first request), whichever
thread or loop asks. Imported lazily: the `vllm` extra is optional.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

from intgen.backends.base import TOO_LONG, Completion, OnDone, Request, error_completion, finish_reason
from intgen.extras import need

WINDOW = 1024  # samples in flight by default: the engine schedules them itself (its max_num_seqs, its KV cache)


class VLLMBackend:
    kind = "vllm"
    supports_continuation = True
    token_counts = "engine"
    reply_settings: dict[str, Any] = {}  # set by make_backend (BackendConfig.reply_settings)
    window = WINDOW

    def __init__(self, model: str, **engine_args: Any) -> None:
        vllm = need("vllm", "the vllm backend")
        self.model = model
        self._vllm = vllm
        args = vllm.AsyncEngineArgs(model=model, enable_prefix_caching=True, **engine_args)
        self.engine = vllm.AsyncLLMEngine.from_engine_args(args)
        self.tokenizer = self.engine.get_tokenizer()
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="intgen-vllm", daemon=True)
        self._thread.start()

    def _params(self, request: Request) -> Any:
        s = request.sampling
        args: dict[str, Any] = {
            "n": request.n,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k if s.top_k is not None else -1,
            "max_tokens": s.max_tokens,
            "stop": list(s.stop) or None,
            "seed": s.seed,
            "output_kind": self._vllm.sampling_params.RequestOutputKind.FINAL_ONLY,  # one output, when done
        }
        schema = request.schema()
        if schema is not None:
            args |= _guided_json(self._vllm, schema)
        return self._vllm.SamplingParams(**args)

    def prompt(self, request: Request) -> str:
        """The chat as the model's template renders it; a continuation continues the last assistant message."""
        return self.tokenizer.apply_chat_template(
            request.message_dicts(), tokenize=False, add_generation_prompt=not request.continue_final,
            continue_final_message=request.continue_final)

    async def answer(self, request: Request) -> list[Completion]:
        """One request's completions, from whichever event loop awaits them (the driver's window streams here)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._answer(request), self._loop))

    async def _answer(self, request: Request) -> list[Completion]:
        final = None
        try:
            async for output in self.engine.generate(self.prompt(request), self._params(request),
                                                     request_id=f"intgen-{next(self._ids)}"):
                final = output
        except Exception as exc:  # a refused request (ValueError, vLLM's own VLLMValidationError), a dead engine
            message = str(exc)
            if "maximum context length" in message or "longer than the maximum model length" in message:
                return [Completion("", TOO_LONG) for _ in range(request.n)]  # the prompt alone does not fit
            return [error_completion(f"engine: {type(exc).__name__}: {message}"[:500])]
        if final is None:
            return [error_completion("engine: no output")]
        return _completions(final)

    def generate(self, requests: list[Request], on_done: OnDone | None = None) -> list[list[Completion]]:
        """A whole batch (outside the driver's window): every request fed to the engine at once."""

        async def one(index: int, request: Request) -> list[Completion]:
            completions = await self._answer(request)
            if on_done is not None:
                on_done(index, completions)
            return completions

        async def every() -> list[list[Completion]]:
            return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))

        return asyncio.run_coroutine_threadsafe(every(), self._loop).result()

    def close(self) -> None:
        self.engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


def _completions(output: Any) -> list[Completion]:
    """One request's outputs; vLLM counts every sample's tokens itself. An aborted sample or the engine's own
    error (vLLM's finish reasons "abort" and "error") leaves partial text: the request is a failed call, never
    cached, as the HTTP backends take `finish_reason: "error"`; a reason intgen does not know is kept and warned of."""
    failed = next((o.finish_reason for o in output.outputs if o.finish_reason in ("abort", "error")), None)
    if failed is not None:
        return [error_completion(f'engine: finish_reason "{failed}"')]
    prompt_tokens = len(output.prompt_token_ids or [])
    cached = getattr(output, "num_cached_tokens", None) or 0  # served by the engine's prefix cache
    return [
        Completion(o.text, finish_reason(o.finish_reason), prompt_tokens if k == 0 else 0, len(o.token_ids),
                   cached_prompt_tokens=cached if k == 0 else 0)
        for k, o in enumerate(output.outputs)
    ]


def _guided_json(vllm: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """Guided decoding across vLLM versions: `structured_outputs` (new) or `guided_decoding` (older)."""
    sampling_params = vllm.sampling_params
    if hasattr(sampling_params, "StructuredOutputsParams"):
        return {"structured_outputs": sampling_params.StructuredOutputsParams(json=schema)}
    return {"guided_decoding": sampling_params.GuidedDecodingParams(json=schema)}
