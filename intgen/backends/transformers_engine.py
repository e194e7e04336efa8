"""A model folder in Hugging Face format (what `intgen train` writes) on the `local` backend, through
transformers' own `generate`: a trained model is evaluated as it is, with no conversion step. Slower than
llama.cpp on a CPU; on a GPU, prefer the vllm backend with the same folder.

Continuation renders the chat with the model's template and `continue_final_message`, as vLLM does.
Structured output (a JSON schema) is not enforced here: the reply is parsed as free text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from intgen.backends.base import LENGTH, STOP, Completion, OnDone, Request, error_completion
from intgen.errors import UserError
from intgen.extras import need


class TransformersBackend:
    kind = "local"
    supports_continuation = True
    token_counts = "engine"
    reply_settings: dict[str, Any] = {}  # set by make_backend (BackendConfig.reply_settings)

    def __init__(self, folder: str | Path) -> None:
        transformers = need("transformers", "the local engine with a model folder")
        need("torch", "the local engine with a model folder")
        self.path = Path(folder)
        self.model = self.path.name
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path))
            self.network = transformers.AutoModelForCausalLM.from_pretrained(str(self.path))
        except (OSError, ValueError) as exc:  # transformers says what is missing from the folder
            raise UserError(f"{self.path}: not a model folder transformers can load ({exc})") from None
        self.network.eval()

    def generate(self, requests: list[Request], on_done: OnDone | None = None) -> list[list[Completion]]:
        results = []
        for index, request in enumerate(requests):
            try:
                completions = self._answer(request)
            except (RuntimeError, ValueError) as exc:
                completions = [error_completion(f"engine: {exc}"[:500])]
            if on_done is not None:
                on_done(index, completions)
            results.append(completions)
        return results

    def _answer(self, request: Request) -> list[Completion]:
        import torch

        s = request.sampling
        prompt = self.tokenizer.apply_chat_template(
            request.message_dicts(), tokenize=False, continue_final_message=request.continue_final,
            add_generation_prompt=not request.continue_final,
        )
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        args: dict[str, Any] = {"max_new_tokens": s.max_tokens, "num_return_sequences": request.n,
                                "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
        if s.temperature > 0:
            args |= {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k or 0}
        else:
            args["do_sample"] = False
        if s.seed is not None:
            torch.manual_seed(s.seed)
        with torch.no_grad():
            output = self.network.generate(**inputs, **args)
        start = inputs["input_ids"].shape[1]
        completions = []
        for k, sequence in enumerate(output):
            generated = sequence[start:].tolist()
            ended = self.tokenizer.eos_token_id in generated
            if ended:
                generated = generated[: generated.index(self.tokenizer.eos_token_id)]
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            completions.append(Completion(text, STOP if ended else LENGTH, start if k == 0 else 0, len(generated)))
        return completions

    def close(self) -> None:
        pass
