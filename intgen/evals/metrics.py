"""`intgen eval`: how good is a model on a benchmark, measured with the pipeline's own sample and grade stages
(the same solve prompt as the dataset's SFT and RL prompts, the same cache and resume).

Per problem with n attempts of which c are correct:
- avg@K: the mean of c / n over problems (the paper's "average accuracy over 128 rollouts");
- pass@k for k = 1, 2, 4, ... <= K: the unbiased estimator of Chen et al. (2021), 1 - C(n - c, k) / C(n, k);
- maj@K: the majority vote over the gradable answers, clustered by math equivalence (not string equality);
  a tie between the correct answer and wrong ones counts as 1 / (number of tied answers), the chance of a
  fair tie-break;
- the share of ungradable and of truncated attempts.
Each with a 95% percentile-bootstrap interval over problems, overall and per `source`. A failed call (an attempt
the server never answered) is no attempt: it is left out of every metric and counted in `failed_calls`; a
problem with no answered attempt is listed in `unanswered_problems`, not scored 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import polars as pl

from intgen.grading import normalize_text

PAPER_PROTOCOL = {"samples": 128, "max_tokens": 16384, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
RESAMPLES = 2000


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k), computed as a product so it neither overflows nor loses precision."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} attempts, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def ks(samples: int) -> list[int]:
    """The k of pass@k reported for K samples: 1, 2, 4, ... up to K."""
    return [2**i for i in range(int(math.log2(samples)) + 1)] if samples >= 1 else []


def cluster_sizes(answers: Sequence[str], equivalent: Callable[[str, list[str]], list[bool | None]]) -> list[int]:
    """Sizes of the groups of equivalent answers: exact (normalised) matches first, then each group joins the
    first earlier group whose representative `equivalent` says is the same answer."""
    groups: dict[str, int] = {}
    for answer in answers:
        key = normalize_text(answer)
        groups[key] = groups.get(key, 0) + 1
    representatives: list[str] = []
    sizes: list[int] = []
    for key, size in sorted(groups.items(), key=lambda item: -item[1]):
        same = equivalent(key, representatives) if representatives else []
        match = next((i for i, s in enumerate(same) if s is True), None)
        if match is None:
            representatives.append(key)
            sizes.append(size)
        else:
            sizes[match] += size
    return sizes


def majority_correct(correct: int, wrong_answers: Sequence[str],
                     equivalent: Callable[[str, list[str]], list[bool | None]]) -> float:
    """maj@K for one problem: 1 when the correct answer is the plurality, 1/t when it ties with t - 1 others."""
    if correct == 0:
        return 0.0
    if len(wrong_answers) < correct:
        return 1.0  # no group of wrong answers can be as large
    sizes = cluster_sizes(wrong_answers, equivalent)
    largest = max(sizes, default=0)
    if largest > correct:
        return 0.0
    return 1.0 if largest < correct else 1.0 / (1 + sizes.count(largest))


def answered(graded: pl.DataFrame) -> pl.DataFrame:
    """The attempts a server answered (a failed call has its error, and no text)."""
    return graded.filter(pl.col("error").is_null()) if "error" in graded.columns else graded


def failed_calls(graded: pl.DataFrame) -> dict[str, int]:
    """Failed calls by kind (`http_500`, `connection`, ...), as the stages' summaries count them."""
    if "error" not in graded.columns:
        return {}
    kinds = graded.filter(pl.col("error").is_not_null())["error"].str.split(":").list.first()
    return dict(sorted(kinds.value_counts().iter_rows()))


def unanswered_problems(graded: pl.DataFrame) -> list[str]:
    """Problems none of whose attempts was answered."""
    return sorted(set(graded["problem_id"]) - set(answered(graded)["problem_id"]))


def problem_rows(graded: pl.DataFrame) -> pl.DataFrame:
    """Per problem with an answered attempt: n answered attempts, c correct, ungradable, truncated, and the wrong
    answers given."""
    return answered(graded).group_by("problem_id", maintain_order=True).agg(
        pl.len().alias("n"),
        (pl.col("correct") == True).sum().alias("c"),  # noqa: E712
        pl.col("correct").is_null().sum().alias("ungradable"),
        pl.col("truncated").sum().alias("truncated"),
        pl.col("predicted").filter(pl.col("correct") == False).alias("wrong"),  # noqa: E712
    )


def scores(rows: pl.DataFrame, samples: int, equivalent: Callable[[str, list[str]], list[bool | None]]) -> pl.DataFrame:
    """Per problem: accuracy, pass@k for each k, maj@K, ungradable and truncated shares (the metrics' terms)."""
    out: dict[str, list[float]] = {"avg": [], "maj": [], "ungradable": [], "truncated": []}
    for k in ks(samples):
        out[f"pass@{k}"] = []
    for row in rows.iter_rows(named=True):
        n, c = row["n"], row["c"]
        out["avg"].append(c / n if n else 0.0)
        for k in ks(samples):
            out[f"pass@{k}"].append(pass_at_k(n, c, k) if n >= k else float("nan"))
        out["maj"].append(majority_correct(c, [a for a in row["wrong"] if a], equivalent))
        out["ungradable"].append(row["ungradable"] / n if n else 0.0)
        out["truncated"].append(row["truncated"] / n if n else 0.0)
    return pl.DataFrame(out).with_columns(rows["problem_id"])


def summarize(per_problem: pl.DataFrame, samples: int, seed: int = 0) -> dict[str, Any]:
    """The metrics (means over problems) with 95% bootstrap intervals over problems; keys as in eval.json."""
    names = {"avg": f"avg@{samples}", "maj": f"maj@{samples}", "ungradable": "ungradable", "truncated": "truncated"}
    names |= {f"pass@{k}": f"pass@{k}" for k in ks(samples)}
    rng = np.random.default_rng(seed)
    count = per_problem.height
    idx = rng.integers(0, count, size=(RESAMPLES, count)) if count else None
    result: dict[str, Any] = {"problems": count}
    intervals: dict[str, list[float]] = {}
    for column, key in names.items():
        values = per_problem[column].to_numpy().astype(float)
        result[key] = float(np.nanmean(values)) if count else None
        if idx is not None:
            low, high = np.nanpercentile(np.nanmean(values[idx], axis=1), [2.5, 97.5])
            intervals[key] = [float(low), float(high)]
    result["ci95"] = intervals
    return result


def eval_report(graded: pl.DataFrame, sources: pl.DataFrame, samples: int,
                equivalent: Callable[[str, list[str]], list[bool | None]]) -> dict[str, Any]:
    """eval.json's figures: overall and per source."""
    rows = problem_rows(graded)
    per_problem = scores(rows, samples, equivalent).join(sources, on="problem_id", how="left")
    report = summarize(per_problem, samples)
    report["failed_calls"] = failed_calls(graded)
    report["unanswered_problems"] = unanswered_problems(graded)
    report["by_source"] = {
        str(source): summarize(group, samples)
        for (source,), group in per_problem.group_by("source", maintain_order=True)
    }
    return report


def compare(tables: dict[str, pl.DataFrame], seed: int = 0) -> dict[str, Any]:
    """Runs side by side on the problems they share: each run's avg@K, the difference of each to the first with
    a paired bootstrap interval, and the problems solved (>= 1 correct) by one and not by the other."""
    names = list(tables)
    per_run = {name: problem_rows(t).select("problem_id", (pl.col("c") / pl.col("n")).alias(name), (pl.col("c") > 0)
                                            .alias(f"{name}:solved")) for name, t in tables.items()}
    joined = per_run[names[0]]
    for name in names[1:]:
        joined = joined.join(per_run[name], on="problem_id", how="inner")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, joined.height, size=(RESAMPLES, joined.height)) if joined.height else None
    base = joined[names[0]].to_numpy()
    result: dict[str, Any] = {"problems": joined.height, "runs": {}}
    for name in names:
        values = joined[name].to_numpy()
        # a problem a run never answered is left out of the pairs (it is no evidence either way), and named
        entry: dict[str, Any] = {"avg": float(values.mean()) if joined.height else None,
                                 "unanswered": unanswered_problems(tables[name])}
        if name != names[0] and idx is not None:
            diffs = (values[idx] - base[idx]).mean(axis=1)
            entry["difference"] = float(values.mean() - base.mean())
            entry["difference_ci95"] = [float(v) for v in np.percentile(diffs, [2.5, 97.5])]
            solved, base_solved = joined[f"{name}:solved"], joined[f"{names[0]}:solved"]
            entry["solved_only_here"] = joined.filter(solved & ~base_solved)["problem_id"].to_list()
            entry[f"solved_only_by_{names[0]}"] = joined.filter(~solved & base_solved)["problem_id"].to_list()
        result["runs"][name] = entry
    return result
