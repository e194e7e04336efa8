"""grade: a verdict for every attempt, and each problem's pass rate.

A truncated attempt (cut off by max_tokens) or a failed call has no final answer to grade: it is
ungradable with that reason, never silently "wrong".
"""

from __future__ import annotations

import polars as pl

from intgen.grading import Verdict

TRUNCATED = "truncated"
SAMPLE_ERROR = "sample_error"

GRADE_COLUMNS = {"correct": pl.Boolean, "predicted": pl.String, "grade_reason": pl.String}


def needs_grading(attempt: dict) -> str | None:
    """None if the attempt can be graded, else the reason it cannot."""
    if attempt.get("error") is not None or attempt.get("text") is None:
        return SAMPLE_ERROR
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
