"""The settings of a run, declared once: sections of fields (problems, backend, proposer, sample, grade,
propose, verify, run, executor, dataset), each field carrying its help, bounds, choices and whether it changes
a model's output (`intgen.setting`). `RunConfig` is every section's fields in one flat, frozen record, saved as
RUN_DIR/config.json; the CLI's options, the `--config` keys and validation are all made from these fields.

Defaults follow the InT paper (K=4 attempts at T=0.7, top_p 0.8, top_k 20, 16,384 tokens; 4 proposals
per failed attempt; 32 continuations; keep an intervention with at least 1 success). With no problem set
given, `build-dataset` runs the embedded demo — 20 bundled example problems on the local SmolLM2
engine — with the `DEMO` sizes below, so that it finishes in minutes on a laptop CPU. Explicit options
and a `--config` TOML file always win over both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

import tomllib

from intgen.backends import BackendConfig, BackendKind
from intgen.backends.base import Sampling
from intgen.errors import UserError
from intgen.lift import KeepRule
from intgen.resources import Prompt, load_prompt
from intgen.setting import check, setting
from intgen.stages.propose import ProposeFor
from intgen.stages.verify import Baselines, Condition

EXAMPLE_PROBLEMS = Path(__file__).resolve().parent / "examples" / "problems.jsonl"
# The markers each prompt must hold: where the problem, reference and attempt go.
PROMPT_MARKERS = {"solve": ("problem",), "reference": ("problem", "reference_solution"),
                  "critique": ("numbered_attempt",)}


class ProposeStyle(str, Enum):
    two_turn = "two-turn"
    single_turn = "single-turn"


class ExecutorKind(str, Enum):
    local = "local"
    ray = "ray"


@dataclass(frozen=True)
class ProblemsSection:
    problems: str | None = setting(
        None, "Problem set: a benchmark name (math500, gsm8k, aime24, amc23, imo-answerbench: shipped with intgen), "
        "a file, a dataset folder or a Hub id (build-dataset without one: the embedded demo).")
    attempts: str | None = setting(
        None, "Start from attempts made elsewhere: a file, dataset folder or Hub id with a problem, answer, reference "
        "solution and attempt on each row (the release's problem, answer, reference_solution, incorrect_attempt load "
        "as they are; several rows per problem). They are graded (a false `correct` column: taken as incorrect) and "
        "proposed for; no attempt is sampled. In place of --problems.")
    attempt_column: str | None = setting(None, "--attempts: the column holding the attempt's text (default: "
                                               "incorrect_attempt, attempt, response, completion).")
    problem_column: str | None = setting(None, "Column holding the problem text (default: problem, question, ...).")
    answer_column: str | None = setting(None, "Column holding the final answer (default: answer, ...).")
    solution_column: str | None = setting(None, "Column holding the reference solution (default: reference_solution, "
                                                "then solution).")
    split: str | None = setting(None, "Split of a dataset folder or Hub dataset (default: its only split).")
    subset: str | None = setting(None, "Config (subset) of a Hub dataset.")
    skip_bad_rows: bool = setting(False, "Skip malformed problem rows (each is reported).")
    limit: int | None = setting(None, "Use only the first N problems.", low=1)
    decontaminate: tuple[str, ...] = setting(
        (), "Eval set (a benchmark name or a file; repeatable): problems sharing an n-gram with one of its problems "
        "are dropped before sampling.")
    decontaminate_ngram: int = setting(8, "Words per n-gram for --decontaminate (after normalising case, whitespace "
                                          "and LaTeX spacing).", low=1)


@dataclass(frozen=True)
class ProposerSection:
    """The proposer model where it is not the policy (default: self-proposed); the rest of its backend settings
    are the policy's."""

    proposer_backend: str | None = setting(None, "Proposer engine (default: the policy's; self-proposed).",
                                           choices=BackendKind)
    proposer_model: str | None = setting(None, "Proposer model (default: the policy model).")
    proposer_base_url: str | None = setting(None, "Proposer server URL (repeatable, as --base-url).", join=True)


@dataclass(frozen=True)
class SampleSection:
    seed: int = setting(0, "Sampling seed: the same config and seed give the same dataset.", output=True)
    samples: int = setting(4, "Attempts per problem (K).", low=1, output=True)
    max_tokens: int = setting(16384, "Token limit per attempt.", low=1, output=True)
    temperature: float = setting(0.7, "Sampling temperature of the attempts.", low=0, output=True)
    top_p: float = setting(0.8, "Nucleus sampling (every model call).", low=0, high=1, output=True)
    top_k: int = setting(20, "Top-k sampling (every model call); 0 disables it.", low=0, output=True)
    system_prompt: str | None = setting(None, "System prompt for the policy (same in sampling, SFT and RL).",
                                        output=True)
    solve_prompt: str = setting("solve.md", "The policy's prompt (sample, verify, SFT and RL): a shipped file name or "
                                            "your own file with {{problem}}.", output=True)


@dataclass(frozen=True)
class GradeSection:
    grade_workers: int = setting(2, "Grading worker processes.", low=1)
    grade_timeout: float = setting(5.0, "Seconds of grading work per answer at most.", low=0.01, output=True)
    lenient_answers: bool = setting(False, "Grade a response without \\boxed{} by the answer it states (for small "
                                           "models).", output=True)
    hard_only: bool = setting(False, "Propose only for problems whose pass rate is at most --hard-threshold.",
                              output=True)
    hard_threshold: float = setting(0.0, "Pass-rate ceiling for --hard-only.", low=0, high=1, output=True)


@dataclass(frozen=True)
class ProposeSection:
    proposals: int = setting(4, "Proposals per failed attempt (P).", low=1, output=True)
    propose_style: str = setting("two-turn", "two-turn (the paper's: solve with the reference, then critique) or "
                                             "single-turn.", choices=ProposeStyle, output=True)
    reference_prompt: str = setting("propose_reference.md", "Turn 1 of the two-turn proposer prompt (solve guided by "
                                    "the reference): a shipped file name or your own file.", output=True)
    critique_prompt: str | None = setting(
        None, "Turn 2 of the two-turn proposer prompt, or the single-turn prompt: a shipped file name or your own "
        "file. [default: propose_critique.md / propose_single.md]", output=True)
    # per turn, as the release (a cut first turn would be fed to the second)
    propose_max_tokens: int = setting(16384, "Token limit per proposal (per turn).", low=1, output=True)
    propose_temperature: float = setting(0.7, "Sampling temperature of the proposer.", low=0, output=True)
    structured: bool = setting(True, "Constrain proposals by a JSON schema where the backend can.", output=True)
    propose_for: str = setting(
        "not-correct", "Which attempts get proposals: not-correct (every attempt not graded correct: wrong, "
        "truncated, unboxed; the release's set) or incorrect (graded wrong only).", choices=ProposeFor, output=True)
    allow_no_reference: bool = setting(False, "Propose for problems without a reference solution (the prompt then "
                                              "says only the final answer is known).", output=True)


@dataclass(frozen=True)
class VerifySection:
    continuations: int = setting(32, "Continuations per intervention (M).", low=1, output=True)
    verify_max_tokens: int = setting(16384, "Token limit per continuation.", low=1, output=True)
    verify_temperature: float = setting(0.7, "Sampling temperature of the continuations.", low=0, output=True)
    min_success: int = setting(1, "Keep an intervention with at least this many correct continuations.", low=0,
                               output=True)
    conditions: tuple[str, ...] = setting(
        ("intervention",), "Verify conditions (repeatable): intervention, original-step, resample-step, "
        "problem-only.", choices=Condition, option="--condition", output=True)
    verify_all_proposals: bool = setting(
        False, "Verify every accepted proposal, not only the first of each attempt (the release verifies one per "
        "attempt; up to P times the verify compute).", output=True)
    baselines: str = setting(
        "matched", "Which attempts' step baselines (--condition original-step, resample-step) run: matched (each "
        "problem's Table 1 unit) or every (every verified proposal's attempt and step, once each: each "
        "intervention's own lift; up to twice the verify compute).", choices=Baselines, output=True)
    keep_rule: str = setting(
        "paper", "Which interventions are kept: paper (at least --min-success correct continuations) or lift "
        "(also a one-sided Fisher exact p against its original-step baseline of at most --alpha; needs "
        "--condition original-step and --baselines every).", choices=KeepRule, output=True)
    alpha: float = setting(0.05, "The lift rule's threshold on the one-sided Fisher exact p.", low=0, high=1,
                           output=True)
    top_up: int = setting(
        0, "--keep-rule lift: N more continuations for both arms of an intervention whose first p is borderline "
        "(above alpha/2, at most --top-up-below), decided again on all of them; both looks test at alpha/2, so the "
        "error rate stays at most alpha. 0: one look at alpha.", low=0, output=True)
    top_up_below: float = setting(0.5, "--top-up: the first p up to which a verdict is borderline.", low=0, high=1,
                                  output=True)


@dataclass(frozen=True)
class RunSection:
    batch_size: int = setting(128, "Problems per part (one parquet file of each table, written when all of it is "
                                   "computed: the unit of resume). Each stage computes a part in chunks of 16 "
                                   "problems, each handed on to the next stage as soon as it is computed.", low=1)
    prices: str | None = setting(None, "Price table (TOML/JSON) to report cost.")


@dataclass(frozen=True)
class ExecutorSection:
    executor: str = setting("local", "local: parts in this process, several at once; ray: parts on Ray Data actors "
                                     "(one backend each), grading as Ray tasks.", choices=ExecutorKind)
    chunks_in_flight: int = setting(32, "Chunks (16 problems each) computed at once, of any stages: local, a chunk's "
                                       "next stage starts as soon as it is computed; 1, with --concurrency 1, is a "
                                       "strictly sequential schedule. ray: as many problems' parts at once.", low=1)
    ray_address: str | None = setting(None, "--executor ray: the cluster (auto, ray://host:10001); default: this "
                                            "machine's, started if needed.")
    ray_actors: int = setting(2, "--executor ray: actors per model stage, each with its own backend.", low=1)
    ray_actor_cpus: float = setting(0.5, "--executor ray: CPUs each actor holds.", low=0)
    ray_actor_gpus: float = setting(0.0, "--executor ray: GPUs each actor holds (1 for an in-process vLLM engine "
                                         "per GPU).", low=0)


@dataclass(frozen=True)
class DatasetSection:
    license: str = setting("other", "The dataset's licence, as the card states it (a Hub licence id).")
    card_template: str = setting("card.md", "The dataset card's template: the shipped card.md, or your own file (see "
                                            "data_cards/).")
    release_layout: bool = setting(
        False, "Also write RUN_DIR/dataset/release/: the sft rows in the InT release's LLaMA-Factory layout "
        "(int_train.json with problem and intervention_guided_attempt, dataset_info.json, a README.md), for the "
        "release's own SFT script.")


SECTIONS: dict[str, type] = {
    "problems": ProblemsSection, "backend": BackendConfig, "proposer": ProposerSection, "sample": SampleSection,
    "grade": GradeSection, "propose": ProposeSection, "verify": VerifySection, "run": RunSection,
    "executor": ExecutorSection, "dataset": DatasetSection,
}


# Every section's fields in one record; the sections stay separate types for the code that needs only one
# (BackendConfig makes a backend). The bases are listed last section first: a dataclass orders its fields from
# the last base to the first, so config.json lists them in section order.
@dataclass(frozen=True)
class RunConfig(DatasetSection, ExecutorSection, RunSection, VerifySection, ProposeSection, GradeSection,
                SampleSection, ProposerSection, BackendConfig, ProblemsSection):
    def __post_init__(self) -> None:
        found = [f"{f.name}: {problem}" for f in fields(self)
                 if (problem := check(RunConfig, f, getattr(self, f.name)))]
        found += [f"{name}: {problem}" for name, problem in cross_checks(asdict(self))]
        if found:
            raise UserError("; ".join(found))

    def sampling(self, max_tokens: int | None = None, temperature: float | None = None) -> Sampling:
        return Sampling(
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p,
            top_k=self.top_k or None,
            max_tokens=max_tokens or self.max_tokens,
            seed=self.seed,
        )

    def policy_backend(self) -> BackendConfig:
        return BackendConfig(**{f.name: getattr(self, f.name) for f in fields(BackendConfig)})

    def proposer_config(self) -> BackendConfig | None:
        """None when the proposer is the policy model itself (self-proposed interventions)."""
        if self.proposer_backend is None and self.proposer_model is None and self.proposer_base_url is None:
            return None
        return replace(
            self.policy_backend(),
            backend=self.proposer_backend or self.backend,
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
            raise UserError(f"{name}: the {kind} prompt has no {', '.join('{{' + m + '}}' for m in missing)} marker")
        return prompt

    def propose_prompts(self) -> list[Prompt]:
        """The proposer's prompts, in the order they are sent."""
        if self.propose_style == "two-turn":
            return [self.prompt("reference"), self.prompt("critique")]
        return [self.prompt("critique")]

    def problem_source(self) -> str:
        return self.attempts or self.problems or str(EXAMPLE_PROBLEMS)

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

FIELDS = {f.name: f for f in fields(RunConfig)}
FIELD_NAMES = set(FIELDS)
LIST_FIELDS = tuple(name for name in FIELDS if isinstance(RunConfig.__dataclass_fields__[name].default, tuple))


# --- what a valid setting is: each field says (intgen.setting.check) ---------------------------------

def check_setting(name: str, value: Any) -> str | None:
    """What is wrong with one setting's value, or None."""
    return check(RunConfig, FIELDS[name], value)


def cross_checks(values: dict[str, Any]) -> list[tuple[str, str]]:
    """Settings that are only wrong together."""
    found = []
    if isinstance(values.get("min_success"), int) and isinstance(values.get("continuations"), int) \
            and values["min_success"] > values["continuations"]:
        found.append(("min_success", f"{values['min_success']} is more than continuations ({values['continuations']})"))
    if values.get("attempts") and values.get("problems"):
        found.append(("attempts", "the attempts file holds the problems too (its problem, answer and reference "
                                  "solution columns): drop --problems"))
    conditions = values.get("conditions")
    if values.get("keep_rule") == KeepRule.lift.value and (Condition.original_step.value not in (conditions or ())
                                                           or values.get("baselines") != Baselines.every.value):
        found.append(("keep_rule", "lift compares each intervention with its own original-step baseline: it needs "
                                   "--condition original-step and --baselines every"))
    if values.get("top_up") and values.get("keep_rule") != KeepRule.lift.value:
        found.append(("top_up", "topping up re-tests a borderline lift: it needs --keep-rule lift"))
    below, alpha = values.get("top_up_below"), values.get("alpha")
    if values.get("top_up") and isinstance(below, (int, float)) and isinstance(alpha, (int, float)) \
            and below <= alpha / 2:
        found.append(("top_up_below", f"{below} is at most alpha/2 ({alpha / 2}): no verdict would be topped up"))
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
        raise UserError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{path}: not a readable TOML file ({exc})") from None
    values = {key.replace("-", "_"): value for key, value in data.items()}
    if "vllm" in values:
        values["vllm_args"] = values.pop("vllm")
    unknown = sorted(set(values) - FIELD_NAMES)
    if unknown:
        raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELD_NAMES))}")
    for name, value in values.items():
        if problem := check_setting(name, value):
            raise UserError(f"{path}: {name.replace('_', '-')}: {problem}")
    return values


def resolve(explicit: dict[str, Any], file_values: dict[str, Any]) -> RunConfig:
    """Defaults < the demo sizes (only when no problem set is given) < the config file < explicit options."""
    for name, value in explicit.items():
        if problem := check_setting(name, value):
            raise UserError(f"--{name.replace('_', '-')}: {problem}")
    values = dict(file_values) | explicit
    if values.get("problems") is None and values.get("attempts") is None:
        values = DEMO | values
    values |= {name: tuple(values[name]) for name in LIST_FIELDS if isinstance(values.get(name), list)}
    for name, problem in cross_checks(values):
        raise UserError(f"{name.replace('_', '-')}: {problem}")
    return RunConfig(**values)


DEFAULTS = RunConfig()


def from_saved(data: dict[str, Any]) -> RunConfig:
    known = {k: v for k, v in data.items() if k in FIELD_NAMES}
    known |= {name: tuple(known[name]) for name in LIST_FIELDS if isinstance(known.get(name), list)}
    return RunConfig(**known)


__all__ = ["DEFAULTS", "DEMO", "EXAMPLE_PROBLEMS", "RunConfig", "from_saved", "read_config_file",
           "resolve"]
