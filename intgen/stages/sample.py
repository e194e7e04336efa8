"""sample: K attempts per problem from the policy model.

The prompt asks for the final answer in `\\boxed{}` (the InT release's rollouts did not, a defect).
An attempt cut off by `max_tokens` is kept and marked `truncated`, never silently graded as wrong.
`solve_messages` is the one place the policy's prompt is built: sampling, verification and the
exported SFT and RL prompts all use it, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from intgen.backends.base import ERROR, LENGTH, Completion, Request, Sampling, make_request
from intgen.io import GIVEN_ATTEMPTS
from intgen.resources import Prompt, fill
from intgen.stages import Compute, ModelCalls, Part, Stage

ATTEMPT_SCHEMA = {
    "problem_id": pl.String,
    "attempt_id": pl.String,
    "sample_index": pl.Int32,
    "text": pl.String,
    "finish_reason": pl.String,
    "truncated": pl.Boolean,
    "error": pl.String,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "cached": pl.Boolean,
}
GIVEN = "given"  # the finish reason of an attempt made elsewhere (--attempts)


@dataclass(frozen=True)
class SampleSettings:
    samples: int
    sampling: Sampling
    solve_prompt: Prompt
    system_prompt: str | None = None
    given: str | None = None  # --attempts: where the attempts were made (each problem's `given_attempts`)


def attempt_id(problem_id: str, index: int) -> str:
    return f"{problem_id}/a{index}"


def solve_messages(problem: str, template: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The policy's prompt for a problem: an optional system message, then the solve template around it."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": fill(template, problem=problem)}]


def sample_requests(
    problems: list[dict[str, Any]], template: str, sampling: Sampling, samples: int, system_prompt: str | None = None
) -> list[Request]:
    return [make_request(solve_messages(p["problem"], template, system_prompt), sampling, n=samples) for p in problems]


def attempt_rows(problems: list[dict[str, Any]], completions: list[list[Completion]]) -> list[dict[str, Any]]:
    rows = []
    for problem, outs in zip(problems, completions):
        for index, c in enumerate(outs):
            rows.append(
                {
                    "problem_id": problem["problem_id"],
                    "attempt_id": attempt_id(problem["problem_id"], index),
                    "sample_index": index,
                    "text": c.text if c.finish_reason != ERROR else None,
                    "finish_reason": c.finish_reason,
                    "truncated": c.finish_reason == LENGTH,
                    "error": c.error,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                    "cached": c.cached,
                }
            )
    return rows


def given_rows(problems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Attempts made elsewhere (--attempts), as attempt rows: no finish reason or token counts are known, and
    none is taken as truncated (grading says whether it has an answer)."""
    completions = [[Completion(text=a["text"], finish_reason=GIVEN) for a in p[GIVEN_ATTEMPTS]] for p in problems]
    return attempt_rows(problems, completions)


def fingerprint(s: SampleSettings) -> dict[str, Any]:
    if s.given is not None:  # nothing sampled: the attempts are the problems table's (its digest is the input's)
        return {"given": s.given}
    return {
        "samples": s.samples,
        "sampling": s.sampling.to_dict(),
        "prompt_sha256": s.solve_prompt.sha256,
        "system_prompt": s.system_prompt,
    }


def compute(part: Part, s: SampleSettings) -> Compute:
    problems = part.tables["problems"]
    if s.given is not None:
        return {"samples": given_rows(problems)}
    requests = sample_requests(problems, s.solve_prompt.text, s.sampling, s.samples, s.system_prompt)
    completions = yield ModelCalls(requests)
    return {"samples": attempt_rows(problems, completions)}


def summarize(tables: dict[str, pl.LazyFrame], s: SampleSettings) -> dict[str, Any]:
    return {
        "prompt_file": s.solve_prompt.name,
        "problems": tables["problems"].select(pl.len()).collect().item(),
        "truncated": tables["samples"].select(pl.col("truncated").sum()).collect().item(),
        "attempts_given": s.given,  # None: sampled here
    }


STAGE = Stage(
    name="sample", reads=("problems",), writes={"samples": ATTEMPT_SCHEMA},
    fingerprint=fingerprint, compute=compute, summarize=summarize,
    work=lambda part, s: 0 if s.given is not None else len(part.tables["problems"]) * s.samples,
)
