"""Streaming statistics for A/B comparisons that stay exact when folded batch by batch and merged across shards.

Why exact: ``ema-serving merge`` must give exactly the report one process would have produced over the same data,
whatever the order in which shards saw the examples. Counts merge exactly by addition; floating-point sums do not
(addition is not associative), so every sum here is kept as an exact dyadic rational (``ExactSum``: an integer
numerator and a power-of-two exponent, computed with integer arithmetic from each float's mantissa and exponent) and
rounded once, when the report is built. Variances come from exact sums of values and of their squares, so the paired
intervals stream too (a bootstrap cannot: it needs every example at the end). Latency percentiles come from a
log-bucketed histogram whose buckets are fixed for everyone, so histograms merge by adding counts.

Nothing here keeps per-example values: memory is bounded by the number of classes and latency buckets in use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

Z_95 = 1.959963984540054
"""Two-sided 95% standard normal quantile."""

_EXACT_MCNEMAR_LIMIT = 200
"""Above this many discordant pairs the binomial sum is done in log space (same value to ~1e-12): exact integer sums
grow quadratically with the count (a thousand disagreements cost ~65 ms, more than the comparison's own requests)."""

_LOW_BITS = 26
"""Mantissas (< 2**53) are summed as two int64 halves of at most 27 bits, so 2**36 values never overflow int64."""


# ----------------------------------------------------------------------------------------------------- small results
@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided 95% confidence interval."""

    estimate: float
    low: float
    high: float

    def to_dict(self) -> dict[str, Any]:
        """``{"estimate": ..., "ci95": [low, high]}``, the JSON form."""
        return {"estimate": self.estimate, "ci95": [self.low, self.high]}


def mcnemar_exact_p(baseline_only: int, candidate_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against p = 1/2.

    Why exact: the chi-square version is wrong for the few disagreements two arms of one model usually have. It only
    needs the two discordant counts, so it streams and merges exactly.

    Args:
        baseline_only: examples only the baseline arm got right (b).
        candidate_only: examples only the candidate arm got right (c).

    Returns:
        ``min(1, 2 * P[X <= min(b, c)])`` for ``X ~ Binomial(b + c, 1/2)``; 1.0 when there are no discordant pairs.
    """
    num_discordant = baseline_only + candidate_only
    smaller = min(baseline_only, candidate_only)
    if num_discordant == 0:
        return 1.0
    if num_discordant <= _EXACT_MCNEMAR_LIMIT:
        tail = sum(math.comb(num_discordant, k) for k in range(smaller + 1))
        return min(1.0, 2 * tail / 2**num_discordant)
    log_terms = [
        math.lgamma(num_discordant + 1) - math.lgamma(k + 1) - math.lgamma(num_discordant - k + 1)
        for k in range(smaller + 1)
    ]
    peak = max(log_terms)
    log_tail = peak + math.log(math.fsum(math.exp(term - peak) for term in log_terms))
    return min(1.0, math.exp(math.log(2.0) + log_tail - num_discordant * math.log(2.0)))


def paired_difference_from_counts(baseline_only: int, candidate_only: int, num_examples: int) -> Interval:
    """Accuracy of the candidate minus the baseline on the same examples, with a 95% Wald interval for paired data.

    With b = baseline-only-correct, c = candidate-only-correct and n examples, the difference is (c - b)/n and its
    variance ((b + c) - (c - b)^2/n) / n^2: only discordant pairs carry information. When the arms never disagree the
    interval collapses to the point.
    """
    if num_examples == 0:
        return Interval(math.nan, math.nan, math.nan)
    b, c, n = baseline_only, candidate_only, num_examples
    estimate = (c - b) / n
    variance = max((b + c) - (c - b) ** 2 / n, 0.0) / n**2
    half_width = Z_95 * math.sqrt(variance)
    return Interval(estimate, estimate - half_width, estimate + half_width)


def paired_accuracy_difference(baseline_correct: np.ndarray, candidate_correct: np.ndarray) -> Interval:
    """``paired_difference_from_counts`` for two boolean arrays of per-example correctness."""
    baseline_correct = np.asarray(baseline_correct, dtype=bool)
    candidate_correct = np.asarray(candidate_correct, dtype=bool)
    b = int(np.count_nonzero(baseline_correct & ~candidate_correct))
    c = int(np.count_nonzero(candidate_correct & ~baseline_correct))
    return paired_difference_from_counts(b, c, baseline_correct.size)


def wilson_interval(num_correct: int, num_examples: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default): sensible at 0%, 100% and small n, unlike Wald's."""
    if num_examples == 0:
        return math.nan, math.nan
    proportion = num_correct / num_examples
    denominator = 1.0 + z * z / num_examples
    center = (proportion + z * z / (2 * num_examples)) / denominator
    half_width = z / denominator * math.sqrt(
        proportion * (1 - proportion) / num_examples + z * z / (4 * num_examples**2)
    )
    return max(0.0, center - half_width), min(1.0, center + half_width)


# ------------------------------------------------------------------------------------------------------ exact sums
class ExactSum:
    """The exact sum of float64 values (and how many were added), mergeable in any order with the same result.

    The sum is ``numerator * 2**exponent`` in integers, kept with the numerator odd (canonical), so two accumulators
    of the same values in any order, batching or sharding have identical states. Non-finite values are counted
    apart and make ``value()`` NaN.
    """

    __slots__ = ("numerator", "exponent", "count", "num_nonfinite")

    def __init__(self, numerator: int = 0, exponent: int = 0, count: int = 0, num_nonfinite: int = 0) -> None:
        self.numerator, self.exponent, self.count, self.num_nonfinite = numerator, exponent, count, num_nonfinite

    def add(self, values: np.ndarray) -> None:
        """Add every element of ``values`` (any shape, cast to float64)."""
        flat = np.asarray(values, dtype=np.float64).ravel()
        self.count += flat.size
        finite = np.isfinite(flat)
        if not finite.all():
            self.num_nonfinite += int(flat.size - np.count_nonzero(finite))
            flat = flat[finite]
        self._add_exact(*_exact_sum(flat))

    def merge(self, other: ExactSum) -> None:
        """Add another accumulator's values."""
        self.count += other.count
        self.num_nonfinite += other.num_nonfinite
        self._add_exact(other.numerator, other.exponent)

    def fraction(self) -> Fraction:
        """The exact sum as a fraction."""
        return Fraction(self.numerator) * Fraction(2) ** self.exponent

    def value(self) -> float:
        """The sum rounded once to the nearest float64 (NaN if a non-finite value was added)."""
        return math.nan if self.num_nonfinite else _to_float(self.fraction())

    def mean(self) -> float | None:
        """The mean rounded once, or None when nothing was added."""
        if self.count == 0:
            return None
        return math.nan if self.num_nonfinite else _to_float(self.fraction() / self.count)

    def to_state(self) -> dict[str, Any]:
        """JSON form; the numerator is a decimal string because it can exceed what JSON readers hold exactly."""
        return {"numerator": str(self.numerator), "exponent": self.exponent, "count": self.count,
                "num_nonfinite": self.num_nonfinite}  # fmt: skip

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ExactSum:
        """Inverse of ``to_state``."""
        return cls(int(state["numerator"]), int(state["exponent"]), int(state["count"]), int(state["num_nonfinite"]))

    def _add_exact(self, numerator: int, exponent: int) -> None:
        if numerator == 0:
            return
        if self.numerator == 0:
            self.numerator, self.exponent = numerator, exponent
        else:
            low = min(self.exponent, exponent)
            self.numerator = (self.numerator << (self.exponent - low)) + (numerator << (exponent - low))
            self.exponent = low
        if self.numerator == 0:
            self.exponent = 0
            return
        trailing = (self.numerator & -self.numerator).bit_length() - 1
        self.numerator >>= trailing
        self.exponent += trailing


def _exact_sum(values: np.ndarray) -> tuple[int, int]:
    """``(numerator, exponent)`` with ``sum(values) == numerator * 2**exponent`` exactly (finite float64 values).

    Each float is ``m * 2**e`` with an integer ``m`` of at most 53 bits (``np.frexp``); values sharing ``e`` are summed
    in int64 halves (vectorised), then the few per-exponent sums are shifted onto the lowest exponent in Python ints.
    """
    values = values[values != 0]
    if values.size == 0:
        return 0, 0
    mantissas, exponents = np.frexp(values)
    integers = np.ldexp(mantissas, 53).astype(np.int64)
    exponents = exponents.astype(np.int64) - 53
    order = np.argsort(exponents, kind="stable")
    integers, exponents = integers[order], exponents[order]
    starts = np.flatnonzero(np.concatenate(([True], exponents[1:] != exponents[:-1])))
    high = np.add.reduceat(integers >> _LOW_BITS, starts).tolist()
    low = np.add.reduceat(integers & ((1 << _LOW_BITS) - 1), starts).tolist()
    group_exponents = exponents[starts].tolist()
    lowest = group_exponents[0]
    total = 0
    for high_sum, low_sum, exponent in zip(high, low, group_exponents):
        total += ((high_sum << _LOW_BITS) + low_sum) << (exponent - lowest)
    return total, lowest


def _to_float(value: Fraction) -> float:
    """Correctly rounded (Python's int / int true division is), without overflow for huge numerators."""
    return value.numerator / value.denominator


# ------------------------------------------------------------------------------------------------ latency histogram
class LatencyHistogram:
    """Request latencies in log-spaced buckets shared by every process, so histograms merge by adding counts.

    Bucket ``i`` holds ``[LOWEST_MS * GROWTH**i, LOWEST_MS * GROWTH**(i+1))``; a percentile is reported as its bucket's
    geometric midpoint, within ``RELATIVE_PRECISION`` (0.5%) of the true order statistic for latencies between 1 us
    and 1000 s (those outside are clamped into the first or last bucket). The mean is exact (``ExactSum``).
    """

    LOWEST_MS = 0.001
    GROWTH = 1.01
    NUM_BUCKETS = math.ceil(math.log(1e6 / LOWEST_MS) / math.log(GROWTH))
    RELATIVE_PRECISION = math.sqrt(GROWTH) - 1.0

    def __init__(self) -> None:
        self.counts = np.zeros(self.NUM_BUCKETS, dtype=np.int64)
        self.total_ms = ExactSum()

    def add(self, latencies_ms: np.ndarray | list[float]) -> None:
        """Count latencies given in milliseconds."""
        values = np.asarray(latencies_ms, dtype=np.float64).ravel()
        if values.size == 0:
            return
        with np.errstate(divide="ignore"):
            indices = np.floor(np.log(np.maximum(values, 1e-300) / self.LOWEST_MS) / math.log(self.GROWTH))
        indices = np.clip(indices, 0, self.NUM_BUCKETS - 1).astype(np.int64)
        np.add.at(self.counts, indices, 1)
        self.total_ms.add(values)

    def merge(self, other: LatencyHistogram) -> None:
        """Add another histogram's counts."""
        self.counts += other.counts
        self.total_ms.merge(other.total_ms)

    @property
    def num_values(self) -> int:
        """How many latencies were counted."""
        return int(self.counts.sum())

    def bound_ms(self, index: int) -> float:
        """The lower edge of bucket ``index`` (the upper edge of ``index - 1``)."""
        return self.LOWEST_MS * self.GROWTH**index

    def percentile(self, fraction: float) -> float | None:
        """The nearest-rank percentile (``fraction`` in (0, 1]) as its bucket's geometric midpoint; None if empty."""
        total = self.num_values
        if total == 0:
            return None
        rank = max(1, math.ceil(fraction * total - 1e-9))
        index = int(np.searchsorted(np.cumsum(self.counts), rank))
        return self.LOWEST_MS * self.GROWTH ** (index + 0.5)

    def used_range(self) -> tuple[int, int]:
        """``(first, stop)``: the buckets from the first to the last non-empty one."""
        nonzero = np.flatnonzero(self.counts)
        return (0, 0) if nonzero.size == 0 else (int(nonzero[0]), int(nonzero[-1]) + 1)

    def to_dict(self) -> dict[str, Any]:
        """``{"bounds_ms": [...], "counts": [...]}`` over the used buckets (``len(bounds_ms) == len(counts) + 1``)."""
        first, stop = self.used_range()
        return {
            "bounds_ms": [self.bound_ms(index) for index in range(first, stop + 1)] if stop else [],
            "counts": self.counts[first:stop].tolist(),
            "first_bucket": first,
            "growth": self.GROWTH,
            "relative_precision": self.RELATIVE_PRECISION,
        }

    def to_state(self) -> dict[str, Any]:
        """Sparse JSON form: the first used bucket, the used counts and the exact total."""
        first, stop = self.used_range()
        return {"first_bucket": first, "counts": self.counts[first:stop].tolist(), "total_ms": self.total_ms.to_state()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> LatencyHistogram:
        """Inverse of ``to_state``."""
        histogram = cls()
        first, counts = int(state["first_bucket"]), state["counts"]
        histogram.counts[first : first + len(counts)] = counts
        histogram.total_ms = ExactSum.from_state(state["total_ms"])
        return histogram


# ------------------------------------------------------------------------------------------------------- the tallies
class ArmTally:
    """What one arm answered: rows, requests, failures (with the rows they cost), latency, versions, correctness."""

    def __init__(self, signature: str) -> None:
        self.signature = signature
        self.num_rows = 0
        self.num_requests = 0
        self.num_errors = 0
        self.first_error: str | None = None
        self.failed_rows: list[list[int]] = []  # [start, stop, step] runs of row numbers, with no error text
        self.versions: set[int] = set()
        self.latency = LatencyHistogram()
        self.num_correct = 0
        self.abs_errors = ExactSum()  # per-row mean |output - target|, regression
        self.squared_errors = ExactSum()  # per-row mean (output - target)^2, regression

    def fold_answer(self, num_rows: int, latency_ms: float, version: int | None) -> None:
        """Count one answered request."""
        self.num_requests += 1
        self.num_rows += num_rows
        self.latency.add([latency_ms])
        if version is not None:
            self.versions.add(version)

    def fold_failure(self, rows: np.ndarray, error: str) -> None:
        """Count one failed request and the rows it should have answered."""
        self.num_requests += 1
        self.num_errors += 1
        self.first_error = self.first_error or error
        self.failed_rows.extend(row_runs(rows))

    def merge(self, other: ArmTally) -> None:
        """Add another shard's tally of the same arm."""
        self.num_rows += other.num_rows
        self.num_requests += other.num_requests
        self.num_errors += other.num_errors
        self.first_error = self.first_error or other.first_error
        self.failed_rows = sorted(self.failed_rows + other.failed_rows)
        self.versions |= other.versions
        self.latency.merge(other.latency)
        self.num_correct += other.num_correct
        self.abs_errors.merge(other.abs_errors)
        self.squared_errors.merge(other.squared_errors)

    def to_state(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "signature": self.signature, "num_rows": self.num_rows, "num_requests": self.num_requests,
            "num_errors": self.num_errors, "first_error": self.first_error, "failed_rows": self.failed_rows,
            "versions": sorted(self.versions), "latency": self.latency.to_state(), "num_correct": self.num_correct,
            "abs_errors": self.abs_errors.to_state(), "squared_errors": self.squared_errors.to_state(),
        }  # fmt: skip

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ArmTally:
        """Inverse of ``to_state``."""
        tally = cls(state["signature"])
        tally.num_rows, tally.num_requests = int(state["num_rows"]), int(state["num_requests"])
        tally.num_errors, tally.first_error = int(state["num_errors"]), state["first_error"]
        tally.failed_rows = [list(map(int, run)) for run in state["failed_rows"]]
        tally.versions = set(map(int, state["versions"]))
        tally.latency = LatencyHistogram.from_state(state["latency"])
        tally.num_correct = int(state["num_correct"])
        tally.abs_errors = ExactSum.from_state(state["abs_errors"])
        tally.squared_errors = ExactSum.from_state(state["squared_errors"])
        return tally


class PairTally:
    """What the two arms' answers on the same rows say together: agreement, discordance, differences."""

    def __init__(self) -> None:
        self.num_paired = 0
        self.num_labelled = 0
        self.num_agree = 0
        self.baseline_only = 0
        self.candidate_only = 0
        self.disagreements: dict[tuple[int, int], int] = {}
        self.abs_diff = ExactSum()
        self.max_abs_diff = 0.0
        self.abs_error_diff = (ExactSum(), ExactSum())  # sums of d and d^2, d = candidate - baseline per-row loss
        self.squared_error_diff = (ExactSum(), ExactSum())

    def fold_outputs(self, baseline: np.ndarray, candidate: np.ndarray) -> None:
        """Count the rows both arms answered and the elementwise |candidate - baseline|."""
        self.num_paired += baseline.shape[0]
        difference = np.abs(candidate.astype(np.float64) - baseline.astype(np.float64))
        self.abs_diff.add(difference)
        if difference.size:
            self.max_abs_diff = max(self.max_abs_diff, float(difference.max()))

    def fold_classes(
        self, arms: tuple[ArmTally, ArmTally], predicted: tuple[np.ndarray, np.ndarray], truth: np.ndarray | None
    ) -> None:
        """Fold the two arms' predicted classes (and, with labels, their correctness)."""
        baseline, candidate = predicted
        differ = baseline != candidate
        self.num_agree += int(differ.size - np.count_nonzero(differ))
        if differ.any():
            pairs, counts = np.unique(np.stack([baseline[differ], candidate[differ]], axis=1), axis=0,
                                      return_counts=True)  # fmt: skip
            for (row, column), count in zip(pairs.tolist(), counts.tolist()):
                self.disagreements[(row, column)] = self.disagreements.get((row, column), 0) + count
        if truth is None:
            return
        correct_a, correct_b = baseline == truth, candidate == truth
        self.num_labelled += truth.shape[0]
        arms[0].num_correct += int(np.count_nonzero(correct_a))
        arms[1].num_correct += int(np.count_nonzero(correct_b))
        self.baseline_only += int(np.count_nonzero(correct_a & ~correct_b))
        self.candidate_only += int(np.count_nonzero(correct_b & ~correct_a))

    def fold_losses(
        self,
        arms: tuple[ArmTally, ArmTally],
        absolute: tuple[np.ndarray, np.ndarray],
        squared: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """Fold per-row regression losses of both arms (mean |error| and mean error^2 over each row's elements)."""
        self.num_labelled += absolute[0].shape[0]
        for arm, loss_abs, loss_squared in zip(arms, absolute, squared):
            arm.abs_errors.add(loss_abs)
            arm.squared_errors.add(loss_squared)
        for sums, (loss_a, loss_b) in ((self.abs_error_diff, absolute), (self.squared_error_diff, squared)):
            difference = loss_b - loss_a
            sums[0].add(difference)
            sums[1].add(difference * difference)

    def merge(self, other: PairTally) -> None:
        """Add another shard's tally."""
        for name in ("num_paired", "num_labelled", "num_agree", "baseline_only", "candidate_only"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for pair, count in other.disagreements.items():
            self.disagreements[pair] = self.disagreements.get(pair, 0) + count
        self.abs_diff.merge(other.abs_diff)
        self.max_abs_diff = max(self.max_abs_diff, other.max_abs_diff)
        for mine, theirs in ((self.abs_error_diff, other.abs_error_diff),
                             (self.squared_error_diff, other.squared_error_diff)):  # fmt: skip
            mine[0].merge(theirs[0])
            mine[1].merge(theirs[1])

    def to_state(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "num_paired": self.num_paired, "num_labelled": self.num_labelled, "num_agree": self.num_agree,
            "baseline_only": self.baseline_only, "candidate_only": self.candidate_only,
            "disagreements": [[row, column, count] for (row, column), count in sorted(self.disagreements.items())],
            "abs_diff": self.abs_diff.to_state(), "max_abs_diff": self.max_abs_diff,
            "abs_error_diff": [sums.to_state() for sums in self.abs_error_diff],
            "squared_error_diff": [sums.to_state() for sums in self.squared_error_diff],
        }  # fmt: skip

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PairTally:
        """Inverse of ``to_state``."""
        tally = cls()
        for name in ("num_paired", "num_labelled", "num_agree", "baseline_only", "candidate_only"):
            setattr(tally, name, int(state[name]))
        tally.disagreements = {(int(row), int(column)): int(count) for row, column, count in state["disagreements"]}
        tally.abs_diff = ExactSum.from_state(state["abs_diff"])
        tally.max_abs_diff = float(state["max_abs_diff"])
        first, second = (ExactSum.from_state(item) for item in state["abs_error_diff"])
        tally.abs_error_diff = (first, second)
        first, second = (ExactSum.from_state(item) for item in state["squared_error_diff"])
        tally.squared_error_diff = (first, second)
        return tally

    def disagreement_matrix(self) -> dict[str, Any]:
        """``{"classes": [...], "counts": [[...]]}`` over the classes in any disagreement (rows: baseline class)."""
        classes = sorted({label for pair in self.disagreements for label in pair})
        position = {label: index for index, label in enumerate(classes)}
        counts = [[0] * len(classes) for _ in classes]
        for (row, column), count in self.disagreements.items():
            counts[position[row]][position[column]] = count
        return {"classes": classes, "counts": counts}


def paired_mean_interval(sums: tuple[ExactSum, ExactSum]) -> Interval | None:
    """Mean of per-example differences with a 95% normal interval, from exact sums of d and d^2 (population variance,
    as ``paired_difference_from_counts``); None when nothing was added."""
    total, squares = sums
    count = total.count
    if count == 0:
        return None
    if total.num_nonfinite or squares.num_nonfinite:
        return Interval(math.nan, math.nan, math.nan)
    mean = total.fraction() / count
    variance = max(squares.fraction() / count - mean * mean, Fraction(0))
    half_width = Z_95 * math.sqrt(_to_float(variance) / count)
    estimate = _to_float(mean)
    return Interval(estimate, estimate - half_width, estimate + half_width)


def row_runs(rows: np.ndarray) -> list[list[int]]:
    """Row numbers as ``[start, stop, step]`` arithmetic runs (one run for a batch of a shard), for naming failures."""
    values = np.asarray(rows, dtype=np.int64).ravel().tolist()
    runs: list[list[int]] = []
    for value in values:
        if runs:
            start, stop, step = runs[-1]
            if stop - step == start and value > start:  # a run of one row takes any step
                runs[-1] = [start, value + (value - start), value - start]
                continue
            if value == stop:
                runs[-1][1] = value + step
                continue
        runs.append([value, value + 1, 1])
    return runs


def describe_runs(runs: list[list[int]], limit: int = 5) -> str:
    """``"3..9 step 3, 40"``: the first ``limit`` runs in words, for error messages."""
    words = []
    for start, stop, step in runs[:limit]:
        last = stop - step
        words.append(str(start) if last == start else f"{start}..{last}" + (f" step {step}" if step != 1 else ""))
    more = f" and {len(runs) - limit} more runs" if len(runs) > limit else ""
    return ", ".join(words) + more


__all__ = [
    "ArmTally",
    "ExactSum",
    "PairTally",
    "describe_runs",
    "paired_mean_interval",
    "row_runs",
    "Interval",
    "LatencyHistogram",
    "Z_95",
    "mcnemar_exact_p",
    "paired_accuracy_difference",
    "paired_difference_from_counts",
    "wilson_interval",
]
