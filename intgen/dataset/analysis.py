"""Table 1 of the InT paper for a run: does continuing from the intervention solve more than the baselines?

Counted on a **matched set**, chosen before any continuation is seen: per problem, one failed attempt, its
error step and one intervention (the verify stage's `matched` unit: the first accepted proposal of the first
failed attempt that has one), and the baselines of that same attempt and step. Every condition is continued
the same number of times (M) on the same problems, each an independent draw, so the conditions are compared
at equal budgets. A problem enters the table only when every condition's M continuations all arrived (no
failed call, no prefix too long for the context); the others are counted as left out, by reason.

Per condition: problems solved (at least one correct continuation, as the paper counts) and mean accuracy
(the mean over problems of correct / M: every problem weighs the same); then each condition against
`original-step` — the ratio of problems solved and of mean accuracy — with a 95% percentile-bootstrap
interval over problems (paired: the same resampled problems for both sides).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

BASELINE = "original-step"
RESAMPLES = 2000
SELECTION_RULE = (
    "one matched unit per problem, chosen before any continuation is seen: the first accepted proposal (p0, p1, ...) "
    "of the first failed attempt (a0, a1, ...) that has one, and the original-step, resample-step and problem-only "
    "baselines of that same attempt and error step; every condition continued M times, each an independent draw; "
    "a problem counts only when all its conditions' continuations arrived"
)
PREFIX_TOO_LONG = "prefix_too_long"


def table1(continuations: pl.LazyFrame, conditions: list[str], per_condition: int, seed: int = 0) -> dict[str, Any]:
    """Table 1 over the matched continuations (`matched` rows of the continuations table); `conditions` in the
    order to show them, `per_condition` = M."""
    per_problem = (
        continuations.filter(pl.col("matched"))
        .group_by("problem_id", "condition")
        .agg(
            pl.len().alias("n"),
            pl.col("error").is_not_null().sum().alias("failed"),
            (pl.col("grade_reason") == PREFIX_TOO_LONG).sum().alias("too_long"),
            (pl.col("correct") == True).sum().alias("correct"),  # noqa: E712 (null: not correct)
        )
        .collect()
    )
    cells = {(r["problem_id"], r["condition"]): r for r in per_problem.iter_rows(named=True)}
    problems, left_out = [], {"failed_calls": 0, "prefix_too_long": 0}
    for problem in sorted({p for p, _ in cells}):
        row = [cells.get((problem, c)) for c in conditions]
        if any(r is None or r["failed"] for r in row):
            left_out["failed_calls"] += 1
        elif any(r["too_long"] for r in row):
            left_out["prefix_too_long"] += 1
        elif all(r["n"] == per_condition for r in row):
            problems.append(problem)
        else:  # a part written by a run with another M: never mixed into one table
            left_out["failed_calls"] += 1
    correct = {c: np.array([cells[(p, c)]["correct"] for p in problems], dtype=float) for c in conditions}
    rng = np.random.default_rng(seed)
    table: dict[str, Any] = {}
    for condition in conditions if problems else []:
        hits = correct[condition]
        row: dict[str, Any] = {
            "problems": len(problems), "solved": int((hits > 0).sum()), "continuations": len(problems) * per_condition,
            "correct": int(hits.sum()), "mean_accuracy": float(hits.mean() / per_condition) if len(problems) else 0.0,
        }
        if BASELINE in correct and condition != BASELINE:
            base = correct[BASELINE]
            solved, base_solved = (hits > 0).astype(float), (base > 0).astype(float)
            row["vs_original_step"] = {
                "solved_ratio": ratio(solved, base_solved),
                "solved_ratio_ci95": ratio_interval(solved, base_solved, rng),
                # every problem has M continuations in both conditions: the ratio of mean accuracies is that of sums
                "accuracy_ratio": ratio(hits, base),
                "accuracy_ratio_ci95": ratio_interval(hits, base, rng),
            }
        table[condition] = row
    return {
        "problems": len(problems), "continuations_per_condition": per_condition, "selection": SELECTION_RULE,
        "left_out": left_out, "bootstrap_resamples": RESAMPLES, "seed": seed, "conditions": table,
    }


def ratio(num: np.ndarray, den: np.ndarray) -> float | None:
    return float(num.sum() / den.sum()) if den.sum() else None


def ratio_interval(num: np.ndarray, den: np.ndarray, rng: np.random.Generator) -> list[float | None]:
    """95% percentile-bootstrap interval of sum(num) / sum(den), resampling problems (the same for both)."""
    if not len(num):
        return [None, None]
    idx = rng.integers(0, len(num), size=(RESAMPLES, len(num)))
    tops, bottoms = num[idx].sum(axis=1), den[idx].sum(axis=1)
    ratios = np.divide(tops, bottoms, out=np.full(RESAMPLES, np.inf), where=bottoms > 0)
    # nearest rank: an undefined ratio (inf, a resample with no baseline success) may be an end; then None
    low, high = np.quantile(ratios, [0.025, 0.975], method="inverted_cdf")
    return [float(low) if np.isfinite(low) else None, float(high) if np.isfinite(high) else None]


def matched_units(verify: pl.LazyFrame) -> list[dict[str, Any]]:
    """Which proposal stood for each problem in Table 1 (its attempt and error step)."""
    return (
        verify.filter(pl.col("matched") & (pl.col("condition") == "intervention"))
        .select("problem_id", "proposal_id", "attempt_id", "error_step")
        .sort("problem_id")
        .collect()
        .to_dicts()
    )
