"""A/B comparison of two signatures of one export (``serve_live`` vs ``serve_ema``) on the same inputs.

Why a paired design: both arms see exactly the same examples, so the comparison does not need two samples' worth of
noise to be resolved: agreement, the accuracy difference (with a paired-proportion interval and the exact McNemar
test, which only looks at the examples where the arms disagree) and, for regression, the error difference with a
paired bootstrap interval. Each batch goes to both arms concurrently over the client's one channel, with the next
batch already on its way, so a comparison costs little more wall time than querying one arm batch by batch.

All statistics are computed over the examples both arms answered (``num_paired``); per-arm ``n`` and ``errors`` say
how many that was. Differences are always ``candidate - baseline``; by default the baseline is ``serve_live`` and the
candidate ``serve_ema`` (``ema_export.names.ARM_SIGNATURES``), so a positive ``accuracy_diff`` means EMA is better.

Example:
    >>> with ServingClient("localhost:8500") as client:  # doctest: +SKIP
    ...     metadata = client.metadata("model")
    ...     dataset = load_dataset("val.npz", metadata.signature(SIGNATURE_EMA), labels_key="labels")
    ...     report = compare(client, "model", dataset.inputs, labels=dataset.labels)
    ...     print(report.accuracy_diff)
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ema_export.names import ARM_SIGNATURES
from serving.client import PendingPrediction, Prediction, ServingClient, SignatureSpec
from serving.codec import SUPPORTED_DTYPES, numpy_dtype
from serving.protocol import (
    CodecError,
    DataError,
    InvalidRequestError,
    ModelNotFoundError,
    ServingError,
    SignatureNotFoundError,
)

Task = Literal["auto", "classification", "regression"]

Z_95 = 1.959963984540054
"""Two-sided 95% standard normal quantile."""

_EXACT_MCNEMAR_LIMIT = 200
"""Above this many discordant pairs the binomial sum is done in log space (same value to ~1e-12): exact integer sums
grow quadratically with the count (a thousand disagreements cost ~65 ms, more than the comparison's own requests)."""

# Errors that mean an arm can never answer (wrong model, signature or inputs): stop at once instead of counting them.
_FATAL_ERRORS = (ModelNotFoundError, SignatureNotFoundError, InvalidRequestError, CodecError)


# --------------------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided 95% confidence interval."""

    estimate: float
    low: float
    high: float

    def to_dict(self) -> dict[str, Any]:
        """``{"estimate": ..., "ci95": [low, high]}``, the JSON form."""
        return {"estimate": self.estimate, "ci95": [self.low, self.high]}


@dataclass(frozen=True)
class LatencySummary:
    """Per-request latency in milliseconds (linear-interpolated percentiles)."""

    p50: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, latencies_s: Sequence[float]) -> LatencySummary | None:
        """Summarise latencies given in seconds; None when there are none."""
        if len(latencies_s) == 0:
            return None
        milliseconds = np.asarray(latencies_s, dtype=np.float64) * 1000.0
        p50, p90, p99 = np.percentile(milliseconds, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(milliseconds.mean()))


def mcnemar_exact_p(baseline_only: int, candidate_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against p = 1/2.

    Why exact: the chi-square version is wrong for the few disagreements two arms of one model usually have.

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


def paired_accuracy_difference(baseline_correct: np.ndarray, candidate_correct: np.ndarray) -> Interval:
    """Accuracy of the candidate minus the baseline on the same examples, with a 95% Wald interval for paired data.

    With b = baseline-only-correct, c = candidate-only-correct and n examples, the difference is (c - b)/n and its
    variance ((b + c) - (c - b)^2/n) / n^2: only discordant pairs carry information. When the arms never disagree the
    interval collapses to the point.
    """
    baseline_correct = np.asarray(baseline_correct, dtype=bool)
    candidate_correct = np.asarray(candidate_correct, dtype=bool)
    num_examples = baseline_correct.size
    if num_examples == 0:
        return Interval(math.nan, math.nan, math.nan)
    b = int(np.count_nonzero(baseline_correct & ~candidate_correct))
    c = int(np.count_nonzero(candidate_correct & ~baseline_correct))
    estimate = (c - b) / num_examples
    variance = max((b + c) - (c - b) ** 2 / num_examples, 0.0) / num_examples**2
    half_width = Z_95 * math.sqrt(variance)
    return Interval(estimate, estimate - half_width, estimate + half_width)


def paired_bootstrap_difference(
    baseline_loss: np.ndarray,
    candidate_loss: np.ndarray,
    *,
    num_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Mean per-example loss of the candidate minus the baseline, with a 95% percentile paired-bootstrap interval.

    Why bootstrap: squared and absolute errors are skewed, and the paired bootstrap (resampling examples, keeping each
    example's two losses together) needs no distributional assumption. Deterministic for a given ``seed``.
    """
    differences = np.asarray(candidate_loss, dtype=np.float64) - np.asarray(baseline_loss, dtype=np.float64)
    num_examples = differences.size
    if num_examples == 0:
        return Interval(math.nan, math.nan, math.nan)
    generator = np.random.default_rng(seed)
    means = np.empty(num_resamples, dtype=np.float64)
    # Resample in chunks so memory stays ~8 MB whatever the dataset size.
    chunk = max(1, 1_000_000 // num_examples)
    for start in range(0, num_resamples, chunk):
        stop = min(start + chunk, num_resamples)
        indices = generator.integers(0, num_examples, size=(stop - start, num_examples))
        means[start:stop] = differences[indices].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(differences.mean()), float(low), float(high))


# ------------------------------------------------------------------------------------------------------------ dataset
@dataclass(frozen=True)
class Dataset:
    """Inputs named like a signature's inputs (cast to its dtypes), optional labels, and the number of examples."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    num_examples: int


def load_dataset(
    path: str | Path, signature: SignatureSpec, *, labels_key: str | None = None, ignore_extra: bool = False
) -> Dataset:
    """Read a ``.npz`` (arrays named like the signature's inputs, plus optional labels) or ``.npy`` (one input).

    Why validate here: a typo in an array name or a float64 file would otherwise surface as a server error per batch;
    every problem is collected and reported at once. Numeric arrays are cast to the signature's dtype when numpy
    calls that a same-kind cast (float64 -> float32), since ``np.savez`` defaults to float64 and int64.

    Args:
        path: the ``.npz`` or ``.npy`` file.
        signature: the signature the inputs are for (from ``ServingClient.metadata``).
        labels_key: name of the labels array in the ``.npz``.
        ignore_extra: skip arrays that are not inputs (e.g. labels, when only predicting) instead of refusing them.

    Raises:
        DataError: the file cannot be read, names are missing or unexpected, dtypes or shapes do not fit.
    """
    path = Path(path)
    arrays = _read_arrays(path, signature, labels_key)
    problems: list[str] = []
    labels = arrays.pop(labels_key) if labels_key is not None and labels_key in arrays else None
    if labels_key is not None and labels is None:
        problems.append(f"no labels array {labels_key!r} (--labels)")
    if ignore_extra:
        arrays = {name: array for name, array in arrays.items() if name in signature.inputs}
    missing = sorted(set(signature.inputs) - set(arrays))
    unexpected = sorted(set(arrays) - set(signature.inputs))
    if missing:
        problems.append(f"missing inputs {missing}")
    if unexpected:
        hint = " (pass --labels KEY for a labels array)" if labels_key is None else ""
        problems.append(f"unexpected arrays {unexpected}{hint}")
    names = sorted(set(arrays) & set(signature.inputs))
    inputs = {name: _fit(name, arrays[name], signature, problems) for name in names}
    sizes = {name: array.shape[0] if array.ndim else None for name, array in inputs.items()}
    if labels is not None:
        sizes[labels_key or "labels"] = labels.shape[0] if labels.ndim else None
    if len(set(sizes.values())) > 1 or None in sizes.values():
        problems.append(f"arrays must share their first (batch) dimension, got {sizes}")
    if problems:
        raise DataError(
            f"{path.name} does not match signature {signature.name!r}: {'; '.join(problems)}. Expected arrays named "
            f"{sorted(signature.inputs)} with one row per example; fix the file or the flags. "
            f"Received: {sorted(arrays) + ([labels_key] if labels is not None else [])}."
        )
    num_examples = next(iter(sizes.values())) if sizes else 0
    return Dataset(inputs=inputs, labels=labels, num_examples=int(num_examples or 0))


def _read_arrays(path: Path, signature: SignatureSpec, labels_key: str | None) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(
            f"Cannot read {path} as numpy data. Expected a .npz or .npy file written by numpy; check the path "
            f"(--data). Received: {error}"
        ) from error
    if isinstance(loaded, np.ndarray):
        if len(signature.inputs) != 1 or labels_key is not None:
            raise DataError(
                f"{path.name} holds one array, but signature {signature.name!r} has inputs "
                f"{sorted(signature.inputs)}{' and labels were asked for' if labels_key else ''}. Expected a .npz "
                f"with one array per input (and labels); write it with np.savez. Received: a .npy file."
            )
        return {next(iter(signature.inputs)): loaded}
    with loaded:
        return {name: loaded[name] for name in loaded.files}


def _fit(name: str, array: np.ndarray, signature: SignatureSpec, problems: list[str]) -> np.ndarray:
    spec = signature.inputs[name]
    if spec.dtype in SUPPORTED_DTYPES and spec.dtype != "string" and array.dtype.kind in "biufc":
        target = numpy_dtype(spec.dtype)
        if array.dtype != target:
            if np.can_cast(array.dtype, target, casting="same_kind"):
                array = array.astype(target)
            else:
                problems.append(f"{name!r} has dtype {array.dtype}, the signature wants {spec.dtype}")
    if spec.shape is not None:
        declared = spec.shape
        if array.ndim != len(declared) or any(want not in (None, got) for want, got in zip(declared, array.shape)):
            shown = ["None" if size is None else size for size in declared]
            problems.append(f"{name!r} has shape {list(array.shape)}, the signature wants {shown}")
    return array


# -------------------------------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class CompareOptions:
    """How to run a comparison.

    Attributes:
        arms: (baseline, candidate) signatures; differences are candidate - baseline.
        batch_size: examples per request.
        output: which output to compare when the signature has several.
        task: ``"classification"`` (argmax of [N, classes] scores, or integer class ids), ``"regression"``, or
            ``"auto"`` (classification for [N, C>1] floats or integer outputs, else regression).
        version, version_label: pin the model version (at most one).
        timeout: per-request deadline in seconds (default: the client's).
        num_bootstrap, seed: paired bootstrap resamples for regression intervals, and their seed.
        max_in_flight_batches: batches sent before the oldest one's answers are awaited. 2 overlaps the client's work
            with the server's; latencies are then measured under the comparison's own load (equally for both arms).
            1 measures each request alone.
    """

    arms: tuple[str, str] = ARM_SIGNATURES
    batch_size: int = 256
    output: str | None = None
    task: Task = "auto"
    version: int | None = None
    version_label: str | None = None
    timeout: float | None = None
    num_bootstrap: int = 2000
    seed: int = 0
    max_in_flight_batches: int = 2


@dataclass(frozen=True)
class ArmReport:
    """One arm: examples answered (``n``), failed requests, latency, and its accuracy or errors on paired examples."""

    signature: str
    n: int
    errors: int
    num_requests: int
    latency_ms: LatencySummary | None
    accuracy: float | None = None
    mae: float | None = None
    mse: float | None = None
    first_error: str | None = None


@dataclass(frozen=True)
class CompareReport:
    """Everything a comparison measured. ``to_dict()`` is the ``ema-serving compare --json`` document."""

    model: str
    model_version: int | None
    task: str
    output: str
    baseline: str
    candidate: str
    num_examples: int
    num_paired: int
    arms: dict[str, ArmReport]
    mean_abs_diff: float
    max_abs_diff: float
    agreement: float | None = None
    flip_rate: float | None = None
    discordant: dict[str, int] | None = None
    mcnemar_p: float | None = None
    accuracy_diff: Interval | None = None
    mae_diff: Interval | None = None
    mse_diff: Interval | None = None
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``arms.<signature>.{n, errors, accuracy, latency_ms.{p50,p90,p99}}``, ``agreement``, ..."""
        arms = {}
        for name, arm in self.arms.items():
            latency = arm.latency_ms
            arms[name] = {
                "n": arm.n,
                "errors": arm.errors,
                "requests": arm.num_requests,
                "accuracy": arm.accuracy,
                "mae": arm.mae,
                "mse": arm.mse,
                "latency_ms": None
                if latency is None
                else {"p50": latency.p50, "p90": latency.p90, "p99": latency.p99, "mean": latency.mean},
                "first_error": arm.first_error,
            }
        return {
            "model": self.model,
            "model_version": self.model_version,
            "task": self.task,
            "output": self.output,
            "baseline": self.baseline,
            "candidate": self.candidate,
            "num_examples": self.num_examples,
            "num_paired": self.num_paired,
            "arms": arms,
            "agreement": self.agreement,
            "flip_rate": self.flip_rate,
            "discordant": self.discordant,
            "mcnemar_p": self.mcnemar_p,
            "accuracy_diff": None if self.accuracy_diff is None else self.accuracy_diff.to_dict(),
            "mae_diff": None if self.mae_diff is None else self.mae_diff.to_dict(),
            "mse_diff": None if self.mse_diff is None else self.mse_diff.to_dict(),
            "mean_abs_diff": self.mean_abs_diff,
            "max_abs_diff": self.max_abs_diff,
            "wall_time_s": self.wall_time_s,
        }


# ------------------------------------------------------------------------------------------------------------- running
@dataclass
class ArmRun:
    """What one arm answered, batch by batch (None where the request failed)."""

    signature: str
    batches: list[np.ndarray | None] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    errors: list[ServingError] = field(default_factory=list)
    model_version: int | None = None
    output: str = ""

    @property
    def answered(self) -> bool:
        """Whether at least one request succeeded."""
        return any(batch is not None for batch in self.batches)


@dataclass(frozen=True)
class Runs:
    """Every arm's answers, the rows of each batch, the compared output's name and the wall time of the whole run."""

    arms: list[ArmRun]
    batch_rows: list[int]
    output: str
    wall_time_s: float


def run_arms(
    client: ServingClient,
    model: str,
    inputs: Mapping[str, np.ndarray],
    options: CompareOptions = CompareOptions(),
    *,
    arms: Sequence[str] | None = None,
) -> Runs:
    """Send every batch to every arm concurrently, keeping ``options.max_in_flight_batches`` batches in flight.

    Why a window: with one batch at a time, the client sits idle while the server works and the other way round;
    two batches (four requests) in flight overlap them, so both arms cost little more wall time than one arm queried
    batch by batch. Answers are collected in order. Why separate from ``compare``: the statistics need only the
    collected outputs, and the benchmark times this with one arm as the baseline for two.

    Raises:
        ServingError: the fatal kinds (unknown model or signature, rejected inputs) at once; others are counted.
        DataError: the signature has several outputs and ``options.output`` names none of them.
    """
    if options.batch_size < 1 or options.max_in_flight_batches < 1:
        raise DataError(
            "The batch size and the batches in flight must be at least 1. Expected positive integers "
            f"(--batch-size); fix them. Received: batch_size={options.batch_size}, "
            f"max_in_flight_batches={options.max_in_flight_batches}."
        )
    signatures = tuple(arms if arms is not None else options.arms)
    num_examples = _num_examples(inputs)
    runs = [ArmRun(signature) for signature in signatures]
    batch_rows: list[int] = []
    window: deque[list[PendingPrediction]] = deque()
    started = time.perf_counter()
    for start in range(0, num_examples, options.batch_size):
        batch = {name: array[start : start + options.batch_size] for name, array in inputs.items()}
        batch_rows.append(min(options.batch_size, num_examples - start))
        window.append([_send(client, model, signature, batch, options) for signature in signatures])
        if len(window) >= options.max_in_flight_batches:
            _collect(runs, window.popleft(), options)
    while window:
        _collect(runs, window.popleft(), options)
    output_name = options.output or next((run.output for run in runs if run.output), "")
    return Runs(runs, batch_rows, output_name, time.perf_counter() - started)


def _send(
    client: ServingClient, model: str, signature: str, batch: dict[str, np.ndarray], options: CompareOptions
) -> PendingPrediction:
    return client.predict_async(
        model,
        batch,
        signature=signature,
        version=options.version,
        version_label=options.version_label,
        timeout=options.timeout,
    )


def _collect(runs: list[ArmRun], pending: list[PendingPrediction], options: CompareOptions) -> None:
    """Wait for one batch's answers and file them under their arms."""
    for run, call in zip(runs, pending):
        try:
            prediction = call.result()
        except _FATAL_ERRORS:
            raise
        except ServingError as error:  # transient (unavailable, deadline...): count it and go on
            run.batches.append(None)
            run.errors.append(error)
            continue
        run.output = run.output or options.output or _single_output(prediction)
        run.batches.append(_output(prediction, run.output))
        run.latencies_s.append(prediction.latency_s)
        run.model_version = prediction.model_version


def compare(
    client: ServingClient,
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    options: CompareOptions = CompareOptions(),
) -> CompareReport:
    """Query both arms with the same inputs and measure how they differ (and, with labels, which is better).

    Args:
        client: an open ``ServingClient``.
        model: served model name.
        inputs: input name -> array with one row per example (see ``load_dataset``).
        labels: optional ground truth: class ids [N] (or one-hot [N, C]) for classification, targets shaped like the
            output for regression.
        options: arms, batch size, output, task, version and bootstrap settings.

    Returns:
        A ``CompareReport``.

    Raises:
        ServingError: unknown model/signature or rejected inputs; or no example was answered by both arms.
        DataError: labels or outputs that do not fit the task.
    """
    if labels is not None and len(labels) != _num_examples(inputs):
        raise DataError(
            f"There must be one label per example. Expected {_num_examples(inputs)} labels; fix the labels array "
            f"(--labels). Received: {len(labels)} labels."
        )
    runs = run_arms(client, model, inputs, options)
    baseline, candidate = runs.arms
    paired_batches = [
        (a, b) for a, b in zip(baseline.batches, candidate.batches) if a is not None and b is not None
    ]
    if not paired_batches:
        failed = next((run for run in runs.arms if run.errors), None)
        raise ServingError(
            f"No example was answered by both arms ({baseline.signature}, {candidate.signature}), so nothing can be "
            "compared. Expected the server to answer both signatures; check `ema-serving status`. "
            f"Received: {failed.errors[0] if failed else 'no input rows'}"
        )
    outputs_a = np.concatenate([a for a, _ in paired_batches]).astype(np.float64)
    outputs_b = np.concatenate([b for _, b in paired_batches]).astype(np.float64)
    paired_labels = None
    if labels is not None:
        paired_mask = np.repeat(
            [a is not None and b is not None for a, b in zip(baseline.batches, candidate.batches)], runs.batch_rows
        )
        paired_labels = np.asarray(labels)[paired_mask]
    task = _task(options.task, outputs_a, paired_labels)
    if task == "classification":
        statistics = _classification(outputs_a, outputs_b, paired_labels, baseline.signature, candidate.signature)
    else:
        statistics = _regression(outputs_a, outputs_b, paired_labels, baseline.signature, candidate.signature, options)
    arm_metrics = statistics.pop("arm_metrics")
    difference = np.abs(outputs_b - outputs_a)
    return CompareReport(
        model=model,
        model_version=candidate.model_version or baseline.model_version,
        task=task,
        output=runs.output,
        baseline=baseline.signature,
        candidate=candidate.signature,
        num_examples=sum(runs.batch_rows),
        num_paired=int(outputs_a.shape[0]),
        arms={run.signature: _arm_report(run, arm_metrics[run.signature]) for run in runs.arms},
        mean_abs_diff=float(difference.mean()) if difference.size else 0.0,
        max_abs_diff=float(difference.max()) if difference.size else 0.0,
        wall_time_s=runs.wall_time_s,
        **statistics,
    )


def _arm_report(run: ArmRun, metrics: dict[str, float]) -> ArmReport:
    return ArmReport(
        signature=run.signature,
        n=int(sum(batch.shape[0] for batch in run.batches if batch is not None)),
        errors=len(run.errors),
        num_requests=len(run.batches),
        latency_ms=LatencySummary.of(run.latencies_s),
        first_error=str(run.errors[0]) if run.errors else None,
        **metrics,
    )


def _classification(
    outputs_a: np.ndarray, outputs_b: np.ndarray, labels: np.ndarray | None, baseline: str, candidate: str
) -> dict[str, Any]:
    predicted_a, predicted_b = _classes(outputs_a), _classes(outputs_b)
    agreement = float(np.mean(predicted_a == predicted_b)) if predicted_a.size else math.nan
    statistics: dict[str, Any] = {
        "agreement": agreement,
        "flip_rate": 1.0 - agreement,
        "arm_metrics": {baseline: {}, candidate: {}},
    }
    if labels is None:
        return statistics
    truth = _class_labels(labels, outputs_a)
    correct_a, correct_b = predicted_a == truth, predicted_b == truth
    only_a = int(np.count_nonzero(correct_a & ~correct_b))
    only_b = int(np.count_nonzero(correct_b & ~correct_a))
    statistics.update(
        discordant={f"{baseline}_only_correct": only_a, f"{candidate}_only_correct": only_b},
        mcnemar_p=mcnemar_exact_p(only_a, only_b),
        accuracy_diff=paired_accuracy_difference(correct_a, correct_b),
        arm_metrics={
            baseline: {"accuracy": float(correct_a.mean())},
            candidate: {"accuracy": float(correct_b.mean())},
        },
    )
    return statistics


def _regression(
    outputs_a: np.ndarray,
    outputs_b: np.ndarray,
    labels: np.ndarray | None,
    baseline: str,
    candidate: str,
    options: CompareOptions,
) -> dict[str, Any]:
    statistics: dict[str, Any] = {"arm_metrics": {baseline: {}, candidate: {}}}
    if labels is None:
        return statistics
    targets = np.asarray(labels, dtype=np.float64)
    if targets.size != outputs_a.size:
        raise DataError(
            f"Regression labels do not fit the output. Expected {outputs_a.size} target values shaped like the "
            f"output {list(outputs_a.shape)}; fix the labels array (--labels). Received: shape {list(targets.shape)}."
        )
    targets = targets.reshape(outputs_a.shape)
    rows = outputs_a.shape[0]
    errors_a = (outputs_a - targets).reshape(rows, -1)
    errors_b = (outputs_b - targets).reshape(rows, -1)
    absolute_a, absolute_b = np.abs(errors_a).mean(axis=1), np.abs(errors_b).mean(axis=1)
    squared_a, squared_b = (errors_a**2).mean(axis=1), (errors_b**2).mean(axis=1)
    bootstrap = {"num_resamples": options.num_bootstrap, "seed": options.seed}
    statistics.update(
        mae_diff=paired_bootstrap_difference(absolute_a, absolute_b, **bootstrap),
        mse_diff=paired_bootstrap_difference(squared_a, squared_b, **bootstrap),
        arm_metrics={
            baseline: {"mae": float(absolute_a.mean()), "mse": float(squared_a.mean())},
            candidate: {"mae": float(absolute_b.mean()), "mse": float(squared_b.mean())},
        },
    )
    return statistics


def _task(requested: Task, outputs: np.ndarray, labels: np.ndarray | None) -> str:
    scores = outputs.ndim == 2 and outputs.shape[1] > 1
    if requested == "regression":
        return "regression"
    if requested == "classification":
        if not scores and outputs.ndim != 1:
            raise DataError(
                "Classification needs [N, num_classes] scores or [N] class ids. Expected such an output; pick another "
                f"output (--output) or use --task regression. Received: output shape {list(outputs.shape)}."
            )
        return "classification"
    if labels is not None and np.asarray(labels).dtype.kind == "f" and not scores:
        return "regression"
    return "classification" if scores else "regression"


def _classes(outputs: np.ndarray) -> np.ndarray:
    return outputs.argmax(axis=1) if outputs.ndim == 2 else outputs.astype(np.int64)


def _class_labels(labels: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    if labels.ndim == 2 and outputs.ndim == 2 and labels.shape == outputs.shape:
        return labels.argmax(axis=1)  # one-hot
    if labels.ndim != 1 or labels.dtype.kind not in "biu":
        raise DataError(
            "Classification labels must be integer class ids. Expected shape [N] (or one-hot [N, num_classes]); fix "
            f"the labels array (--labels). Received: dtype {labels.dtype}, shape {list(labels.shape)}."
        )
    return labels


def _num_examples(inputs: Mapping[str, np.ndarray]) -> int:
    sizes = {int(np.shape(array)[0]) for array in inputs.values()}
    if len(sizes) != 1:
        raise DataError(
            "Inputs must share their first (batch) dimension. Expected one row per example in every input; fix the "
            f"arrays. Received: sizes {sorted(sizes)}."
        )
    return sizes.pop()


def _single_output(prediction: Prediction) -> str:
    if len(prediction.outputs) != 1:
        raise DataError(
            f"Signature {prediction.signature!r} returns several outputs, so the one to compare must be named. "
            f"Expected --output NAME (CompareOptions.output); pick one of {sorted(prediction.outputs)}. "
            f"Received: {sorted(prediction.outputs)}."
        )
    return next(iter(prediction.outputs))


def _output(prediction: Prediction, name: str) -> np.ndarray:
    if name not in prediction.outputs:
        raise DataError(
            f"Signature {prediction.signature!r} has no output {name!r}. Expected one of {sorted(prediction.outputs)}; "
            f"fix --output. Received: {name!r}."
        )
    return prediction.outputs[name]
