"""The settings of a run: one flat, frozen record, saved as RUN_DIR/config.json.

Defaults follow the InT paper (K=4 attempts at T=0.7, top_p 0.8, top_k 20; 4 proposals per failed
attempt; 32 continuations; keep an intervention with at least 1 success). With no problem set given,
`build-dataset` runs the embedded demo — 20 bundled example problems on the local SmolLM2 engine —
with the `DEMO` sizes below, so that it finishes in minutes on a laptop CPU. Explicit options and a
`--config` TOML file always win over both.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from intgen.backends import BackendConfig, BackendKind
from intgen.backends.base import Sampling
from intgen.resources import Prompt, load_prompt

EXAMPLE_PROBLEMS = Path(__file__).resolve().parent / "examples" / "problems.jsonl"
CONDITIONS = ("intervention", "original-step", "resample-step", "problem-only")
# The markers each prompt must hold: where the problem, reference and attempt go.
PROMPT_MARKERS = {"solve": ("problem",), "reference": ("problem", "reference_solution"),
                  "critique": ("numbered_attempt",)}


@dataclass(frozen=True)
class RunConfig:
    # problems
    problems: str | None = None  # None: the bundled example problems
    problem_column: str | None = None
    answer_column: str | None = None
    solution_column: str | None = None
    split: str = "test"
    subset: str | None = None
    skip_bad_rows: bool = False
    limit: int | None = None
    # the policy model
    backend: str = "local"
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    concurrency: int = 32
    structured_output: str = "json_schema"
    continuation: str = "chat"
    chat_template: str | None = None
    thinking_budget: int | None = None
    n_ctx: int = 8192
    # the proposer (default: the policy model itself)
    proposer_backend: str | None = None
    proposer_model: str | None = None
    proposer_base_url: str | None = None
    # sample
    seed: int = 0
    samples: int = 4
    max_tokens: int = 16384
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    system_prompt: str | None = None
    solve_prompt: str = "solve.md"  # the policy's prompt (sample, verify, and the dataset's SFT/RL prompts)
    # grade
    grade_workers: int = 2
    grade_timeout: float = 5.0
    lenient_answers: bool = False  # grade an unboxed response by the answer it states (small models)
    hard_only: bool = False
    hard_threshold: float = 0.0
    # propose
    proposals: int = 4
    propose_style: str = "two-turn"  # two-turn | single-turn
    reference_prompt: str = "propose_reference.md"  # turn 1 of the two-turn prompt
    critique_prompt: str | None = None  # turn 2, or the single-turn prompt (default: the shipped one for the style)
    propose_max_tokens: int = 8192
    propose_temperature: float = 0.7
    structured: bool = True  # constrain proposals by a JSON schema where the backend can
    include_truncated: bool = False
    # verify
    continuations: int = 32
    verify_max_tokens: int = 16384
    verify_temperature: float = 0.7
    min_success: int = 1
    conditions: tuple[str, ...] = ("intervention",)
    # run
    batch_size: int = 64
    prices: str | None = None
    license: str = "other"

    def sampling(self, max_tokens: int | None = None, temperature: float | None = None) -> Sampling:
        return Sampling(
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p,
            top_k=self.top_k or None,
            max_tokens=max_tokens or self.max_tokens,
            seed=self.seed,
        )

    def policy_backend(self) -> BackendConfig:
        return BackendConfig(
            kind=BackendKind(self.backend), model=self.model, base_url=self.base_url, api_key_env=self.api_key_env,
            concurrency=self.concurrency, structured_output=self.structured_output, continuation=self.continuation,
            chat_template=self.chat_template, thinking_budget=self.thinking_budget, n_ctx=self.n_ctx,
        )

    def proposer_config(self) -> BackendConfig | None:
        """None when the proposer is the policy model itself (self-proposed interventions)."""
        if self.proposer_backend is None and self.proposer_model is None and self.proposer_base_url is None:
            return None
        return replace(
            self.policy_backend(),
            kind=BackendKind(self.proposer_backend or self.backend),
            model=self.proposer_model or self.model,
            base_url=self.proposer_base_url or self.base_url,
        )

    def prompt(self, kind: str) -> Prompt:
        """The `solve`, `reference` or `critique` prompt: a shipped file by name, or the user's own path."""
        name = {"solve": self.solve_prompt, "reference": self.reference_prompt, "critique": self.critique_prompt}[kind]
        if name is None:
            name = "propose_critique.md" if self.propose_style == "two-turn" else "propose_single.md"
        prompt = load_prompt(name)
        missing = [m for m in PROMPT_MARKERS[kind] if "{{" + m + "}}" not in prompt.text]
        if missing:
            raise ValueError(f"{name}: the {kind} prompt has no {', '.join('{{' + m + '}}' for m in missing)} marker")
        return prompt

    def propose_prompts(self) -> list[Prompt]:
        """The proposer's prompts, in the order they are sent."""
        if self.propose_style == "two-turn":
            return [self.prompt("reference"), self.prompt("critique")]
        return [self.prompt("critique")]

    def problem_source(self) -> str:
        return self.problems or str(EXAMPLE_PROBLEMS)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "conditions": list(self.conditions)}


# The embedded demo's sizes: small enough for SmolLM2-135M on two CPU cores.
DEMO = {
    "samples": 4,
    "max_tokens": 320,
    "proposals": 2,
    "propose_max_tokens": 400,
    "continuations": 4,
    "verify_max_tokens": 256,
    "n_ctx": 4096,
    "lenient_answers": True,  # SmolLM2-135M rarely writes \boxed{}
}

FIELD_NAMES = {f.name for f in fields(RunConfig)}


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML file of RunConfig fields (dashes or underscores); unknown keys are an error."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    values = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(values) - FIELD_NAMES)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELD_NAMES))}")
    return values


def resolve(explicit: dict[str, Any], file_values: dict[str, Any]) -> RunConfig:
    """Defaults < the demo sizes (only when no problem set is given) < the config file < explicit options."""
    values = dict(file_values) | explicit
    if values.get("problems") is None:
        values = DEMO | values
    if "conditions" in values:
        values["conditions"] = tuple(values["conditions"])
        bad = sorted(set(values["conditions"]) - set(CONDITIONS))
        if bad:
            raise ValueError(f"unknown condition(s) {', '.join(bad)}; known: {', '.join(CONDITIONS)}")
    return RunConfig(**values)


def from_saved(data: dict[str, Any]) -> RunConfig:
    known = {k: v for k, v in data.items() if k in FIELD_NAMES}
    if "conditions" in known:
        known["conditions"] = tuple(known["conditions"])
    return RunConfig(**known)


__all__ = ["CONDITIONS", "DEMO", "EXAMPLE_PROBLEMS", "RunConfig", "from_saved", "read_config_file", "resolve"]
