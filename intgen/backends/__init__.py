"""Model backends behind one protocol (see `base`). Pick one with `make_backend`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

from intgen.backends.base import Backend, Completion, Request, Sampling, make_request
from intgen.errors import UserError
from intgen.setting import check, setting

__all__ = ["Backend", "BackendConfig", "BackendKind", "Completion", "ContinuationMode", "Request", "Sampling",
           "StructuredOutput", "make_backend", "make_request"]


class BackendKind(str, Enum):
    openai = "openai"
    vllm = "vllm"
    gemini = "gemini"
    local = "local"


class StructuredOutput(str, Enum):
    json_schema = "json_schema"
    json_object = "json_object"
    none = "none"


class ContinuationMode(str, Enum):
    chat = "chat"
    completions = "completions"


# vLLM engine arguments that say how much of the machine the engine uses, not what it computes.
VLLM_RESOURCE_ARGS = frozenset({
    "gpu_memory_utilization", "swap_space", "cpu_offload_gb", "max_num_seqs", "max_num_batched_tokens",
    "tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend", "disable_log_stats",
    "enforce_eager", "kv_cache_memory_bytes",
})


OPENAI_WINDOW = 512  # requests in flight per server, by default
GEMINI_WINDOW = 16  # in all: a hosted API's rate limits


@dataclass(frozen=True)
class BackendConfig:
    """Which engine and how to reach it: the backend section of a run's settings (`RunConfig` holds these fields
    as they are). Credentials are never part of it: only the name of the environment variable that holds the key."""

    backend: str = setting("local", "Model engine.", choices=BackendKind)
    model: str | None = setting(None, "Model name (local: a GGUF file or a model folder from `intgen train`; "
                                      "default: the bundled SmolLM2-135M-Instruct).")
    base_url: str | None = setting(None, "Server URL (openai: e.g. http://127.0.0.1:8000/v1; gemini: the API "
                                         "endpoint). openai: repeatable; requests sharing a prompt prefix go to one "
                                         "server (within a bounded load), one that fails is rested and retried later.",
                                   join=True)
    api_key_env: str | None = setting(None, "Environment variable holding the API key (default OPENAI_API_KEY / "
                                            "GEMINI_API_KEY).")
    concurrency: int | None = setting(
        None, "Requests in flight at once: openai, per server (default 512: more than a GPU server decodes at once, "
        "so its queue never runs dry; see the README on sizing it); vllm (in-process), in all (default 1024); "
        "gemini, in all (default 16).", low=1)
    request_timeout: float = setting(
        600.0, "openai: seconds a request waits while its server answers nothing at all (a stalled server; waiting "
        "in a busy server's queue is not late); gemini: seconds for one try.", low=0.01)
    max_tries: int = setting(6, "Tries per request before its failure is recorded (a rerun tries again).", low=1)
    structured_output: str = setting(
        "json_schema", "openai: how to send a JSON schema: json_schema (OpenAI, vLLM, SGLang), json_object "
        "(llama-cpp-python), none.", choices=StructuredOutput, output=True, backends=("openai",))
    continuation: str = setting(
        "chat", "openai: how to continue an assistant message: chat (vLLM continue_final_message) or completions "
        "(client-side chat template).", choices=ContinuationMode, output=True, backends=("openai",))
    chat_template: str | None = setting(
        None, "openai + completions: chat template file, .gguf file or tokenizer name (also counts tokens per "
        "sample).", output=True, backends=("openai",))
    thinking_budget: int | None = setting(None, "gemini: thinking budget in tokens.", low=0, output=True,
                                          backends=("gemini",))
    max_model_len: int | None = setting(None, "The model's context in tokens, where the server does not report it "
                                              "(continuations are cut to fit).", low=1)
    n_ctx: int = setting(8192, "local: the engine's context in tokens.", low=128)
    local_engines: int = setting(1, "local: llama.cpp engines side by side, sharing the cores (small models: one "
                                    "per core).", low=1, high=64)
    vllm_args: dict[str, Any] = setting({}, "vllm: one engine argument, key=value (repeatable), e.g. --vllm-arg "
                                            "tensor_parallel_size=2; a config file's [vllm] table.",
                                        option="--vllm-arg", output=True, backends=("vllm",))

    def __post_init__(self) -> None:
        # RunConfig holds these fields too and checks all its own; a BackendConfig made alone checks its own here
        if type(self) is BackendConfig:
            found = [f"{f.name}: {problem}" for f in fields(self)
                     if (problem := check(BackendConfig, f, getattr(self, f.name)))]
            if found:
                raise UserError("; ".join(found))

    def reply_settings(self) -> dict[str, Any]:
        """The settings besides the engine and the model that can change a reply, for the backend this config makes
        (the fields marked `output` for it): they are part of each stage's fingerprint (a change is refused without
        --force) and of every call's cache key (those that matter for the request: `base.request_settings`). Where a
        server or an engine runs and how hard it is pushed (URLs, concurrency, timeouts, memory) changes no reply
        and is left out."""
        kind = BackendKind(self.backend)
        found = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.metadata["output"] and kind.value in f.metadata["backends"]}
        if "vllm_args" in found:  # the engine's arguments, less those that only size it
            engine = {k: v for k, v in sorted(found.pop("vllm_args").items()) if k not in VLLM_RESOURCE_ARGS}
            found["engine_args"] = engine or None
        return found

    def identity(self) -> tuple[str, str]:
        """(kind, model) as the backend made from this config names itself (in fingerprints and cache keys),
        known without loading it (the Ray executor's driver makes no engine of its own)."""
        kind = BackendKind(self.backend)
        if kind is BackendKind.local:
            from intgen.backends.local import SMOLLM2_FILE

            return kind.value, Path(self.model).name if self.model else SMOLLM2_FILE
        if self.model is None:
            raise UserError(f"the {kind.value} backend needs --model")
        return kind.value, self.model


def make_backend(config: BackendConfig) -> Backend:
    backend = _make_backend(config)
    backend.reply_settings = config.reply_settings()
    return backend


def _make_backend(config: BackendConfig) -> Backend:
    kind = BackendKind(config.backend)
    if kind is BackendKind.local:
        from intgen.backends.local import LocalBackend

        if config.model is not None and Path(config.model).is_dir():  # a Hugging Face model folder (intgen train)
            from intgen.backends.transformers_engine import TransformersBackend

            return TransformersBackend(config.model)

        return LocalBackend(config.model, n_ctx=config.n_ctx, engines=config.local_engines)
    if config.model is None:
        raise UserError(f"the {kind.value} backend needs --model")
    if kind is BackendKind.openai:
        from intgen.backends.openai_http import OpenAIBackend
        from intgen.chat_template import load_chat_template

        template = load_chat_template(config.chat_template) if config.chat_template else None
        return OpenAIBackend(
            config.model,
            base_url=config.base_url,
            api_key_env=config.api_key_env or "OPENAI_API_KEY",
            concurrency=config.concurrency or OPENAI_WINDOW,
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
            raise UserError("the gemini backend takes one --base-url (the API endpoint)")

        return GeminiBackend(
            config.model,
            base_url=config.base_url,
            api_key_env=config.api_key_env or "GEMINI_API_KEY",
            concurrency=config.concurrency or GEMINI_WINDOW,
            max_tries=config.max_tries,
            timeout_s=config.request_timeout,
            thinking_budget=config.thinking_budget,
        )
    from intgen.backends.vllm_engine import VLLMBackend

    backend = VLLMBackend(config.model, **config.vllm_args)
    if config.concurrency:
        backend.window = config.concurrency
    return backend
