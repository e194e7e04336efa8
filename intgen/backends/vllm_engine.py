"""vLLM in-process (`vllm.LLM`): whole batches in one call, `n` native, prefix caching on.

Continuations use `LLM.chat(..., continue_final_message=True, add_generation_prompt=False)`, which
renders the chat with the model's template and continues the last assistant message as the same turn.
Structured output uses vLLM's guided decoding. Imported lazily: the `vllm` extra is optional.
"""

from __future__ import annotations

from typing import Any

from intgen.backends.base import LENGTH, STOP, TOO_LONG, Completion, OnDone, Request, error_completion
from intgen.extras import need


class VLLMBackend:
    kind = "vllm"
    supports_continuation = True
    token_counts = "engine"
    reply_settings: dict[str, Any] = {}  # set by make_backend (BackendConfig.reply_settings)

    def __init__(self, model: str, **engine_args: Any) -> None:
        vllm = need("vllm", "the vllm backend")
        self.model = model
        self._vllm = vllm
        self.llm = vllm.LLM(model=model, enable_prefix_caching=True, **engine_args)

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
        }
        schema = request.schema()
        if schema is not None:
            args |= _guided_json(self._vllm, schema)
        return self._vllm.SamplingParams(**args)

    def generate(self, requests: list[Request], on_done: OnDone | None = None) -> list[list[Completion]]:
        results: list[list[Completion]] = [[] for _ in requests]
        # LLM.chat takes one continue_final_message flag per call: one call per kind, each a whole batch.
        for continue_final in (False, True):
            chosen = [i for i, r in enumerate(requests) if r.continue_final == continue_final]
            if chosen:
                for i, completions in zip(chosen, self._chat([requests[i] for i in chosen], continue_final)):
                    results[i] = completions
                    if on_done is not None:
                        on_done(i, completions)
        return results

    def _chat(self, requests: list[Request], continue_final: bool) -> list[list[Completion]]:
        """One batch through `LLM.chat`. vLLM refuses a whole batch when one prompt is longer than the
        model's context: then each request is sent alone, and the ones that do not fit are `too_long`."""
        try:
            outputs = self.llm.chat(
                [r.message_dicts() for r in requests],
                sampling_params=[self._params(r) for r in requests],
                continue_final_message=continue_final,
                add_generation_prompt=not continue_final,
                use_tqdm=False,
            )
        except ValueError as exc:
            if len(requests) == 1:
                too_long = "longer than the maximum model length" in str(exc) or "context" in str(exc).lower()
                if too_long:
                    return [[Completion("", TOO_LONG)] * requests[0].n]
                return [[error_completion(f"engine: {exc}"[:500])]]
            return [self._chat([r], continue_final)[0] for r in requests]
        return [_completions(output) for output in outputs]

    def close(self) -> None:
        del self.llm


def _completions(output: Any) -> list[Completion]:
    """One request's outputs; vLLM counts every sample's tokens itself."""
    prompt_tokens = len(output.prompt_token_ids or [])
    cached = getattr(output, "num_cached_tokens", None) or 0  # served by the engine's prefix cache
    return [
        Completion(o.text, LENGTH if o.finish_reason == "length" else STOP, prompt_tokens if k == 0 else 0,
                   len(o.token_ids), cached_prompt_tokens=cached if k == 0 else 0)
        for k, o in enumerate(output.outputs)
    ]


def _guided_json(vllm: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """Guided decoding across vLLM versions: `structured_outputs` (new) or `guided_decoding` (older)."""
    sampling_params = vllm.sampling_params
    if hasattr(sampling_params, "StructuredOutputsParams"):
        return {"structured_outputs": sampling_params.StructuredOutputsParams(json=schema)}
    return {"guided_decoding": sampling_params.GuidedDecodingParams(json=schema)}
