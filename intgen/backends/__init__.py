"""Model backends behind one protocol (see `base`). Pick one with `make_backend`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from intgen.backends.base import Backend, Completion, Request, Sampling, make_request

__all__ = ["Backend", "BackendConfig", "BackendKind", "Completion", "Request", "Sampling", "make_backend",
           "make_request"]


class BackendKind(str, Enum):
    openai = "openai"
    vllm = "vllm"
    gemini = "gemini"
    local = "local"


# vLLM engine arguments that say how much of the machine the engine uses, not what it computes.
VLLM_RESOURCE_ARGS = frozenset({
    "gpu_memory_utilization", "swap_space", "cpu_offload_gb", "max_num_seqs", "max_num_batched_tokens",
    "tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend", "disable_log_stats",
    "enforce_eager", "kv_cache_memory_bytes",
})


@dataclass(frozen=True)
class BackendConfig:
    """Which engine and how to reach it. Credentials are never part of it: only the name of the
    environment variable that holds the key."""

    kind: BackendKind = BackendKind.local
    model: str | None = None  # local: a GGUF file or a model folder (default: the bundled SmolLM2); others: its name
    base_url: str | None = None
    api_key_env: str | None = None
    concurrency: int = 32
    max_tries: int = 6
    request_timeout: float = 600.0  # seconds per try
    structured_output: str = "json_schema"  # openai: json_schema | json_object | none
    continuation: str = "chat"  # openai: chat (vLLM-style continue_final_message) | completions
    chat_template: str | None = None  # openai + completions: template file, .gguf or tokenizer
    thinking_budget: int | None = None  # gemini
    n_ctx: int = 8192  # local
    local_engines: int = 1  # local: llama.cpp engines side by side, sharing the cores
    max_model_len: int | None = None  # the model's context, where the server does not say
    vllm_args: tuple[tuple[str, Any], ...] = ()  # vllm: engine arguments (dtype, tensor_parallel_size, ...)

    def reply_settings(self) -> dict[str, Any]:
        """The settings besides kind and model that can change a reply, for the backend this config makes: they
        are part of each stage's fingerprint (a change is refused without --force) and of every call's cache key
        (those that matter for the request: `base.request_settings`). Where a server or an engine runs and how
        hard it is pushed (URLs, concurrency, timeouts, memory) changes no reply and is left out."""
        kind = BackendKind(self.kind)
        if kind is BackendKind.openai:
            return {"structured_output": self.structured_output, "continuation": self.continuation,
                    "chat_template": self.chat_template}
        if kind is BackendKind.gemini:
            return {"thinking_budget": self.thinking_budget}
        if kind is BackendKind.vllm:
            engine = {k: v for k, v in self.vllm_args if k not in VLLM_RESOURCE_ARGS}
            return {"engine_args": engine or None}
        return {}

    def identity(self) -> tuple[str, str]:
        """(kind, model) as the backend made from this config names itself (in fingerprints and cache keys),
        known without loading it (the Ray executor's driver makes no engine of its own)."""
        kind = BackendKind(self.kind)
        if kind is BackendKind.local:
            from intgen.backends.local import SMOLLM2_FILE

            return kind.value, Path(self.model).name if self.model else SMOLLM2_FILE
        if self.model is None:
            raise ValueError(f"the {kind.value} backend needs --model")
        return kind.value, self.model


def make_backend(config: BackendConfig) -> Backend:
    backend = _make_backend(config)
    backend.reply_settings = config.reply_settings()
    return backend


def _make_backend(config: BackendConfig) -> Backend:
    kind = BackendKind(config.kind)
    if kind is BackendKind.local:
        from intgen.backends.local import LocalBackend

        if config.model is not None and Path(config.model).is_dir():  # a Hugging Face model folder (intgen train)
            from intgen.backends.transformers_engine import TransformersBackend

            return TransformersBackend(config.model)

        return LocalBackend(config.model, n_ctx=config.n_ctx, engines=config.local_engines)
    if config.model is None:
        raise ValueError(f"the {kind.value} backend needs --model")
    if kind is BackendKind.openai:
        from intgen.backends.openai_http import OpenAIBackend
        from intgen.chat_template import load_chat_template

        template = load_chat_template(config.chat_template) if config.chat_template else None
        return OpenAIBackend(
            config.model,
            base_url=config.base_url,
            api_key_env=config.api_key_env or "OPENAI_API_KEY",
            concurrency=config.concurrency,
            max_tries=config.max_tries,
            timeout_s=config.request_timeout,
            max_model_len=config.max_model_len,
            structured_output=config.structured_output,  # type: ignore[arg-type]
            continuation=config.continuation,  # type: ignore[arg-type]
            chat_template=template,
        )
    if kind is BackendKind.gemini:
        from intgen.backends.gemini import GeminiBackend

        if config.base_url and "," in config.base_url:
            raise ValueError("the gemini backend takes one --base-url (the API endpoint)")

        return GeminiBackend(
            config.model,
            base_url=config.base_url,
            api_key_env=config.api_key_env or "GEMINI_API_KEY",
            concurrency=config.concurrency,
            max_tries=config.max_tries,
            timeout_s=config.request_timeout,
            thinking_budget=config.thinking_budget,
        )
    from intgen.backends.vllm_engine import VLLMBackend

    return VLLMBackend(config.model, **dict(config.vllm_args))
