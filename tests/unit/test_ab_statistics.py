"""The paired statistics of an A/B comparison, checked against values worked out by hand (no server, no client)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from serving.ab import LatencySummary
from serving.stats import (
    Z_95,
    ExactSum,
    Interval,
    mcnemar_exact_p,
    paired_accuracy_difference,
    paired_mean_interval,
    wilson_interval,
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


def _paired_sums(baseline: np.ndarray, candidate: np.ndarray) -> tuple[ExactSum, ExactSum]:
    total, squares = ExactSum(), ExactSum()
    differences = np.asarray(candidate, np.float64) - np.asarray(baseline, np.float64)
    total.add(differences)
    squares.add(differences * differences)
    return total, squares


def test_no_examples_give_nan_or_none_not_an_error():
    interval = paired_accuracy_difference(np.array([], bool), np.array([], bool))
    assert all(math.isnan(value) for value in (interval.estimate, interval.low, interval.high))
    assert paired_mean_interval((ExactSum(), ExactSum())) is None
    assert all(math.isnan(value) for value in wilson_interval(0, 0))


def test_paired_mean_interval_is_the_normal_interval_of_the_differences():
    baseline, candidate = np.array([1.0, 2.0, 4.0, 8.0]), np.array([1.5, 2.0, 5.0, 8.5])  # d = .5, 0, 1, .5
    interval = paired_mean_interval(_paired_sums(baseline, candidate))
    half_width = Z_95 * math.sqrt(0.125 / 4)  # population variance of d is 0.125
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((0.5, 0.5 - half_width,
                                                                              0.5 + half_width))


def test_paired_mean_interval_pairs_examples_rather_than_pooling_them():
    # Huge spread between examples, constant difference within each pair: a paired interval has zero width.
    baseline = np.array([1.0, 100.0, 1e4, 1e6])
    interval = paired_mean_interval(_paired_sums(baseline, baseline + 0.5))
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((0.5, 0.5, 0.5))


def test_a_non_finite_loss_makes_the_interval_nan():
    interval = paired_mean_interval(_paired_sums(np.array([1.0, 2.0]), np.array([np.inf, 2.0])))
    assert math.isnan(interval.estimate)


@pytest.mark.parametrize(("correct", "total", "expected"), [(0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)),
                                                            (5, 10, (0.2366, 0.7634))])
def test_wilson_interval_by_hand(correct, total, expected):
    assert wilson_interval(correct, total) == pytest.approx(expected, abs=1e-4)


def test_interval_json_form():
    assert Interval(0.1, -0.2, 0.4).to_dict() == {"estimate": 0.1, "ci95": [-0.2, 0.4]}


def test_latency_summary_is_in_milliseconds_and_none_when_empty():
    assert LatencySummary.of([]) is None
    summary = LatencySummary.of([0.001, 0.002, 0.003, 0.004, 0.010])
    assert summary.mean == pytest.approx(4.0)
    # nearest-rank percentiles from a histogram whose buckets are 0.5% wide
    assert (summary.p50, summary.p90, summary.p99) == pytest.approx((3.0, 10.0, 10.0), rel=0.005)
