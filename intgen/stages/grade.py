"""grade: a verdict for every attempt, and each problem's pass rate.

A truncated attempt (cut off by max_tokens) or a failed call has no final answer to grade: it is
ungradable with that reason, never silently "wrong". With `hard_only`, only the problems whose pass
rate is at most `hard_threshold` are selected for proposals (the paper: 0 correct out of 64-128).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from intgen.backends.base import TOO_LONG
from intgen.grading import BOXED, LENIENT, Verdict, provisional
from intgen.io import GIVEN_ATTEMPTS
from intgen.stages import Compute, Grading, Part, Stage, count_failures
from intgen.stages.sample import ATTEMPT_SCHEMA

TRUNCATED = "truncated"
SAMPLE_ERROR = "sample_error"
PROMPT_TOO_LONG = "prompt_too_long"  # the prompt did not fit the model's context
GIVEN_INCORRECT = "given_incorrect"  # --attempts: the file says so (not graded)

GRADE_COLUMNS = {"correct": pl.Boolean, "predicted": pl.String, "grade_reason": pl.String}
PASS_RATE_SCHEMA = {
    "problem_id": pl.String, "attempts": pl.Int64, "correct": pl.Int64, "incorrect": pl.Int64,
    "ungradable": pl.Int64, "truncated": pl.Int64, "pass_rate": pl.Float64, "selected": pl.Boolean,
}


@dataclass(frozen=True)
class GradeSettings:
    timeout: float = 5.0
    lenient: bool = False  # read an unboxed response for the answer it states (small models)
    hard_only: bool = False
    hard_threshold: float = 0.0


def needs_grading(attempt: dict) -> str | None:
    """None if the attempt can be graded, else the reason it cannot."""
    if attempt.get("error") is not None or attempt.get("text") is None:
        return SAMPLE_ERROR
    if attempt.get("finish_reason") == TOO_LONG:
        return PROMPT_TOO_LONG
    if attempt.get("truncated"):
        return TRUNCATED
    return None


def verdict_columns(attempts: list[dict], verdicts: dict[int, Verdict]) -> list[dict]:
    """The grade columns for each attempt; `verdicts` holds the graded ones by position."""
    columns = []
    for index, attempt in enumerate(attempts):
        verdict = verdicts.get(index)
        if verdict is None:
            columns.append({"correct": None, "predicted": None, "grade_reason": needs_grading(attempt)})
        else:
            columns.append({"correct": verdict.correct, "predicted": verdict.predicted, "grade_reason": verdict.reason})
    return columns


def pass_rates(graded: pl.LazyFrame) -> pl.LazyFrame:
    """Per problem: attempts, correct, incorrect, ungradable, truncated and pass rate (correct / attempts)."""
    return (
        graded.group_by("problem_id", maintain_order=True)
        .agg(
            pl.len().alias("attempts"),
            (pl.col("correct") == True).sum().alias("correct"),  # noqa: E712 (null stays out)
            (pl.col("correct") == False).sum().alias("incorrect"),  # noqa: E712
            pl.col("correct").is_null().sum().alias("ungradable"),
            pl.col("truncated").sum().alias("truncated"),
        )
        .with_columns((pl.col("correct") / pl.col("attempts")).alias("pass_rate"))
    )


def fingerprint(s: GradeSettings) -> dict[str, Any]:
    from intgen.grading import grader_version

    return {"grader": grader_version(), "timeout": s.timeout, "lenient": s.lenient, "hard_only": s.hard_only,
            "hard_threshold": s.hard_threshold}


def given_verdicts(problems: list[dict[str, Any]], attempts: list[dict[str, Any]]) -> dict[int, Verdict]:
    """--attempts: the attempts whose file says they are incorrect (its `correct` column false), by position."""
    given = {p["problem_id"]: p.get(GIVEN_ATTEMPTS) for p in problems}
    return {i: Verdict(False, None, GIVEN_INCORRECT) for i, a in enumerate(attempts)
            if (made := given.get(a["problem_id"])) and made[a["sample_index"]]["correct"] is False}


def to_grade(attempts: list[dict[str, Any]], known: dict[int, Verdict]) -> list[int]:
    return [i for i, row in enumerate(attempts) if needs_grading(row) is None and i not in known]


def compute(part: Part, s: GradeSettings) -> Compute:
    answers = {p["problem_id"]: p["answer"] for p in part.tables["problems"]}
    attempts = part.tables["samples"]
    known = given_verdicts(part.tables["problems"], attempts)
    todo = to_grade(attempts, known)
    mode = LENIENT if s.lenient else BOXED
    verdicts = yield Grading([(answers[attempts[i]["problem_id"]], attempts[i]["text"], mode) for i in todo])
    graded = [a | v for a, v in zip(attempts, verdict_columns(attempts, known | dict(zip(todo, verdicts))))]
    for i, verdict in zip(todo, verdicts):
        graded[i]["error"] = graded[i]["error"] or provisional(verdict)  # a timeout is retried, never final
    rates = pass_rates(pl.LazyFrame(graded, schema=ATTEMPT_SCHEMA | GRADE_COLUMNS)).with_columns(
        (pl.col("pass_rate") <= s.hard_threshold if s.hard_only else pl.lit(True)).alias("selected")
    )
    return {"graded": graded, "pass_rates": rates.collect().to_dicts()}


def summarize(tables: dict[str, pl.LazyFrame], s: GradeSettings) -> dict[str, Any]:
    graded, rates = tables["graded"], tables["pass_rates"]
    counts = graded.select(
        (pl.col("correct") == True).sum().alias("correct"),  # noqa: E712
        (pl.col("correct") == False).sum().alias("incorrect"),  # noqa: E712
        pl.col("correct").is_null().sum().alias("ungradable"),
    ).collect().row(0, named=True)
    reasons = graded.filter(pl.col("correct").is_null()).group_by("grade_reason").len().collect()
    selected = rates.select(pl.col("selected").sum(), pl.col("pass_rate").mean()).collect().row(0)
    return {
        **counts,
        "ungradable_by_reason": dict(zip(reasons["grade_reason"].to_list(), reasons["len"].to_list())),
        "problems_selected": int(selected[0]),
        "mean_pass_rate": float(selected[1] or 0.0),
    }


STAGE = Stage(
    name="grade", reads=("samples", "problems"),
    writes={"graded": ATTEMPT_SCHEMA | GRADE_COLUMNS, "pass_rates": PASS_RATE_SCHEMA},
    fingerprint=fingerprint, compute=compute, summarize=summarize, uses_model=False,
    # a failed sample is the sample stage's failure (retried there); only the grader's own timeouts count here
    failures=lambda frame: count_failures(frame, prefix="grade_"),
    work=lambda part, s: len(to_grade(part.tables["samples"], given_verdicts(part.tables["problems"],
                                                                          part.tables["samples"]))),
)
