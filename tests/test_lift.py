"""The lift's one-sided Fisher exact test: exact values, and its error rate on arms with no effect."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import numpy as np
import pytest

from intgen.lift import fisher_greater, lift, top_up_due, two_stage_kept


@pytest.mark.parametrize(("arms", "exact"), [
    # the intervention's successes all lie in its arm: P = C(32, k) / C(64, k)
    ((6, 32, 0, 32), Fraction(comb(32, 6), comb(64, 6))),
    ((3, 32, 0, 32), Fraction(comb(32, 3), comb(64, 3))),  # the lucky pass: about 0.12
    ((1, 32, 0, 32), Fraction(1, 2)),
    ((0, 32, 0, 32), Fraction(1)),  # no success anywhere: no evidence at all
    ((0, 32, 5, 32), Fraction(1)),  # P(X >= 0) is 1 whatever the baseline
    ((32, 32, 32, 32), Fraction(1)),
    # a 2x2 table worked by hand: 2/3 against 0/3, margins 2 and 6: P(X >= 2) = C(2,2) C(4,1) / C(6,3) = 4/20
    ((2, 3, 0, 3), Fraction(4, 20)),
])
def test_fisher_greater_is_the_exact_hypergeometric_tail(arms, exact):
    assert fisher_greater(*arms) == pytest.approx(float(exact), rel=1e-12)


def test_fisher_greater_agrees_with_scipy_where_it_is_installed():
    stats = pytest.importorskip("scipy.stats")
    for a, b in [(6, 0), (3, 0), (10, 4), (4, 10), (16, 16), (31, 2)]:
        expected = stats.fisher_exact([[a, 32 - a], [b, 32 - b]], alternative="greater").pvalue
        assert fisher_greater(a, 32, b, 32) == pytest.approx(expected, rel=1e-9)


def test_unequal_arms_and_bad_counts():
    # 4/8 against 1/16: margins 5 successes of 24, 8 drawn
    tail = sum(comb(5, x) * comb(19, 8 - x) for x in range(4, 6))
    assert fisher_greater(4, 8, 1, 16) == pytest.approx(tail / comb(24, 8))
    with pytest.raises(ValueError, match="out of range"):
        fisher_greater(33, 32, 0, 32)
    assert fisher_greater(0, 0, 0, 0) == 1.0


def test_lift_is_the_difference_of_rates():
    assert lift(6, 32, 0, 32) == pytest.approx(6 / 32)
    assert lift(3, 32, 5, 32) == pytest.approx(-2 / 32)
    assert lift(1, 32, 0, 0) is None


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
def test_on_arms_with_no_effect_the_test_rejects_at_most_alpha(rate):
    """Both arms drawn from the same success rate: a p <= 0.05 must come at most 5% of the time (Fisher's test
    is conservative: less)."""
    rng = np.random.default_rng(7)
    draws = rng.binomial(32, rate, size=(4000, 2))
    rejected = np.mean([fisher_greater(int(a), 32, int(b), 32) <= 0.05 for a, b in draws])
    # 4000 draws: a true rate of 0.05 would exceed 0.058 with probability about 0.01
    assert rejected <= 0.058


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
def test_topping_up_borderline_arms_keeps_the_error_rate_at_most_alpha(rate):
    """The two-stage rule on arms with no effect: 32 per arm, then 32 more for both arms where the first p is
    borderline; kept at most alpha of the time. The naive top-up (a second test at the full alpha) is shown to
    inflate the rate a single test at alpha has (here by 1.6-1.8x)."""
    rng = np.random.default_rng(11)
    first, more = rng.binomial(32, rate, size=(4000, 2)), rng.binomial(32, rate, size=(4000, 2))
    kept = naive = single = 0
    for (a, b), (c, d) in zip(first, more):
        p = fisher_greater(int(a), 32, int(b), 32)
        pooled = fisher_greater(int(a + c), 64, int(b + d), 64)
        kept += two_stage_kept(p, pooled if top_up_due(p, 0.05, 0.5) else None, 0.05)
        naive += p <= 0.05 or (0.05 < p <= 0.5 and pooled <= 0.05)
        single += p <= 0.05
    assert kept / 4000 <= 0.058
    assert naive > 1.3 * single


def test_top_up_is_due_only_between_half_alpha_and_the_band():
    assert not top_up_due(0.02, 0.05, 0.5) and top_up_due(0.03, 0.05, 0.5) and top_up_due(0.5, 0.05, 0.5)
    assert not top_up_due(0.6, 0.05, 0.5)
    assert two_stage_kept(0.02, None, 0.05) and not two_stage_kept(0.03, None, 0.05)
    assert two_stage_kept(0.3, 0.01, 0.05) and not two_stage_kept(0.3, 0.03, 0.05)
