"""verify: does the intervention fix the attempt? Continue from `steps before the error + intervention`.

The continuation is the same assistant turn (true prefill), never a new user turn. The same machinery
runs the paper's comparison conditions, each continued from a different prefix of the same attempt:

- `intervention`: the steps before the error, then the intervention (the InT condition);
- `original-step`: the steps up to and including the original wrong step;
- `resample-step`: the steps before the error (the model re-writes the step itself);
- `problem-only`: nothing (a fresh attempt).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import polars as pl

from intgen.backends.base import Completion, Request, Sampling, make_request
from intgen.grading import BOXED, LENIENT, Verdict
from intgen.resources import Prompt
from intgen.stages import Compute, Grading, ModelCalls, Part, Stage
from intgen.stages.grade import SAMPLE_ERROR, TRUNCATED
from intgen.stages.sample import solve_messages
from intgen.steps import join_steps, split_steps


class Condition(str, Enum):
    intervention = "intervention"
    original_step = "original-step"
    resample_step = "resample-step"
    problem_only = "problem-only"


def continuation_id(proposal_id: str, condition: Condition, index: int) -> str:
    suffix = "" if condition is Condition.intervention else f"/{condition.value}"
    return f"{proposal_id}{suffix}/c{index}"


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
    "continuation_id": pl.String, "proposal_id": pl.String, "problem_id": pl.String, "condition": pl.String,
    "prefix_chars": pl.Int64, "text": pl.String, "finish_reason": pl.String, "true_continuation": pl.Boolean,
    "correct": pl.Boolean, "predicted": pl.String, "grade_reason": pl.String, "error": pl.String,
    "completion_tokens": pl.Int64,
}
VERIFY_SCHEMA = {
    "proposal_id": pl.String, "problem_id": pl.String, "attempt_id": pl.String, "condition": pl.String,
    "continuations": pl.Int32, "successes": pl.Int32, "ungradable": pl.Int32, "success_rate": pl.Float64,
    "true_continuation": pl.Boolean, "kept": pl.Boolean, "error": pl.String,
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
    """One verify request: a proposal, a condition and the assistant prefix it continues."""

    proposal: dict[str, Any]
    condition: Condition
    prefix: str
    request: Request


def fingerprint(s: VerifySettings) -> dict[str, Any]:
    return {
        "continuations": s.continuations, "sampling": s.sampling.to_dict(), "min_success": s.min_success,
        "conditions": [c.value for c in s.conditions], "prompt_sha256": s.solve_prompt.sha256,
        "system_prompt": s.system_prompt, "lenient": s.lenient,
    }


def verify_jobs(proposals: list[dict[str, Any]], problems: dict[str, dict[str, Any]], texts: dict[str, str],
                s: VerifySettings) -> list[Job]:
    jobs = []
    for proposal in proposals:
        steps = split_steps(texts[proposal["attempt_id"]])
        problem = problems[proposal["problem_id"]]
        for condition in s.conditions:
            prefix = continuation_prefix(steps, proposal["error_step"], proposal["intervention"], condition)
            messages = solve_messages(problem["problem"], s.solve_prompt.text, s.system_prompt)
            messages.append({"role": "assistant", "content": prefix})
            request = make_request(messages, s.sampling, n=s.continuations, continue_final=True)
            jobs.append(Job(proposal, condition, prefix, request))
    return jobs


def continuation_row(job: Job, index: int, c: Completion, verdict: Verdict | None) -> dict[str, Any]:
    reason = verdict.reason if verdict else (SAMPLE_ERROR if c.error else TRUNCATED)
    return {
        "continuation_id": continuation_id(job.proposal["proposal_id"], job.condition, index),
        "proposal_id": job.proposal["proposal_id"], "problem_id": job.proposal["problem_id"],
        "condition": job.condition.value, "prefix_chars": len(job.prefix), "text": c.text,
        "finish_reason": c.finish_reason, "true_continuation": c.true_continuation,
        "correct": verdict.correct if verdict else None, "predicted": verdict.predicted if verdict else None,
        "grade_reason": reason, "error": c.error, "completion_tokens": c.completion_tokens,
    }


def verify_row(job: Job, rows: list[dict[str, Any]], completions: list[Completion], min_success: int) -> dict[str, Any]:
    """A job's success count and rate; `kept`: the intervention condition with at least `min_success`."""
    successes = sum(row["correct"] is True for row in rows)
    errors = [c.error for c in completions if c.error is not None]
    return {
        "proposal_id": job.proposal["proposal_id"], "problem_id": job.proposal["problem_id"],
        "attempt_id": job.proposal["attempt_id"], "condition": job.condition.value,
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
            if c.error is None and c.finish_reason != "length":
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


def summarize(tables: dict[str, pl.LazyFrame], s: VerifySettings) -> dict[str, Any]:
    table = tables["verify"]
    by_condition = table.group_by("condition").agg(
        pl.len().alias("proposals"),
        (pl.col("successes") > 0).sum().alias("solved"),
        pl.col("success_rate").mean().alias("mean_success_rate"),
    ).collect()
    return {
        "kept": table.select(pl.col("kept").sum()).collect().item(),
        "continuation_rows": tables["continuations"].select(pl.len()).collect().item(),
        "by_condition": {row["condition"]: {k: row[k] for k in ("proposals", "solved", "mean_success_rate")}
                         for row in by_condition.iter_rows(named=True)},
    }


STAGE = Stage(
    name="verify", reads=("proposals", "problems", "samples"),
    writes={"verify": VERIFY_SCHEMA, "continuations": CONTINUATION_SCHEMA},
    fingerprint=fingerprint, compute=compute, summarize=summarize,
)
