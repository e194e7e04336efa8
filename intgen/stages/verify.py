"""verify: does the intervention fix the attempt? Continue from `steps before the error + intervention`.

The continuation is the same assistant turn (true prefill), never a new user turn. The same machinery
runs the paper's comparison conditions, each continued from a different prefix of the same attempt:

- `intervention`: the steps before the error, then the intervention (the InT condition), per proposal;
- `original-step`: the steps up to and including the original wrong step, per (attempt, error step);
- `resample-step`: the steps before the error (the model re-writes the step itself), per (attempt, error step);
- `problem-only`: nothing (a fresh attempt), per problem.

A baseline depends only on its prefix, so each distinct prefix is continued once (the paper's Table 1),
not once per proposal. An empty prefix is sent as a fresh generation (a new assistant turn), never as an
empty assistant message to continue: chat templates close such a message, and the model would then
write outside any assistant turn.

Table 1 is counted the paper's way, per problem: a problem is solved under a condition when at least one
of its continuations is correct; mean accuracy is over all the condition's continuations.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import polars as pl

from intgen.backends.base import STOP, TOO_LONG, Completion, Request, Sampling, make_request
from intgen.grading import BOXED, LENIENT, Verdict, provisional
from intgen.resources import Prompt
from intgen.stages import Compute, Grading, ModelCalls, Part, Stage
from intgen.stages.grade import SAMPLE_ERROR, TRUNCATED
from intgen.stages.sample import solve_messages
from intgen.steps import join_steps, steps_at


class Condition(str, Enum):
    intervention = "intervention"
    original_step = "original-step"
    resample_step = "resample-step"
    problem_only = "problem-only"


def prefix_id(condition: Condition, proposal: dict[str, Any]) -> str:
    """The id of what a condition continues from: the proposal for `intervention`; the attempt and its error
    step for the two step baselines; the problem for `problem-only`."""
    if condition is Condition.intervention:
        return proposal["proposal_id"]
    if condition is Condition.problem_only:
        return f"{proposal['problem_id']}/{condition.value}"
    return f"{proposal['attempt_id']}/s{proposal['error_step']}/{condition.value}"


def continuation_id(prefix: str, index: int) -> str:
    return f"{prefix}/c{index}"


def intervened_text(steps: list[str], error_step: int, intervention: str) -> str:
    """The attempt's own steps before the error, then the intervention: what SFT trains on (never the suffix)."""
    return join_steps(steps[: error_step - 1]) + intervention.strip()


def continuation_prefix(steps: list[str], error_step: int, intervention: str, condition: Condition) -> str:
    """The assistant-message prefix each condition continues from (1-based `error_step`)."""
    if condition is Condition.intervention:
        return intervened_text(steps, error_step, intervention) + "\n\n"
    if condition is Condition.original_step:
        return join_steps(steps[:error_step])
    if condition is Condition.resample_step:
        return join_steps(steps[: error_step - 1])
    return ""


# --- the stage ----------------------------------------------------------------------------------

CONTINUATION_SCHEMA = {
    "continuation_id": pl.String, "prefix_id": pl.String, "proposal_id": pl.String, "problem_id": pl.String,
    "condition": pl.String, "prefix_chars": pl.Int64, "text": pl.String, "finish_reason": pl.String,
    "true_continuation": pl.Boolean, "correct": pl.Boolean, "predicted": pl.String, "grade_reason": pl.String,
    "error": pl.String, "completion_tokens": pl.Int64,
}
VERIFY_SCHEMA = {
    "prefix_id": pl.String, "condition": pl.String, "problem_id": pl.String, "attempt_id": pl.String,
    "proposal_id": pl.String, "error_step": pl.Int32, "prefix_chars": pl.Int64, "continuations": pl.Int32,
    "successes": pl.Int32, "ungradable": pl.Int32, "success_rate": pl.Float64, "true_continuation": pl.Boolean,
    "kept": pl.Boolean, "error": pl.String,
}


@dataclass(frozen=True)
class VerifySettings:
    continuations: int
    sampling: Sampling
    solve_prompt: Prompt
    system_prompt: str | None = None
    min_success: int = 1
    conditions: tuple[Condition, ...] = (Condition.intervention,)
    lenient: bool = False


@dataclass(frozen=True)
class Job:
    """One verify request: a distinct prefix, the condition it stands for, and the request continuing it."""

    prefix_id: str
    condition: Condition
    proposal: dict[str, Any]  # the (first) proposal it was made for
    prefix: str
    request: Request


def fingerprint(s: VerifySettings) -> dict[str, Any]:
    return {
        "continuations": s.continuations, "sampling": s.sampling.to_dict(), "min_success": s.min_success,
        "conditions": [c.value for c in s.conditions], "prompt_sha256": s.solve_prompt.sha256,
        "system_prompt": s.system_prompt, "lenient": s.lenient,
    }


def continuation_request(problem: str, prefix: str, s: VerifySettings) -> Request:
    """Continue `prefix` as the assistant's own turn; an empty prefix is a fresh generation."""
    messages = solve_messages(problem, s.solve_prompt.text, s.system_prompt)
    if not prefix:
        return make_request(messages, s.sampling, n=s.continuations)
    messages.append({"role": "assistant", "content": prefix})
    return make_request(messages, s.sampling, n=s.continuations, continue_final=True)


def verify_jobs(proposals: list[dict[str, Any]], problems: dict[str, dict[str, Any]], texts: dict[str, str],
                s: VerifySettings) -> list[Job]:
    """One job per distinct prefix, in the order the proposals first need them."""
    jobs: dict[str, Job] = {}
    for proposal in proposals:
        steps = steps_at(texts[proposal["attempt_id"]], proposal["step_ends"])  # exactly the steps propose numbered
        for condition in s.conditions:
            key = prefix_id(condition, proposal)
            if key not in jobs:
                prefix = continuation_prefix(steps, proposal["error_step"], proposal["intervention"], condition)
                request = continuation_request(problems[proposal["problem_id"]]["problem"], prefix, s)
                jobs[key] = Job(key, condition, proposal, prefix, request)
    return list(jobs.values())


PREFIX_TOO_LONG = "prefix_too_long"  # the prompt and prefix did not fit the model's context: not retried


def continuation_row(job: Job, index: int, c: Completion, verdict: Verdict | None) -> dict[str, Any]:
    reason = verdict.reason if verdict else (
        SAMPLE_ERROR if c.error else PREFIX_TOO_LONG if c.finish_reason == TOO_LONG else TRUNCATED)
    return {
        "continuation_id": continuation_id(job.prefix_id, index), "prefix_id": job.prefix_id,
        "proposal_id": job.proposal["proposal_id"] if job.condition is Condition.intervention else None,
        "problem_id": job.proposal["problem_id"], "condition": job.condition.value, "prefix_chars": len(job.prefix),
        "text": c.text, "finish_reason": c.finish_reason, "true_continuation": c.true_continuation,
        "correct": verdict.correct if verdict else None, "predicted": verdict.predicted if verdict else None,
        "grade_reason": reason, "error": c.error or (provisional(verdict) if verdict else None),
        "completion_tokens": c.completion_tokens,
    }


def verify_row(job: Job, rows: list[dict[str, Any]], completions: list[Completion], min_success: int) -> dict[str, Any]:
    """A prefix's success count and rate; `kept`: the intervention condition with at least `min_success`
    correct continuations, all of which arrived."""
    successes = sum(row["correct"] is True for row in rows)
    errors = [row["error"] for row in rows if row["error"] is not None]  # failed calls and grading timeouts
    problem_only = job.condition is Condition.problem_only
    return {
        "prefix_id": job.prefix_id, "condition": job.condition.value, "problem_id": job.proposal["problem_id"],
        "attempt_id": None if problem_only else job.proposal["attempt_id"],
        "proposal_id": job.proposal["proposal_id"] if job.condition is Condition.intervention else None,
        "error_step": None if problem_only else job.proposal["error_step"], "prefix_chars": len(job.prefix),
        "continuations": len(completions), "successes": successes,
        "ungradable": sum(row["correct"] is None for row in rows),
        "success_rate": successes / len(completions) if completions else 0.0,
        "true_continuation": all(c.true_continuation for c in completions),
        "kept": job.condition is Condition.intervention and successes >= min_success and not errors,
        "error": errors[0] if errors else None,
    }


def compute(part: Part, s: VerifySettings) -> Compute:
    problems = part.problems()
    texts = {row["attempt_id"]: row["text"] for row in part.tables["samples"]}
    jobs = verify_jobs([p for p in part.tables["proposals"] if p["accepted"]], problems, texts, s)
    outs = (yield ModelCalls([job.request for job in jobs])) if jobs else []
    items, where = [], []
    for j, (job, completions) in enumerate(zip(jobs, outs)):
        for m, c in enumerate(completions):
            if c.error is None and c.finish_reason == STOP:
                items.append((problems[job.proposal["problem_id"]]["answer"], job.prefix + c.text,
                              LENIENT if s.lenient else BOXED))
                where.append((j, m))
    verdicts = dict(zip(where, (yield Grading(items)) if items else []))
    continuations, verified = [], []
    for j, (job, completions) in enumerate(zip(jobs, outs)):
        rows = [continuation_row(job, m, c, verdicts.get((j, m))) for m, c in enumerate(completions)]
        continuations += rows
        verified.append(verify_row(job, rows, completions, s.min_success))
    return {"verify": verified, "continuations": continuations}


# --- Table 1 ------------------------------------------------------------------------------------

BASELINE = Condition.original_step.value
RESAMPLES = 2000


def _ratio_interval(num: np.ndarray, den: np.ndarray, rng: np.random.Generator) -> list[float | None]:
    """95% percentile-bootstrap interval, over problems, of sum(num) / sum(den) (paired: same resamples)."""
    idx = rng.integers(0, len(num), size=(RESAMPLES, len(num)))
    tops, bottoms = num[idx].sum(axis=1), den[idx].sum(axis=1)
    return _interval(np.divide(tops, bottoms, out=np.full(RESAMPLES, np.inf), where=bottoms > 0))


def _interval(ratios: np.ndarray) -> list[float | None]:
    """The 2.5th and 97.5th percentiles (nearest rank: an undefined ratio, inf, may be one; then None)."""
    low, high = np.quantile(ratios, [0.025, 0.975], method="inverted_cdf")
    return [float(low) if np.isfinite(low) else None, float(high) if np.isfinite(high) else None]


def table1(continuations: pl.LazyFrame, seed: int = 0) -> dict[str, Any]:
    """Per condition: problems solved (>= 1 correct continuation) / problems, mean accuracy over its
    continuations, and each condition against `original-step` with 95% bootstrap intervals over problems."""
    per_problem = (
        continuations.filter(pl.col("error").is_null())
        .group_by("condition", "problem_id")
        .agg(pl.len().alias("n"), (pl.col("correct") == True).sum().alias("correct"))  # noqa: E712
        .collect()
    )
    problems = sorted(set(per_problem["problem_id"].to_list()))
    index = {p: i for i, p in enumerate(problems)}
    arrays = {}
    for (condition,), group in per_problem.group_by("condition"):
        n, correct = np.zeros(len(problems)), np.zeros(len(problems))
        for row in group.iter_rows(named=True):
            n[index[row["problem_id"]]], correct[index[row["problem_id"]]] = row["n"], row["correct"]
        arrays[condition] = (n, correct)
    rng = np.random.default_rng(seed)
    table: dict[str, Any] = {}
    for condition in sorted(arrays, key=[c.value for c in Condition].index):
        n, correct = arrays[condition]
        row: dict[str, Any] = {
            "problems": int((n > 0).sum()), "solved": int((correct > 0).sum()), "continuations": int(n.sum()),
            "correct": int(correct.sum()), "mean_accuracy": float(correct.sum() / n.sum()) if n.sum() else 0.0,
        }
        if BASELINE in arrays and condition != BASELINE:
            base_n, base_correct = arrays[BASELINE]
            solved, base_solved = (correct > 0).astype(float), (base_correct > 0).astype(float)
            row["vs_original_step"] = {
                "solved_ratio": float(solved.sum() / base_solved.sum()) if base_solved.sum() else None,
                "solved_ratio_ci95": _ratio_interval(solved, base_solved, rng),
                "accuracy_ratio": _accuracy_ratio(correct, n, base_correct, base_n),
                "accuracy_ratio_ci95": _accuracy_interval(correct, n, base_correct, base_n, rng),
            }
        table[condition] = row
    return {"problems": len(problems), "bootstrap_resamples": RESAMPLES, "seed": seed, "conditions": table}


def _accuracy_ratio(correct: np.ndarray, n: np.ndarray, base_correct: np.ndarray, base_n: np.ndarray) -> float | None:
    if not n.sum() or not base_n.sum() or not base_correct.sum():
        return None
    return float((correct.sum() / n.sum()) / (base_correct.sum() / base_n.sum()))


def _accuracy_interval(correct: np.ndarray, n: np.ndarray, base_correct: np.ndarray, base_n: np.ndarray,
                       rng: np.random.Generator) -> list[float | None]:
    """Interval of (mean accuracy) / (baseline mean accuracy): accuracy is pooled over the resampled
    problems' continuations, so it is a ratio of sums, rescaled by the continuation counts."""
    idx = rng.integers(0, len(n), size=(RESAMPLES, len(n)))
    acc = np.divide(correct[idx].sum(1), n[idx].sum(1), out=np.zeros(RESAMPLES), where=n[idx].sum(1) > 0)
    base = np.divide(base_correct[idx].sum(1), base_n[idx].sum(1), out=np.zeros(RESAMPLES), where=base_n[idx].sum(1) > 0)
    return _interval(np.divide(acc, base, out=np.full(RESAMPLES, np.inf), where=base > 0))


def summarize(tables: dict[str, pl.LazyFrame], s: VerifySettings) -> dict[str, Any]:
    table, continuations = tables["verify"], tables["continuations"]
    intervention = table.filter(pl.col("condition") == Condition.intervention.value)
    counts = intervention.select(
        pl.col("error").is_null().sum().alias("verified"),
        pl.col("kept").sum().alias("kept"),
        pl.col("problem_id").filter(pl.col("kept")).n_unique().alias("problems_with_kept"),
    ).collect().row(0, named=True)
    arrived = continuations.filter(
        (pl.col("condition") == Condition.intervention.value) & pl.col("error").is_null()
    ).select(pl.len(), (pl.col("correct") == True).sum()).collect().row(0)  # noqa: E712
    return {
        **counts,
        "continuation_rows": continuations.select(pl.len()).collect().item(),
        "intervention_continuations": arrived[0], "intervention_correct": arrived[1],
        "table1": table1(continuations),
    }


def work(part: Part, s: VerifySettings) -> int:
    """Samples asked for: M per distinct prefix of the accepted proposals."""
    texts = {row["attempt_id"]: row["text"] for row in part.tables["samples"]}
    return len(verify_jobs([p for p in part.tables["proposals"] if p["accepted"]], part.problems(), texts, s)) \
        * s.continuations


STAGE = Stage(
    name="verify", reads=("proposals", "problems", "samples"), work=work,
    writes={"verify": VERIFY_SCHEMA, "continuations": CONTINUATION_SCHEMA},
    fingerprint=fingerprint, compute=compute, summarize=summarize,
)
