"""Route live traffic between the arms of one export: a deterministic weighted split, and shadow mode.

Why here and not in the mesh: KServe and Istio split traffic between *deployments*; both arms of an ema-export are
signatures of one SavedModel in one server, which only the caller can choose between (by ``signature_name``). And TF
Serving's own Prometheus metrics are labelled by model, not by signature, so per-arm counters have to be kept by the
caller too.

* **Weighted split**: a request key (user id, session id...) is hashed with BLAKE2b into [0, 1) and mapped onto the
  cumulative weights of the arms in sorted order, so the same key always lands on the same arm, in every process and
  whatever order the weights were written in; changing one weight moves only the keys in the boundary region.
* **Shadow mode**: the arm chosen by the split answers; the ``shadow`` arm gets the same request at the same time, and
  its answer is compared with the primary's when both have arrived, on gRPC's callback thread, so the caller never
  waits for it. Divergence (top-1 disagreements, largest absolute difference) and shadow errors are counted.

Counters are plain data (``Router.metrics()``); ``Router.prometheus_collector()`` exposes them to ``prometheus_client``
(imported only when asked for).

Example:
    >>> router = Router(client, RouterConfig("model", weights={"serve_ema": 0.9, "serve_live": 0.1}))  # doctest: +SKIP
    >>> routed = router.predict("user-42", {"inputs": batch})  # doctest: +SKIP
    >>> routed.signature, routed.prediction.outputs["output_0"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ema_export.contracts import SIGNATURE_EMA
from serving.client import PendingPrediction, Prediction, ServingClient
from serving.protocol import InvalidRequestError, ServingError

LATENCY_BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Histogram bucket upper bounds in seconds (Prometheus' defaults, plus a 1 ms bucket for loopback servers)."""

PRIMARY = "primary"
SHADOW = "shadow"


@dataclass(frozen=True)
class RouterConfig:
    """Where and how to route.

    Attributes:
        model: served model name.
        weights: arm signature -> non-negative weight (normalised; zero means never chosen).
        shadow: a signature to mirror every request to when it is not the one answering, or None.
        salt: changes the key -> arm assignment (e.g. per experiment) while keeping it deterministic.
        version, version_label: pin the model version (at most one).
        timeout: per-request deadline in seconds (default: the client's).
    """

    model: str
    weights: Mapping[str, float] = field(default_factory=lambda: {SIGNATURE_EMA: 1.0})
    shadow: str | None = None
    salt: str = ""
    version: int | None = None
    version_label: str | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class RoutedPrediction:
    """The answer, the arm that gave it, and the arm it was shadowed to (if any)."""

    signature: str
    prediction: Prediction
    shadow: str | None


@dataclass(frozen=True)
class ArmMetrics:
    """Counters of one arm in one role (``"primary"`` answers, ``"shadow"`` mirrors).

    ``latency_buckets`` are cumulative counts for ``LATENCY_BUCKETS_S`` (the ``+Inf`` bucket is ``requests - errors``).
    """

    signature: str
    role: str
    requests: int
    errors: int
    latency_sum_s: float
    latency_buckets: tuple[int, ...]


@dataclass(frozen=True)
class ShadowMetrics:
    """How the shadow arm's answers diverged from the primary's.

    Attributes:
        comparisons: requests where both answers arrived and were compared.
        rows_compared / rows_disagreeing: examples compared on top-1 class (outputs shaped [N, classes]).
        max_abs_diff: largest absolute difference seen in any shared output.
        sum_max_abs_diff: sum over comparisons of each one's largest difference (for the mean).
        errors: shadow requests that failed (never surfaced to the caller).
    """

    primary: str
    shadow: str
    comparisons: int
    rows_compared: int
    rows_disagreeing: int
    max_abs_diff: float
    sum_max_abs_diff: float
    errors: int


@dataclass(frozen=True)
class RouterMetrics:
    """A consistent snapshot of every counter."""

    arms: tuple[ArmMetrics, ...]
    shadows: tuple[ShadowMetrics, ...]


@dataclass
class _ArmCounter:
    requests: int = 0
    errors: int = 0
    latency_sum_s: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))


@dataclass
class _ShadowCounter:
    comparisons: int = 0
    rows_compared: int = 0
    rows_disagreeing: int = 0
    max_abs_diff: float = 0.0
    sum_max_abs_diff: float = 0.0
    errors: int = 0


def _validate(config: RouterConfig) -> list[tuple[str, float]]:
    """Check the weights and return them normalised, in sorted arm order."""
    weights = dict(config.weights)
    bad = {arm: weight for arm, weight in weights.items() if not (math.isfinite(weight) and weight >= 0)}
    total = sum(weight for weight in weights.values() if math.isfinite(weight) and weight >= 0)
    if not weights or bad or total <= 0:
        raise InvalidRequestError(
            "Router weights must be finite, non-negative and not all zero. Expected a mapping such as "
            "{'serve_ema': 0.9, 'serve_live': 0.1}; fix RouterConfig.weights. "
            f"Received: {weights}."
        )
    return [(arm, weights[arm] / total) for arm in sorted(weights)]


class Router:
    """Send each request to one arm by key, optionally mirroring it to a shadow arm, and count what happens.

    Thread-safe: one router can serve concurrent request handlers (the client's channel multiplexes them).
    """

    def __init__(self, client: ServingClient, config: RouterConfig) -> None:
        self.client = client
        self.config = config
        self._weights = _validate(config)
        # BLAKE2b keyed hashing takes at most 64 key bytes: key it with the digest of the salt, whatever its length.
        self._hash_key = hashlib.blake2b(config.salt.encode("utf-8")).digest()
        self._fallback = next(arm for arm, weight in reversed(self._weights) if weight > 0)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight_shadows = 0
        self._arm_counters: dict[tuple[str, str], _ArmCounter] = {}
        self._shadow_counters: dict[tuple[str, str], _ShadowCounter] = {}

    def choose(self, key: str | bytes) -> str:
        """The arm this key is routed to: a pure function of (key, salt, weights)."""
        data = key if isinstance(key, bytes) else str(key).encode("utf-8")
        digest = hashlib.blake2b(data, digest_size=8, key=self._hash_key).digest()
        point = int.from_bytes(digest, "big") / 2.0**64
        cumulative = 0.0
        for arm, weight in self._weights:
            cumulative += weight
            if point < cumulative and weight > 0:
                return arm
        return self._fallback  # only when rounding leaves the cumulative sum a hair below 1

    def predict(self, key: str | bytes, inputs: Mapping[str, Any]) -> RoutedPrediction:
        """Answer from the arm chosen for ``key``; mirror to the shadow arm without waiting for it.

        Raises:
            ServingError: the answering arm failed (shadow failures are only counted).
        """
        primary = self.choose(key)
        shadow = self.config.shadow if self.config.shadow not in (None, primary) else None
        primary_call = self._send(primary, inputs)
        if shadow is not None:
            self._start_shadow(primary, primary_call, shadow, self._send(shadow, inputs))
        try:
            prediction = primary_call.result()
        except ServingError:
            self._record(primary, PRIMARY, None)
            raise
        self._record(primary, PRIMARY, prediction.latency_s)
        return RoutedPrediction(primary, prediction, shadow)

    def wait_for_shadows(self, timeout: float | None = None) -> bool:
        """Block until no shadow request is in flight (for shutdown and tests). Returns False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight_shadows == 0, timeout=timeout)

    def metrics(self) -> RouterMetrics:
        """A snapshot of all counters (copies; safe to keep)."""
        with self._lock:
            arms = tuple(
                ArmMetrics(arm, role, c.requests, c.errors, c.latency_sum_s, tuple(c.buckets))
                for (arm, role), c in sorted(self._arm_counters.items())
            )
            shadows = tuple(
                ShadowMetrics(
                    primary, shadow, c.comparisons, c.rows_compared, c.rows_disagreeing, c.max_abs_diff,
                    c.sum_max_abs_diff, c.errors,
                )  # fmt: skip
                for (primary, shadow), c in sorted(self._shadow_counters.items())
            )
        return RouterMetrics(arms, shadows)

    def prometheus_collector(self, prefix: str = "ema_serving_router") -> Any:
        """A ``prometheus_client`` collector over this router's counters; register it with ``REGISTRY.register``.

        Raises:
            ImportError: ``prometheus_client`` is not installed (``pip install prometheus-client``).
        """
        return _PrometheusCollector(self, prefix)

    # --------------------------------------------------------------------------------------------------- internals
    def _send(self, signature: str, inputs: Mapping[str, Any]) -> PendingPrediction:
        config = self.config
        return self.client.predict_async(
            config.model,
            inputs,
            signature=signature,
            version=config.version,
            version_label=config.version_label,
            timeout=config.timeout,
        )

    def _record(self, arm: str, role: str, latency_s: float | None) -> None:
        with self._lock:
            counter = self._arm_counters.setdefault((arm, role), _ArmCounter())
            counter.requests += 1
            if latency_s is None:
                counter.errors += 1
                return
            counter.latency_sum_s += latency_s
            for index, bound in enumerate(LATENCY_BUCKETS_S):
                if latency_s <= bound:
                    counter.buckets[index] += 1

    def _start_shadow(
        self, primary: str, primary_call: PendingPrediction, shadow: str, call: PendingPrediction
    ) -> None:
        with self._lock:
            self._in_flight_shadows += 1
            self._shadow_counters.setdefault((primary, shadow), _ShadowCounter())
        remaining = [2]
        join = threading.Lock()

        def on_done(_: PendingPrediction) -> None:
            # Runs on gRPC's callback thread once per call; the second one to finish does the comparison.
            with join:
                remaining[0] -= 1
                if remaining[0]:
                    return
            try:
                self._compare(primary, primary_call, shadow, call)
            finally:
                with self._idle:
                    self._in_flight_shadows -= 1
                    self._idle.notify_all()

        primary_call.add_done_callback(on_done)
        call.add_done_callback(on_done)

    def _compare(self, primary: str, primary_call: PendingPrediction, shadow: str, call: PendingPrediction) -> None:
        try:
            mirrored = call.result()
        except ServingError:
            self._record(shadow, SHADOW, None)
            with self._lock:
                self._shadow_counters[(primary, shadow)].errors += 1
            return
        self._record(shadow, SHADOW, mirrored.latency_s)
        try:
            answered = primary_call.result()
        except ServingError:
            return  # nothing to compare with; the primary failure is counted by predict()
        divergence = _divergence(answered.outputs, mirrored.outputs)
        with self._lock:
            counter = self._shadow_counters[(primary, shadow)]
            counter.comparisons += 1
            counter.rows_compared += divergence[0]
            counter.rows_disagreeing += divergence[1]
            counter.max_abs_diff = max(counter.max_abs_diff, divergence[2])
            counter.sum_max_abs_diff += divergence[2]


def _divergence(primary: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]) -> tuple[int, int, float]:
    """(rows compared on top-1, rows whose top-1 differs, largest absolute difference) over the shared outputs."""
    rows_compared = rows_disagreeing = 0
    largest = 0.0
    for name in sorted(set(primary) & set(shadow)):
        a, b = primary[name], shadow[name]
        if a.shape != b.shape or a.dtype.kind not in "biuf" or b.dtype.kind not in "biuf" or a.size == 0:
            continue
        largest = max(largest, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
        if a.ndim == 2 and a.shape[1] > 1:
            rows_compared += a.shape[0]
            rows_disagreeing += int(np.count_nonzero(a.argmax(axis=1) != b.argmax(axis=1)))
    return rows_compared, rows_disagreeing, largest


class _PrometheusCollector:
    """Translates a router's counters into Prometheus metric families at scrape time (no state of its own)."""

    def __init__(self, router: Router, prefix: str) -> None:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        self._families = (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)
        self._router = router
        self._prefix = prefix

    def describe(self) -> list[Any]:
        return []  # unchecked collector: families are only known at scrape time

    def collect(self) -> Iterator[Any]:
        counter_family, gauge_family, histogram_family = self._families
        metrics = self._router.metrics()
        model = self._router.config.model
        arm_labels = ["model", "signature", "role"]
        prefix = self._prefix
        requests = counter_family(f"{prefix}_requests", "Predict requests sent, per arm and role.", labels=arm_labels)
        errors = counter_family(f"{prefix}_errors", "Failed Predict requests, per arm and role.", labels=arm_labels)
        latency = histogram_family(f"{prefix}_latency_seconds", "Predict latency per arm and role.", labels=arm_labels)
        for arm in metrics.arms:
            labels = [model, arm.signature, arm.role]
            requests.add_metric(labels, arm.requests)
            errors.add_metric(labels, arm.errors)
            buckets = [(repr(bound), count) for bound, count in zip(LATENCY_BUCKETS_S, arm.latency_buckets)]
            buckets.append(("+Inf", arm.requests - arm.errors))
            latency.add_metric(labels, buckets, arm.latency_sum_s)
        yield from (requests, errors, latency)
        shadow_labels = ["model", "primary", "shadow"]
        comparisons = counter_family(f"{prefix}_shadow_comparisons", "Shadow answers compared.", labels=shadow_labels)
        rows = counter_family(f"{prefix}_shadow_rows", "Examples compared on top-1 class.", labels=shadow_labels)
        flips = counter_family(f"{prefix}_shadow_disagreements", "Examples whose top-1 differs.", labels=shadow_labels)
        shadow_errors = counter_family(f"{prefix}_shadow_errors", "Shadow requests that failed.", labels=shadow_labels)
        largest = gauge_family(f"{prefix}_shadow_max_abs_diff", "Largest |primary - shadow|.", labels=shadow_labels)
        for shadow in metrics.shadows:
            labels = [model, shadow.primary, shadow.shadow]
            comparisons.add_metric(labels, shadow.comparisons)
            rows.add_metric(labels, shadow.rows_compared)
            flips.add_metric(labels, shadow.rows_disagreeing)
            shadow_errors.add_metric(labels, shadow.errors)
            largest.add_metric(labels, shadow.max_abs_diff)
        yield from (comparisons, rows, flips, shadow_errors, largest)
