"""Lift: does continuing from the intervention solve more often than continuing from the attempt's own wrong step?

Both arms start from the same prefix (the steps before the error) and are sampled from the same policy, M
continuations each, as independent draws: the intervention arm (`intervention`) and the matched baseline
(`original-step`: the wrong step left in place). The lift is the difference of their success rates; its evidence
is the one-sided Fisher exact test of "the intervention's rate is no higher than the baseline's": the probability,
with both arms' margins fixed, of seeing at least the intervention's successes (the hypergeometric upper tail).
3/32 against 0/32 gives p = 0.119 (a lucky pass is not a fix); 6/32 against 0/32 gives p = 0.0121.

Computed exactly with integers (binomial coefficients), so no statistics package is needed and no rounding enters
before the final division.

Topping up (`--top-up N`) is a two-stage design declared before any continuation is seen, with alpha split in two
(Bonferroni): after the first M continuations per arm an intervention is kept when p <= alpha/2; when p is
borderline (above alpha/2, at most `below`) both arms get N more continuations, and it is kept when the p of all
M + N per arm is at most alpha/2; otherwise it is not kept. Under no effect, P(kept) <= P(first p <= alpha/2) +
P(the p of M + N per arm <= alpha/2) <= alpha: retesting only the near misses does not inflate the error rate,
as testing again at alpha would.
"""

from __future__ import annotations

from enum import Enum
from fractions import Fraction
from math import comb


class KeepRule(str, Enum):
    paper = "paper"  # at least --min-success correct continuations (the paper's rule: 1 of M)
    lift = "lift"  # the one-sided Fisher p against the original-step baseline at most --alpha (and --min-success)


def fisher_greater(successes: int, trials: int, base_successes: int, base_trials: int) -> float:
    """One-sided Fisher exact p-value that the first arm's success rate exceeds the second's: P(X >= successes)
    for X ~ Hypergeometric(population trials + base_trials, marked successes + base_successes, draws trials)."""
    if not (0 <= successes <= trials and 0 <= base_successes <= base_trials):
        raise ValueError(f"successes out of range: {successes}/{trials} against {base_successes}/{base_trials}")
    population, marked = trials + base_trials, successes + base_successes
    if population == 0:
        return 1.0
    tail = sum(comb(marked, x) * comb(population - marked, trials - x)
               for x in range(successes, min(marked, trials) + 1))
    return float(Fraction(tail, comb(population, trials)))


def lift(successes: int, trials: int, base_successes: int, base_trials: int) -> float | None:
    """The difference of the two success rates (None when an arm has no continuation)."""
    if not trials or not base_trials:
        return None
    return successes / trials - base_successes / base_trials


def top_up_due(p: float, alpha: float, below: float) -> bool:
    """Whether a first-stage p is borderline: above the stage's alpha/2 and at most `below`."""
    return alpha / 2 < p <= below


def two_stage_kept(first_p: float, pooled_p: float | None, alpha: float) -> bool:
    """The two-stage rule: kept at the first look (p <= alpha/2), or at the second on all the continuations of
    both arms (`pooled_p`, None where there was no second look) at alpha/2."""
    return first_p <= alpha / 2 or (pooled_p is not None and pooled_p <= alpha / 2)
