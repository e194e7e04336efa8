"""The settings of a run: one flat, frozen record, saved as RUN_DIR/config.json.

Defaults follow the InT paper (K=4 attempts at T=0.7, top_p 0.8, top_k 20, 16,384 tokens; 4 proposals
per failed attempt; 32 continuations; keep an intervention with at least 1 success). With no problem set
given, `build-dataset` runs the embedded demo — 20 bundled example problems on the local SmolLM2
engine — with the `DEMO` sizes below, so that it finishes in minutes on a laptop CPU. Explicit options
and a `--config` TOML file always win over both.

This is the one source of defaults (the CLI shows these) and of what a valid setting is: every value,
from the command line, a config file or a saved config.json, is checked here, and a bad one is named.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

import tomllib

from intgen.backends import BackendConfig, BackendKind
from intgen.backends.base import Sampling
from intgen.resources import Prompt, load_prompt
from intgen.stages.propose import ProposeFor
from intgen.stages.verify import Condition

EXAMPLE_PROBLEMS = Path(__file__).resolve().parent / "examples" / "problems.jsonl"
CONDITIONS = tuple(c.value for c in Condition)
# The markers each prompt must hold: where the problem, reference and attempt go.
PROMPT_MARKERS = {"solve": ("problem",), "reference": ("problem", "reference_solution"),
                  "critique": ("numbered_attempt",)}


class ProposeStyle(str, Enum):
    two_turn = "two-turn"
    single_turn = "single-turn"


class StructuredOutput(str, Enum):
    json_schema = "json_schema"
    json_object = "json_object"
    none = "none"


class ExecutorKind(str, Enum):
    local = "local"
    ray = "ray"


class ContinuationMode(str, Enum):
    chat = "chat"
    completions = "completions"


@dataclass(frozen=True)
class RunConfig:
    # problems
    problems: str | None = None  # None: the bundled example problems
    problem_column: str | None = None
    answer_column: str | None = None
    solution_column: str | None = None
    split: str | None = None  # None: the source's only split (an error if it has several)
    subset: str | None = None
    skip_bad_rows: bool = False
    limit: int | None = None
    decontaminate: tuple[str, ...] = ()  # eval sets (paths or benchmark names) whose problems' n-grams are dropped
    decontaminate_ngram: int = 8  # words per n-gram
    # the policy model
    backend: str = "local"
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    concurrency: int = 32
    request_timeout: float = 600.0  # seconds per try of one request (openai, gemini)
    max_tries: int = 6  # tries per request before its failure is recorded
    structured_output: str = "json_schema"
    continuation: str = "chat"
    chat_template: str | None = None
    thinking_budget: int | None = None
    max_model_len: int | None = None  # the model's context in tokens, where the server does not say
    n_ctx: int = 8192  # local engine context
    local_engines: int = 1  # local: llama.cpp engines side by side, sharing the cores (small models: one per core)
    vllm_args: dict[str, Any] = field(default_factory=dict)  # engine arguments for the in-process vLLM backend
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
    propose_style: str = "two-turn"
    reference_prompt: str = "propose_reference.md"  # turn 1 of the two-turn prompt
    critique_prompt: str | None = None  # turn 2, or the single-turn prompt (default: the shipped one for the style)
    propose_max_tokens: int = 16384  # per turn, as the release (a cut first turn would be fed to the second)
    propose_temperature: float = 0.7
    structured: bool = True  # constrain proposals by a JSON schema where the backend can
    propose_for: str = "not-correct"  # every attempt not graded correct, as the release; "incorrect": wrong ones only
    allow_no_reference: bool = False
    # verify
    continuations: int = 32
    verify_max_tokens: int = 16384
    verify_temperature: float = 0.7
    min_success: int = 1
    conditions: tuple[str, ...] = ("intervention",)
    verify_all_proposals: bool = False  # verify every accepted proposal, not only the first of each attempt
    # run
    batch_size: int = 64
    prices: str | None = None
    executor: str = "local"  # local: parts one after another in this process; ray: parts on Ray Data actors
    ray_address: str | None = None  # None: join this machine's cluster or start one; "auto"; "ray://host:10001"
    ray_actors: int = 2  # actors per model stage, each with its own backend
    ray_actor_cpus: float = 0.5
    ray_actor_gpus: float = 0.0  # 1 for an in-process vLLM engine per GPU
    license: str = "other"
    card_template: str = "card.md"  # the dataset card's template: the shipped one, or your own file

    def __post_init__(self) -> None:
        found = [f"{name}: {problem}" for name, value in asdict(self).items() if (problem := check(name, value))]
        found += [f"{name}: {problem}" for name, problem in cross_checks(asdict(self))]
        if found:
            raise ValueError("; ".join(found))

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
            concurrency=self.concurrency, max_tries=self.max_tries, request_timeout=self.request_timeout,
            structured_output=self.structured_output, continuation=self.continuation,
            chat_template=self.chat_template, thinking_budget=self.thinking_budget, n_ctx=self.n_ctx,
            max_model_len=self.max_model_len, vllm_args=tuple(sorted(self.vllm_args.items())),
            local_engines=self.local_engines,
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
        return {**asdict(self), **{name: list(getattr(self, name)) for name in LIST_FIELDS}}


# The embedded demo's sizes: SmolLM2-135M on two CPU cores generates about 60 tokens a second, so the demo is
# cut to what finishes in under 5 minutes there (measured: README). It is a demonstration of the machinery,
# not of the method: a 135M model's proposals are mostly rejected, and a few are kept.
DEMO = {
    "limit": 14,  # of the 20 bundled problems
    "samples": 4,
    "max_tokens": 176,
    "propose_style": "single-turn",  # the two-turn prompt's first turn doubles the proposer's prompt and time
    "proposals": 3,
    # SmolLM2's ungradable attempts (a third of them) are unfinished rambling, and each critique prompt costs the
    # engine ~3k prompt tokens: the demo critiques the attempts graded wrong only (the default is every attempt
    # not graded correct, as the release)
    "propose_for": "incorrect",
    "propose_max_tokens": 80,  # the five JSON fields in SmolLM2's words; longer replies run away
    "continuations": 8,
    "verify_max_tokens": 160,
    "verify_temperature": 0.3,  # a 135M model rambles at 0.7; cooler continuations finish more often
    "n_ctx": 2048,
    "local_engines": 2,  # two single-threaded engines: 1.2x the throughput of one with two threads
    "lenient_answers": True,  # SmolLM2-135M rarely writes \\boxed{}
}
DEMO_MINUTES = 5  # what the demo takes on the project's 2-core machine, at most (README)

FIELD_NAMES = {f.name for f in fields(RunConfig)}

# --- what a valid setting is ----------------------------------------------------------------------

LIST_FIELDS = ("conditions", "decontaminate")
CHOICES: dict[str, type[Enum]] = {
    "backend": BackendKind, "proposer_backend": BackendKind, "propose_style": ProposeStyle,
    "structured_output": StructuredOutput, "continuation": ContinuationMode, "executor": ExecutorKind,
    "propose_for": ProposeFor,
}
# (lowest, highest) allowed; None: no bound.
BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "samples": (1, None), "proposals": (1, None), "continuations": (1, None), "min_success": (0, None),
    "limit": (1, None), "batch_size": (1, None), "concurrency": (1, None), "grade_workers": (1, None),
    "max_tokens": (1, None), "propose_max_tokens": (1, None), "verify_max_tokens": (1, None), "n_ctx": (128, None),
    "max_model_len": (1, None), "decontaminate_ngram": (1, None), "ray_actors": (1, None), "ray_actor_cpus": (0, None),
    "ray_actor_gpus": (0, None), "max_tries": (1, None), "local_engines": (1, 64), "top_k": (0, None),
    "thinking_budget": (0, None),
    "temperature": (0, None), "propose_temperature": (0, None), "verify_temperature": (0, None),
    "top_p": (0, 1), "grade_timeout": (0.01, None), "request_timeout": (0.01, None), "hard_threshold": (0, 1),
}
_HINTS = typing.get_type_hints(RunConfig)


def _kind(name: str) -> tuple[str, bool]:
    """The value kind a field takes (bool, int, float, str, list, table) and whether it may be None."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and optional else hint
    origin = typing.get_origin(base)
    if origin is tuple:
        return "list", optional
    if origin is dict:
        return "table", optional
    return {bool: "bool", int: "int", float: "float", str: "str"}[base], optional


def check(name: str, value: Any) -> str | None:
    """What is wrong with one setting's value, or None."""
    kind, optional = _kind(name)
    if value is None:
        return None if optional else "must be set"
    wrong = {
        "bool": not isinstance(value, bool),
        "int": isinstance(value, bool) or not isinstance(value, int),
        "float": isinstance(value, bool) or not isinstance(value, (int, float)),
        "str": not isinstance(value, str),
        "list": not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value),
        "table": not isinstance(value, dict),
    }[kind]
    if wrong:
        expected = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "text",
                    "list": 'a list of names, e.g. ["intervention", "problem-only"]', "table": "a table"}[kind]
        return f"expected {expected}, got {value!r}"
    if name in CHOICES and value not in {c.value for c in CHOICES[name]}:
        return f"{value!r} is not one of {', '.join(c.value for c in CHOICES[name])}"
    if name == "conditions":
        bad = [v for v in value if v not in CONDITIONS]
        return f"unknown condition(s) {', '.join(bad)}; known: {', '.join(CONDITIONS)}" if bad else None
    low, high = BOUNDS.get(name, (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"between {low} and {high}"
        return f"must be {span}, got {value!r}"
    return None


def cross_checks(values: dict[str, Any]) -> list[tuple[str, str]]:
    """Settings that are only wrong together."""
    found = []
    if isinstance(values.get("min_success"), int) and isinstance(values.get("continuations"), int) \
            and values["min_success"] > values["continuations"]:
        found.append(("min_success", f"{values['min_success']} is more than continuations ({values['continuations']})"))
    conditions = values.get("conditions")
    if isinstance(conditions, (list, tuple)) and Condition.intervention.value not in conditions:
        found.append(("conditions", f"{list(conditions)} leave out intervention, the condition every other one is "
                                    "compared with (and the one the dataset keeps)"))
    return found


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML file of RunConfig fields (dashes or underscores; a `[vllm]` table gives engine arguments).
    Unknown keys and bad values are an error naming the file and the setting."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: not a readable TOML file ({exc})") from None
    values = {key.replace("-", "_"): value for key, value in data.items()}
    if "vllm" in values:
        values["vllm_args"] = values.pop("vllm")
    unknown = sorted(set(values) - FIELD_NAMES)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELD_NAMES))}")
    for name, value in values.items():
        if problem := check(name, value):
            raise ValueError(f"{path}: {name.replace('_', '-')}: {problem}")
    return values


def resolve(explicit: dict[str, Any], file_values: dict[str, Any]) -> RunConfig:
    """Defaults < the demo sizes (only when no problem set is given) < the config file < explicit options."""
    for name, value in explicit.items():
        if problem := check(name, value):
            raise ValueError(f"--{name.replace('_', '-')}: {problem}")
    values = dict(file_values) | explicit
    if values.get("problems") is None:
        values = DEMO | values
    values |= {name: tuple(values[name]) for name in LIST_FIELDS if name in values}
    for name, problem in cross_checks(values):
        raise ValueError(f"{name.replace('_', '-')}: {problem}")
    return RunConfig(**values)


DEFAULTS = RunConfig()


def from_saved(data: dict[str, Any]) -> RunConfig:
    known = {k: v for k, v in data.items() if k in FIELD_NAMES}
    known |= {name: tuple(known[name]) for name in LIST_FIELDS if name in known}
    return RunConfig(**known)


__all__ = ["CONDITIONS", "DEFAULTS", "DEMO", "EXAMPLE_PROBLEMS", "RunConfig", "from_saved", "read_config_file",
           "resolve"]
