"""A/B comparison of two signatures of one export (``serve_live`` vs ``serve_ema``) on the same inputs, streamed.

Why a paired design: both arms see exactly the same examples, so the comparison does not need two samples' worth of
noise to be resolved: agreement, the accuracy difference (with a paired-proportion interval and the exact McNemar
test, which only looks at the examples where the arms disagree) and, for regression, the error difference with a
paired normal interval. Each batch goes to both arms concurrently over the client's one channel, with the next
batch already on its way, so a comparison costs little more wall time than querying one arm batch by batch.

Why streamed: evaluation sets outgrow memory. Batches are read (``serving.data``), sent, and their answers folded
into exact, mergeable tallies (``serving.stats``) as they arrive; nothing keeps per-example outputs unless a
``PredictionWriter`` writes them out as they come. The report is built from the tallies alone, so a report built
from shards' tallies merged (``merge_reports``) is exactly the one a single process would have produced.

Why pinned: a version published mid-run would otherwise answer half the rows (issue: accuracies matching neither
version). The version serving when the comparison starts (or ``version=``) is named in every request; if it goes
away the comparison stops with an error, and an answer from any other version is an error too.

All statistics are computed over the rows both arms answered (``num_paired``); per-arm ``n`` and ``errors`` say how
many that was, and ``failed_rows`` names the rows an arm did not answer. Differences are always
``candidate - baseline``; by default the baseline is ``serve_live`` and the candidate ``serve_ema``
(``ema_export.contracts.ARM_SIGNATURES``), so a positive ``accuracy_diff`` means EMA is better.

Example:
    >>> with ServingClient("localhost:8500") as client:  # doctest: +SKIP
    ...     metadata = client.metadata("model")
    ...     data = open_data(["val-*.tfrecord.gz"], metadata.signature(SIGNATURE_EMA), DataOptions(labels_key="label"))
    ...     report = compare(client, "model", data)
    ...     print(report.accuracy_diff)
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ema_export.contracts import ARM_SIGNATURES
from serving.client import PendingPrediction, Prediction, ServingClient
from serving.data import ArraySource, Batch, DataOptions, DataSource, Dataset, IterableSource, load_dataset, open_data
from serving.protocol import (
    CodecError,
    DataError,
    InvalidRequestError,
    ModelNotFoundError,
    ServingError,
    SignatureNotFoundError,
)
from serving.stats import (
    Z_95,
    ArmTally,
    Interval,
    LatencyHistogram,
    PairTally,
    describe_runs,
    mcnemar_exact_p,
    paired_accuracy_difference,
    paired_difference_from_counts,
    paired_mean_interval,
    wilson_interval,
)

Task = Literal["auto", "classification", "regression"]

# Errors that mean an arm can never answer (wrong model, signature or inputs): stop at once instead of counting them.
_FATAL_ERRORS = (ModelNotFoundError, SignatureNotFoundError, InvalidRequestError, CodecError)

STATE_FORMAT = 1
"""Version of the ``state`` section of the JSON report (the tallies ``merge`` reads)."""


class MixedVersionsError(ServingError):
    """Rows of one comparison were answered by different model versions (or shards pinned different versions)."""


class IncompleteComparisonError(ServingError):
    """More rows failed than the allowed share (``--max-failure-rate``); the message names them."""


class MergeError(DataError):
    """Reports that cannot be merged: different runs, versions, data, or shards missing or repeated."""


@dataclass(frozen=True)
class LatencySummary:
    """Per-request latency in milliseconds: nearest-rank percentiles within ``LatencyHistogram.RELATIVE_PRECISION``
    (0.5%), exact mean."""

    p50: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, latencies_s: Sequence[float]) -> LatencySummary | None:
        """Summarise latencies given in seconds; None when there are none."""
        histogram = LatencyHistogram()
        histogram.add(np.asarray(latencies_s, dtype=np.float64) * 1000.0)
        return cls.from_histogram(histogram)

    @classmethod
    def from_histogram(cls, histogram: LatencyHistogram) -> LatencySummary | None:
        """Summarise a latency histogram; None when it is empty."""
        if histogram.num_values == 0:
            return None
        p50, p90, p99 = (histogram.percentile(q) for q in (0.5, 0.9, 0.99))
        return cls(p50, p90, p99, histogram.total_ms.mean())  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class CompareOptions:
    """How to run a comparison.

    Attributes:
        arms: (baseline, candidate) signatures; differences are candidate - baseline.
        batch_size: examples per request.
        output: which output to compare when the signature has several.
        task: ``"classification"`` (argmax of [N, classes] scores, or integer class ids), ``"regression"``, or
            ``"auto"`` (classification for [N, C>1] floats or integer outputs, else regression).
        version, version_label: the model version to compare (at most one); default: the one serving at the start.
        timeout: per-request deadline in seconds (default: the client's).
        max_in_flight_batches: batches sent before the oldest one's answers are awaited. 2 overlaps the client's work
            with the server's; latencies are then measured under the comparison's own load (equally for both arms).
            1 measures each request alone.
        pin_version: resolve the serving version first (GetModelMetadata) and name it in every request. Off, requests
            name ``version``/``version_label`` as given, and answers from two versions are still an error.
    """

    arms: tuple[str, str] = ARM_SIGNATURES
    batch_size: int = 256
    output: str | None = None
    task: Task = "auto"
    version: int | None = None
    version_label: str | None = None
    timeout: float | None = None
    max_in_flight_batches: int = 2
    pin_version: bool = True


@dataclass(frozen=True)
class Progress:
    """How far a comparison is: rows read and paired, seconds so far, and the running difference between the arms."""

    num_rows: int
    num_paired: int
    seconds: float
    difference_name: str
    difference: float | None

    @property
    def rows_per_second(self) -> float:
        """Rows read per second so far."""
        return self.num_rows / self.seconds if self.seconds > 0 else 0.0


# -------------------------------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class ArmReport:
    """One arm: rows answered (``n``), failed requests, latency, the version that answered, and its accuracy (with a
    Wilson 95% interval) or errors on paired rows."""

    signature: str
    n: int
    errors: int
    num_requests: int
    latency_ms: LatencySummary | None
    accuracy: float | None = None
    mae: float | None = None
    mse: float | None = None
    first_error: str | None = None
    accuracy_interval: tuple[float, float] | None = None
    latency_histogram: dict[str, Any] | None = None
    model_version: int | None = None
    failed_rows: tuple[tuple[int, int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The arm's part of the JSON report."""
        latency = self.latency_ms
        return {
            "n": self.n,
            "errors": self.errors,
            "requests": self.num_requests,
            "accuracy": self.accuracy,
            "accuracy_interval": None
            if self.accuracy_interval is None
            else {"low": self.accuracy_interval[0], "high": self.accuracy_interval[1], "level": 0.95},
            "mae": self.mae,
            "mse": self.mse,
            "latency_ms": None
            if latency is None
            else {"p50": latency.p50, "p90": latency.p90, "p99": latency.p99, "mean": latency.mean},
            "latency_histogram": self.latency_histogram,
            "model_version": self.model_version,
            "failed_rows": [list(run) for run in self.failed_rows],
            "first_error": self.first_error,
        }


@dataclass(frozen=True)
class CompareReport:
    """Everything a comparison measured. ``to_dict()`` is the ``ema-serving compare --json`` document; its ``state``
    holds the tallies ``merge_reports`` combines."""

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
    disagreements: dict[str, Any] | None = None
    num_corrupt_skipped: int = 0
    data: dict[str, Any] | None = None
    shards: tuple[tuple[int, int], ...] = ((0, 1),)
    state: dict[str, Any] | None = None

    @property
    def num_failed_rows(self) -> int:
        """Rows read that not both arms answered."""
        return self.num_examples - self.num_paired

    @property
    def failure_rate(self) -> float:
        """Share of the rows read that not both arms answered."""
        return self.num_failed_rows / self.num_examples if self.num_examples else 0.0

    def check_failures(self, max_failure_rate: float = 0.0) -> None:
        """Raise when more rows failed than allowed, naming them.

        Raises:
            IncompleteComparisonError: ``failure_rate > max_failure_rate``.
        """
        if self.num_failed_rows == 0 or self.failure_rate <= max_failure_rate:
            return
        named = "; ".join(
            f"{name} rows {describe_runs([list(run) for run in arm.failed_rows])} ({arm.first_error})"
            for name, arm in self.arms.items()
            if arm.failed_rows
        )
        raise IncompleteComparisonError(
            f"{self.num_failed_rows} of {self.num_examples} rows ({self.failure_rate:.2%}) were not answered by both "
            f"arms, more than the allowed {max_failure_rate:.2%}: {named}. Expected every row answered; rerun the "
            f"comparison, or allow a share of failures with --max-failure-rate. Received: {self.num_failed_rows} "
            "failed rows."
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``arms.<signature>.{n, errors, accuracy, accuracy_interval, latency_ms, latency_histogram,
        model_version, failed_rows}``, ``agreement``, ``disagreements``, ..., and ``state`` for ``merge``."""

        def interval(value: Interval | None) -> dict[str, Any] | None:
            return None if value is None else value.to_dict()

        return {
            "model": self.model,
            "model_version": self.model_version,
            "task": self.task,
            "output": self.output,
            "baseline": self.baseline,
            "candidate": self.candidate,
            "num_examples": self.num_examples,
            "num_paired": self.num_paired,
            "num_failed_rows": self.num_failed_rows,
            "failure_rate": self.failure_rate,
            "num_corrupt_skipped": self.num_corrupt_skipped,
            "arms": {name: arm.to_dict() for name, arm in self.arms.items()},
            "agreement": self.agreement,
            "flip_rate": self.flip_rate,
            "disagreements": self.disagreements,
            "discordant": self.discordant,
            "mcnemar_p": self.mcnemar_p,
            "accuracy_diff": interval(self.accuracy_diff),
            "mae_diff": interval(self.mae_diff),
            "mse_diff": interval(self.mse_diff),
            "mean_abs_diff": self.mean_abs_diff,
            "max_abs_diff": self.max_abs_diff,
            "wall_time_s": self.wall_time_s,
            "data": self.data,
            "shards": [{"index": index, "count": count} for index, count in self.shards],
            "state": self.state,
        }


# --------------------------------------------------------------------------------------------------------------- tally
class CompareState:
    """The sufficient statistics of one comparison (or of merged shards): everything the report is built from."""

    def __init__(self, model: str, arms: tuple[str, str], version: int | None, data: dict[str, Any]) -> None:
        self.model = model
        self.version = version
        self.task = ""
        self.output = ""
        self.arms = (ArmTally(arms[0]), ArmTally(arms[1]))
        self.pair = PairTally()
        self.num_examples = 0
        self.num_corrupt = 0
        self.data = data
        self.shards = [(data["shard"]["index"], data["shard"]["count"])]
        self.wall_time_s = 0.0

    def answered_version(self) -> int | None:
        """The one version that answered every arm (and was pinned), or the pinned version when nothing answered."""
        pinned = {self.version} if self.version is not None else set()
        versions = self.arms[0].versions | self.arms[1].versions | pinned
        if len(versions) > 1:
            raise MixedVersionsError(
                f"Rows of this comparison were answered by versions {sorted(versions)} of model {self.model!r}, so its "
                "statistics would match none of them. Expected one version; pin it with --version and keep it "
                f"served while comparing. Received: versions {sorted(versions)}."
            )
        return next(iter(versions), self.version)

    def report(self) -> CompareReport:
        """Build the report (deterministic: the same tallies give the same report, field by field)."""
        pair, (baseline, candidate) = self.pair, self.arms
        if pair.num_paired == 0:
            failed = next((arm for arm in self.arms if arm.first_error), None)
            raise ServingError(
                f"No example was answered by both arms ({baseline.signature}, {candidate.signature}), so nothing can "
                "be compared. Expected the server to answer both signatures; check `ema-serving status`. "
                f"Received: {failed.first_error if failed else 'no input rows'}"
            )
        statistics = self._classification() if self.task == "classification" else self._regression()
        return CompareReport(
            model=self.model,
            model_version=self.answered_version(),
            task=self.task,
            output=self.output,
            baseline=baseline.signature,
            candidate=candidate.signature,
            num_examples=self.num_examples,
            num_paired=pair.num_paired,
            arms={arm.signature: self._arm_report(arm) for arm in self.arms},
            mean_abs_diff=pair.abs_diff.mean() or 0.0,
            max_abs_diff=pair.max_abs_diff,
            wall_time_s=self.wall_time_s,
            num_corrupt_skipped=self.num_corrupt,
            data=self.data,
            shards=tuple(sorted(self.shards)),
            state=self.to_state(),
            **statistics,
        )

    def _arm_report(self, arm: ArmTally) -> ArmReport:
        labelled = self.pair.num_labelled
        accuracy = interval = mae = mse = None
        if self.task == "classification" and labelled:
            accuracy = arm.num_correct / labelled
            interval = wilson_interval(arm.num_correct, labelled)
        if self.task == "regression" and labelled:
            mae, mse = arm.abs_errors.mean(), arm.squared_errors.mean()
        return ArmReport(
            signature=arm.signature,
            n=arm.num_rows,
            errors=arm.num_errors,
            num_requests=arm.num_requests,
            latency_ms=LatencySummary.from_histogram(arm.latency),
            accuracy=accuracy,
            mae=mae,
            mse=mse,
            first_error=arm.first_error,
            accuracy_interval=interval,
            latency_histogram=arm.latency.to_dict(),
            model_version=next(iter(arm.versions), None) if len(arm.versions) == 1 else self.version,
            failed_rows=tuple(tuple(run) for run in arm.failed_rows),  # type: ignore[misc]
        )

    def _classification(self) -> dict[str, Any]:
        pair = self.pair
        agreement = pair.num_agree / pair.num_paired
        statistics: dict[str, Any] = {
            "agreement": agreement,
            "flip_rate": 1.0 - agreement,
            "disagreements": pair.disagreement_matrix(),
        }
        if pair.num_labelled:
            b, c = pair.baseline_only, pair.candidate_only
            statistics.update(
                discordant={f"{self.arms[0].signature}_only_correct": b, f"{self.arms[1].signature}_only_correct": c},
                mcnemar_p=mcnemar_exact_p(b, c),
                accuracy_diff=paired_difference_from_counts(b, c, pair.num_labelled),
            )
        return statistics

    def _regression(self) -> dict[str, Any]:
        return {
            "mae_diff": paired_mean_interval(self.pair.abs_error_diff),
            "mse_diff": paired_mean_interval(self.pair.squared_error_diff),
        }

    def to_state(self) -> dict[str, Any]:
        """The JSON form ``merge`` reads back."""
        return {
            "format": STATE_FORMAT,
            "model": self.model,
            "version": self.version,
            "task": self.task,
            "output": self.output,
            "num_examples": self.num_examples,
            "num_corrupt": self.num_corrupt,
            "wall_time_s": self.wall_time_s,
            "arms": [arm.to_state() for arm in self.arms],
            "pair": self.pair.to_state(),
        }

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> CompareState:
        """Rebuild the tallies from a ``--json`` report document.

        Raises:
            MergeError: the document has no ``state`` section of a known format.
        """
        state = document.get("state")
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise MergeError(
                "The report has no mergeable state. Expected a document written by `ema-serving compare --json` "
                f"(state format {STATE_FORMAT}); rerun compare with --json. Received: state="
                f"{type(state).__name__ if not isinstance(state, Mapping) else state.get('format')}."
            )
        arms = tuple(ArmTally.from_state(arm) for arm in state["arms"])
        tally = cls(state["model"], (arms[0].signature, arms[1].signature), state["version"], document["data"])
        tally.arms = (arms[0], arms[1])
        tally.pair = PairTally.from_state(state["pair"])
        tally.task, tally.output = state["task"], state["output"]
        tally.num_examples, tally.num_corrupt = int(state["num_examples"]), int(state["num_corrupt"])
        tally.wall_time_s = float(state["wall_time_s"])
        tally.shards = [(int(shard["index"]), int(shard["count"])) for shard in document["shards"]]
        return tally

    def merge(self, other: CompareState) -> None:
        """Add another shard's tallies (the caller checked they belong to the same comparison)."""
        for mine, theirs in zip(self.arms, other.arms):
            mine.merge(theirs)
        self.pair.merge(other.pair)
        self.num_examples += other.num_examples
        self.num_corrupt += other.num_corrupt
        self.task = self.task or other.task
        self.output = self.output or other.output
        self.shards += other.shards
        self.wall_time_s = max(self.wall_time_s, other.wall_time_s)  # shards run side by side


def merge_reports(documents: Sequence[Mapping[str, Any]]) -> CompareReport:
    """Combine the ``--json`` reports of the shards of one comparison into the report one process would have made.

    Raises:
        MergeError: the reports are of different comparisons (model, arms, task, output, data), or their shards do
            not make up the whole data set exactly once.
        MixedVersionsError: the shards' rows were answered by different model versions.
    """
    if not documents:
        raise MergeError("Nothing to merge. Expected one or more report files; name them. Received: no reports.")
    states = [CompareState.from_document(document) for document in documents]
    _check_same_comparison(states)
    shards = sorted(shard for state in states for shard in state.shards)
    counts = {count for _, count in shards}
    expected = [(index, next(iter(counts))) for index in range(next(iter(counts)))] if len(counts) == 1 else []
    if shards != expected:
        raise MergeError(
            "The reports' shards do not make up the data set exactly once. Expected shards 0..N-1 of one N, each "
            f"once; merge the report of every shard (and none twice). Received shards: "
            f"{[f'{index}/{count}' for index, count in shards]}."
        )
    merged = states[0]
    for state in states[1:]:
        merged.merge(state)
    merged.data = {**merged.data, "shard": {"index": 0, "count": 1}}
    return merged.report()


def _check_same_comparison(states: list[CompareState]) -> None:
    def key(state: CompareState) -> dict[str, Any]:
        return {
            "model": state.model,
            "arms": [arm.signature for arm in state.arms],
            "task": state.task,
            "output": state.output,
            "data": {name: value for name, value in state.data.items() if name != "shard"},
        }

    first = key(states[0])
    for state in states[1:]:
        differences = sorted(name for name, value in key(state).items() if first[name] != value)
        if differences:
            raise MergeError(
                f"The reports are not shards of one comparison: they differ in {differences}. Expected reports of "
                "`ema-serving compare --shard I/N` runs with the same model, arms, task, output and --data; merge "
                f"only those. Received: {first} and {key(state)}."
            )
    versions = sorted({version for state in states if (version := state.answered_version()) is not None})
    if len(versions) > 1:
        raise MixedVersionsError(
            f"The shards' rows were answered by different versions {versions} of model {states[0].model!r}, so the "
            "merged statistics would match none of them. Expected every shard pinned to one version; rerun the "
            f"shards with --version {versions[-1]}. Received: versions {versions}."
        )


# ------------------------------------------------------------------------------------------------------------- running
class PredictionWriter:
    """Writes every row's outputs as JSON lines while the comparison runs (``--save-predictions``).

    Each line is ``{"row": r, "<baseline>": [...], "<candidate>": [...], "label": ...}`` (``null`` where an arm
    failed). The file is written under a temporary name and renamed when the comparison ends, so a reader never sees
    a half-written file; on failure the temporary file is removed.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._partial = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        try:
            self._file = open(self._partial, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as error:
            raise DataError(
                f"Cannot write predictions to {self.path}. Expected a writable file path; fix --save-predictions. "
                f"Received: {error}."
            ) from error

    def write(self, batch: Batch, outputs: dict[str, np.ndarray | None]) -> None:
        """Write one batch's rows."""
        lines = []
        for position, row in enumerate(batch.rows.tolist()):
            entry: dict[str, Any] = {"row": row}
            for name, values in outputs.items():
                entry[name] = None if values is None else values[position].tolist()
            if batch.labels is not None:
                entry["label"] = np.asarray(batch.labels[position]).tolist()
            lines.append(json.dumps(entry))
        self._file.write("\n".join(lines) + "\n")

    def close(self, success: bool) -> None:
        """Publish the file (``success``) or remove the partial one."""
        self._file.close()
        if success:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class Runs:
    """What ``run_arms`` measured: per-arm tallies and the wall time of the whole run."""

    arms: list[ArmTally]
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
    """Send every batch to the given arms (default: both) and only count the answers: the pipeline ``compare`` uses,
    without its statistics. Why: the benchmark times one arm through it as the baseline for two."""
    _check_sizes(options)
    signatures = tuple(arms if arms is not None else options.arms)
    tallies = [ArmTally(signature) for signature in signatures]
    window: deque[tuple[Batch, list[PendingPrediction]]] = deque()
    started = time.perf_counter()
    for batch in ArraySource(inputs).batches(options.batch_size):
        window.append((batch, [_send(client, model, signature, batch, options, None) for signature in signatures]))
        if len(window) >= options.max_in_flight_batches:
            _count(tallies, *window.popleft())
    while window:
        _count(tallies, *window.popleft())
    output = options.output or ""
    return Runs(tallies, output, time.perf_counter() - started)


def _count(tallies: list[ArmTally], batch: Batch, pending: list[PendingPrediction]) -> None:
    for tally, call in zip(tallies, pending):
        prediction = call.result()
        tally.fold_answer(batch.num_rows, prediction.latency_s * 1000.0, prediction.model_version)


def compare(
    client: ServingClient,
    model: str,
    data: Mapping[str, np.ndarray] | DataSource | Iterable[Any],
    *,
    labels: np.ndarray | None = None,
    options: CompareOptions = CompareOptions(),
    progress: Callable[[Progress], None] | None = None,
    predictions: PredictionWriter | None = None,
) -> CompareReport:
    """Query both arms with the same inputs, batch by batch, and measure how they differ (with labels: which is better).

    Args:
        client: an open ``ServingClient``.
        model: served model name.
        data: input name -> array with one row per example (see ``load_dataset``); a ``DataSource`` (``open_data``:
            numpy or TFRecord files, sharded); or any iterable of batches, ``{name: array}`` or
            ``({name: array}, labels)``.
        labels: with arrays only: class ids [N] (or one-hot [N, C]) for classification, targets shaped like the
            output for regression.
        options: arms, batch size, output, task, version.
        progress: called after every batch with a ``Progress`` (from this thread).
        predictions: where to write every row's outputs as they come (closed by ``compare``).

    Returns:
        A ``CompareReport``.

    Raises:
        ServingError: unknown model/signature or rejected inputs; the pinned version went away; or no example was
            answered by both arms.
        MixedVersionsError: answers came from more than one model version.
        DataError: data, labels or outputs that do not fit the task.
    """
    _check_sizes(options)
    source = _source(data, labels)
    success = False
    try:
        state = _run(client, model, source, options, progress, predictions)
        success = True
    finally:
        if predictions is not None:
            predictions.close(success)
    return state.report()


def _run(
    client: ServingClient,
    model: str,
    source: DataSource,
    options: CompareOptions,
    progress: Callable[[Progress], None] | None,
    predictions: PredictionWriter | None,
) -> CompareState:
    version = _pinned_version(client, model, options)
    state = CompareState(model, options.arms, version, source.describe())
    window: deque[tuple[Batch, list[PendingPrediction]]] = deque()
    started = time.perf_counter()
    for batch in source.batches(options.batch_size):
        if batch.num_rows == 0:
            continue
        state.num_examples += batch.num_rows
        window.append((batch, [_send(client, model, arm, batch, options, version) for arm in options.arms]))
        if len(window) >= options.max_in_flight_batches:
            _fold(state, *window.popleft(), options, predictions)
            _report_progress(state, started, progress)
    while window:
        _fold(state, *window.popleft(), options, predictions)
        _report_progress(state, started, progress)
    state.num_corrupt = source.num_corrupt
    state.wall_time_s = time.perf_counter() - started
    return state


def _source(data: Any, labels: np.ndarray | None) -> DataSource:
    if isinstance(data, Mapping):
        return ArraySource({name: np.asarray(array) for name, array in data.items()},
                           None if labels is None else np.asarray(labels))  # fmt: skip
    if labels is not None:
        raise DataError(
            "labels= goes with input arrays only. Expected labels inside the data source (DataOptions.labels_key) or "
            "the iterable's (inputs, labels) pairs; drop labels=. Received: labels with a data source."
        )
    return data if hasattr(data, "batches") and hasattr(data, "describe") else IterableSource(data)


def _check_sizes(options: CompareOptions) -> None:
    if options.batch_size < 1 or options.max_in_flight_batches < 1:
        raise DataError(
            "The batch size and the batches in flight must be at least 1. Expected positive integers "
            f"(--batch-size); fix them. Received: batch_size={options.batch_size}, "
            f"max_in_flight_batches={options.max_in_flight_batches}."
        )


def _pinned_version(client: ServingClient, model: str, options: CompareOptions) -> int | None:
    """The version every request will name: ``options.version``, else the one serving now (None if not told)."""
    if options.version is not None or not options.pin_version:
        return options.version
    return client.metadata(model, version_label=options.version_label, timeout=options.timeout).version


def _send(
    client: ServingClient, model: str, signature: str, batch: Batch, options: CompareOptions, version: int | None
) -> PendingPrediction:
    return client.predict_async(
        model,
        batch.inputs,
        signature=signature,
        version=version,
        version_label=None if version is not None else options.version_label,
        timeout=options.timeout,
    )


def _fold(
    state: CompareState,
    batch: Batch,
    pending: list[PendingPrediction],
    options: CompareOptions,
    predictions: PredictionWriter | None,
) -> None:
    """Wait for one batch's answers and fold them into the tallies."""
    outputs: dict[str, np.ndarray | None] = {}
    for tally, call in zip(state.arms, pending):
        prediction = _answer(state, call)
        if isinstance(prediction, ServingError):
            tally.fold_failure(batch.rows, str(prediction))
            outputs[tally.signature] = None
            continue
        state.output = state.output or options.output or _single_output(prediction)
        outputs[tally.signature] = _output(prediction, state.output)
        tally.fold_answer(batch.num_rows, prediction.latency_s * 1000.0, prediction.model_version)
        state.answered_version()  # fail at the first answer from another version, not at the end
    if predictions is not None:
        predictions.write(batch, outputs)
    baseline, candidate = (outputs[tally.signature] for tally in state.arms)
    if baseline is None or candidate is None:
        return
    baseline, candidate = baseline.astype(np.float64), candidate.astype(np.float64)
    state.task = state.task or _task(options.task, baseline, batch.labels)
    state.pair.fold_outputs(baseline, candidate)
    if state.task == "classification":
        truth = None if batch.labels is None else _class_labels(np.asarray(batch.labels), baseline)
        state.pair.fold_classes(state.arms, (_classes(baseline), _classes(candidate)), truth)
    elif batch.labels is not None:
        state.pair.fold_losses(state.arms, *_losses(baseline, candidate, np.asarray(batch.labels)))


def _answer(state: CompareState, call: PendingPrediction) -> Prediction | ServingError:
    """The answer, or the error of a transient failure (to be counted); fatal errors are raised."""
    try:
        return call.result()
    except ModelNotFoundError as error:
        if state.version is None:
            raise
        raise ModelNotFoundError(
            f"Version {state.version} of model {state.model!r}, pinned when the comparison started (every request "
            "names it), is no longer served: probably a newer version was published mid-run. Expected it to stay "
            "loaded until the comparison ends; rerun, or serve both versions while comparing (version policy "
            f"`specific` or `all`). Received: {error}",
            code=error.code,
        ) from error
    except _FATAL_ERRORS:
        raise
    except ServingError as error:  # transient (unavailable, deadline...): count it and go on
        return error


def _report_progress(state: CompareState, started: float, progress: Callable[[Progress], None] | None) -> None:
    if progress is None:
        return
    pair = state.pair
    name, value = "", None
    if state.task == "classification" and pair.num_labelled:
        name, value = "accuracy diff", (pair.candidate_only - pair.baseline_only) / pair.num_labelled
    elif state.task == "classification" and pair.num_paired:
        name, value = "flip rate", 1.0 - pair.num_agree / pair.num_paired
    elif state.task == "regression" and pair.num_labelled:
        name, value = "MAE diff", pair.abs_error_diff[0].mean()
    progress(Progress(state.num_examples, pair.num_paired, time.perf_counter() - started, name, value))


def _losses(
    baseline: np.ndarray, candidate: np.ndarray, labels: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Per-row mean |error| and mean error^2 of both arms."""
    targets = np.asarray(labels, dtype=np.float64)
    if targets.size != baseline.size:
        raise DataError(
            f"Regression labels do not fit the output. Expected {baseline.size} target values shaped like the "
            f"output {list(baseline.shape)}; fix the labels array (--labels). Received: shape {list(targets.shape)}."
        )
    targets = targets.reshape(baseline.shape)
    rows = baseline.shape[0]
    errors_a = (baseline - targets).reshape(rows, -1)
    errors_b = (candidate - targets).reshape(rows, -1)
    absolute = (np.abs(errors_a).mean(axis=1), np.abs(errors_b).mean(axis=1))
    squared = ((errors_a**2).mean(axis=1), (errors_b**2).mean(axis=1))
    return absolute, squared


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


__all__ = [
    "ArmReport",
    "CompareOptions",
    "CompareReport",
    "CompareState",
    "DataOptions",
    "Dataset",
    "IncompleteComparisonError",
    "Interval",
    "LatencySummary",
    "MergeError",
    "MixedVersionsError",
    "PredictionWriter",
    "Progress",
    "Z_95",
    "compare",
    "load_dataset",
    "mcnemar_exact_p",
    "merge_reports",
    "open_data",
    "paired_accuracy_difference",
    "run_arms",
]
