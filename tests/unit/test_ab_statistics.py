"""The paired statistics of an A/B comparison, checked against values worked out by hand (no server, no client)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from serving.ab import (
    Z_95,
    Interval,
    LatencySummary,
    mcnemar_exact_p,
    paired_accuracy_difference,
    paired_bootstrap_difference,
)


def _exact_two_sided(b: int, c: int) -> float:
    """2 * P[X <= min(b, c)] for X ~ Binomial(b + c, 1/2), in exact rationals."""
    n = b + c
    return float(min(Fraction(1), 2 * Fraction(sum(math.comb(n, k) for k in range(min(b, c) + 1)), 2**n)))


@pytest.mark.parametrize(("b", "c", "expected"), [(0, 0, 1.0), (0, 5, 0.0625), (1, 9, 22 / 1024), (3, 3, 1.0),
                                                  (0, 1, 1.0)])
def test_mcnemar_small_counts_by_hand(b, c, expected):
    assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact_p(c, b) == mcnemar_exact_p(b, c)


@pytest.mark.parametrize(("b", "c"), [(95, 105), (95, 106), (120, 180), (300, 700), (2, 500)])
def test_mcnemar_is_exact_on_both_sides_of_the_log_space_switch(b, c):
    assert mcnemar_exact_p(b, c) == pytest.approx(_exact_two_sided(b, c), rel=1e-9, abs=1e-300)


def test_mcnemar_p_falls_as_the_disagreement_grows_one_sided():
    values = [mcnemar_exact_p(10, c) for c in range(10, 40)]
    assert values == sorted(values, reverse=True) and values[0] == 1.0 and values[-1] < 1e-3


def test_paired_accuracy_difference_counts_only_discordant_pairs():
    baseline = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0, 1], bool)
    candidate = np.array([1, 0, 1, 1, 1, 1, 1, 1, 0, 1], bool)  # b = 1, c = 3, n = 10
    interval = paired_accuracy_difference(baseline, candidate)
    half_width = Z_95 * math.sqrt((1 + 3) - (3 - 1) ** 2 / 10) / 10
    assert interval.estimate == pytest.approx(0.2)
    assert (interval.low, interval.high) == pytest.approx((0.2 - half_width, 0.2 + half_width))


def test_arms_that_never_disagree_have_a_zero_width_interval():
    correct = np.array([1, 0, 1], bool)
    assert paired_accuracy_difference(correct, correct) == Interval(0.0, 0.0, 0.0)


def test_no_examples_give_nan_not_an_error():
    for interval in (paired_accuracy_difference(np.array([], bool), np.array([], bool)),
                     paired_bootstrap_difference(np.array([]), np.array([]))):
        assert all(math.isnan(value) for value in (interval.estimate, interval.low, interval.high))


def test_the_bootstrap_is_deterministic_per_seed_and_brackets_the_mean():
    rng = np.random.default_rng(7)
    baseline, candidate = rng.exponential(1.0, 200), rng.exponential(1.2, 200)
    first = paired_bootstrap_difference(baseline, candidate, num_resamples=300, seed=3)
    assert first == paired_bootstrap_difference(baseline, candidate, num_resamples=300, seed=3)
    assert first != paired_bootstrap_difference(baseline, candidate, num_resamples=300, seed=4)
    assert first.estimate == pytest.approx(float(np.mean(candidate - baseline)))
    assert first.low < first.estimate < first.high


def test_the_bootstrap_pairs_examples_rather_than_pooling_them():
    # Huge spread between examples, constant difference within each pair: a paired interval has zero width.
    baseline = np.array([1.0, 100.0, 1e4, 1e6])
    interval = paired_bootstrap_difference(baseline, baseline + 0.5, num_resamples=50)
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((0.5, 0.5, 0.5))


def test_interval_json_form():
    assert Interval(0.1, -0.2, 0.4).to_dict() == {"estimate": 0.1, "ci95": [-0.2, 0.4]}


def test_latency_summary_is_in_milliseconds_and_none_when_empty():
    assert LatencySummary.of([]) is None
    summary = LatencySummary.of([0.001, 0.002, 0.003, 0.004, 0.010])
    assert (summary.p50, summary.mean) == pytest.approx((3.0, 4.0))
    assert summary.p90 == pytest.approx(7.6) and summary.p99 == pytest.approx(9.76)
