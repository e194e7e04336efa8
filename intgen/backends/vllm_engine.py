"""vLLM in-process (`vllm.LLM`): whole batches in one call, `n` native, prefix caching on.

Continuations use `LLM.chat(..., continue_final_message=True, add_generation_prompt=False)`, which
renders the chat with the model's template and continues the last assistant message as the same turn.
Structured output uses vLLM's guided decoding. Imported lazily: the `vllm` extra is optional.
"""

from __future__ import annotations

from typing import Any

from intgen.backends.base import LENGTH, STOP, Completion, Request


class VLLMBackend:
    kind = "vllm"
    supports_continuation = True

    def __init__(self, model: str, **engine_args: Any) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise RuntimeError("the vllm backend needs its extra: pip install 'intgen[vllm]'") from exc
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

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        results: list[list[Completion]] = [[] for _ in requests]
        # LLM.chat takes one continue_final_message flag per call: one call per kind, each a whole batch.
        for continue_final in (False, True):
            chosen = [i for i, r in enumerate(requests) if r.continue_final == continue_final]
            if not chosen:
                continue
            outputs = self.llm.chat(
                [requests[i].message_dicts() for i in chosen],
                sampling_params=[self._params(requests[i]) for i in chosen],
                continue_final_message=continue_final,
                add_generation_prompt=not continue_final,
                use_tqdm=False,
            )
            for i, output in zip(chosen, outputs):
                prompt_tokens = len(output.prompt_token_ids or [])
                results[i] = [
                    Completion(
                        o.text,
                        LENGTH if o.finish_reason == "length" else STOP,
                        prompt_tokens if k == 0 else 0,
                        len(o.token_ids),
                    )
                    for k, o in enumerate(output.outputs)
                ]
        return results

    def close(self) -> None:
        del self.llm


def _guided_json(vllm: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """Guided decoding across vLLM versions: `structured_outputs` (new) or `guided_decoding` (older)."""
    sampling_params = vllm.sampling_params
    if hasattr(sampling_params, "StructuredOutputsParams"):
        return {"structured_outputs": sampling_params.StructuredOutputsParams(json=schema)}
    return {"guided_decoding": sampling_params.GuidedDecodingParams(json=schema)}
