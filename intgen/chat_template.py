"""Render a chat on the client, so an assistant message can be continued through a plain completions endpoint.

Servers other than vLLM cannot continue the last assistant message of a chat; a completions endpoint
can, given the exact text the chat template would produce, cut right after the assistant's prefix
(the same thing `continue_final_message` does inside vLLM and transformers). Templates come from a
file, a GGUF file's metadata, or a Hugging Face tokenizer, and run in jinja2's sandbox: a template
from a downloaded model file is not trusted code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from intgen.errors import UserError
from intgen.extras import need


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    text: str
    bos_token: str = ""
    eos_token: str = ""
    count_tokens: Callable[[str], int] | None = field(default=None, compare=False)  # the model's tokenizer

    def render(self, messages: list[dict[str, str]], continue_final: bool = False) -> str:
        """The prompt text; with `continue_final`, it ends exactly with the last (assistant) message's content."""
        if not continue_final:
            return self._render(messages, add_generation_prompt=True)
        prefix = messages[-1]["content"]
        if not prefix.strip():  # nothing to continue: open the assistant turn
            return self._render(messages[:-1], add_generation_prompt=True) + prefix
        rendered = self._render(messages, add_generation_prompt=False)
        for needle in (prefix, prefix.rstrip()):
            at = rendered.rfind(needle)
            if at >= 0:
                return rendered[:at] + prefix
        raise UserError(f"the chat template {self.source} does not reproduce the assistant prefix verbatim")

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.text).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


def _raise(message: str) -> None:
    raise TemplateError(message)


def load_chat_template(source: str | Path) -> ChatTemplate:
    """From a template file (.jinja, .j2, .txt), a .gguf model file, or a tokenizer (folder or Hub name)."""
    path = Path(source)
    if path.suffix == ".gguf":
        return _from_gguf(path)
    if path.is_file():
        return ChatTemplate(str(path), path.read_text(encoding="utf-8"))
    if not (path.exists() or "/" in str(source)):
        raise UserError(f"--chat-template {source}: no such file, and not a tokenizer name (owner/name)")
    transformers = need("transformers", "--chat-template with a tokenizer")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:  # not on the Hub, offline, or not a tokenizer folder
        raise UserError(f"--chat-template {source}: cannot load it as a tokenizer ({exc})") from None
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer {source} has no chat template")
    return ChatTemplate(str(source), tokenizer.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or "",
                        lambda text: len(tokenizer.encode(text, add_special_tokens=False)))


def _from_gguf(path: Path) -> ChatTemplate:
    if not path.is_file():
        raise UserError(f"--chat-template {path}: no such file")
    llama_cpp = need("llama_cpp", "--chat-template with a .gguf file")
    return template_from_llama(llama_cpp.Llama(str(path), vocab_only=True, verbose=False), str(path))


def template_from_llama(model: Any, source: str) -> ChatTemplate:
    """The chat template (and BOS/EOS tokens) of a loaded llama-cpp-python model, from its GGUF metadata."""
    metadata = model.metadata
    text = metadata.get("tokenizer.chat_template")
    if not text:
        raise UserError(f"{source} has no tokenizer.chat_template in its metadata")

    def token(name: str) -> str:
        token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
        return "" if token_id is None else model.detokenize([int(token_id)], special=True).decode("utf-8", "replace")

    return ChatTemplate(source, text, token("bos"), token("eos"),
                        lambda text: len(model.tokenize(text.encode("utf-8"), add_bos=False, special=False)))
