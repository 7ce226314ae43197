"""A/B comparison: every statistic checked against a value computed independently here (numpy, scipy)."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from scipy import stats

from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from serving import ServingClient
from serving.ab import (
    CompareOptions,
    LatencySummary,
    compare,
    load_dataset,
    mcnemar_exact_p,
    paired_accuracy_difference,
)
from serving.data import DataOptions, Shard, open_data
from serving.protocol import DataError, ModelNotFoundError, ServingError, SignatureNotFoundError
from serving.stats import ExactSum, LatencyHistogram, paired_mean_interval, wilson_interval
from support.rpc import classification_inputs

pytestmark = pytest.mark.slow  # compares the arms of exports served on loopback; tests/unit covers the statistics alone

NUM_EXAMPLES = 300


# ------------------------------------------------------------------------------------------------ statistics, offline
@pytest.mark.parametrize(("b", "c"), [(0, 0), (0, 1), (3, 10), (10, 3), (7, 7), (40, 61), (0, 30), (6000, 6250)])
def test_mcnemar_exact_p_is_scipys_two_sided_binomial_test(b: int, c: int) -> None:
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_paired_accuracy_difference_is_the_wald_interval_of_per_example_differences() -> None:
    generator = np.random.default_rng(3)
    baseline = generator.random(500) < 0.7
    candidate = np.where(generator.random(500) < 0.85, baseline, ~baseline)
    differences = candidate.astype(float) - baseline.astype(float)  # -1, 0 or +1 per example
    standard_error = differences.std() / math.sqrt(differences.size)
    interval = paired_accuracy_difference(baseline, candidate)
    assert interval.estimate == pytest.approx(candidate.mean() - baseline.mean())
    assert (interval.low, interval.high) == pytest.approx(
        (differences.mean() - 1.959964 * standard_error, differences.mean() + 1.959964 * standard_error), rel=1e-6
    )


def test_paired_mean_interval_streams_exactly_whatever_the_batching() -> None:
    generator = np.random.default_rng(5)
    differences = generator.normal(0.2, 1.0, 4000) * generator.exponential(1.0, 4000)
    half_width = 1.959964 * differences.std() / math.sqrt(differences.size)
    whole, pieces = (ExactSum(), ExactSum()), (ExactSum(), ExactSum())
    whole[0].add(differences), whole[1].add(differences * differences)
    for chunk in np.array_split(differences[::-1], 7):  # other order, other batches
        piece = (ExactSum(), ExactSum())
        piece[0].add(chunk), piece[1].add(chunk * chunk)
        pieces[0].merge(piece[0]), pieces[1].merge(piece[1])
    interval = paired_mean_interval(whole)
    assert interval == paired_mean_interval(pieces)  # bit for bit
    assert interval.estimate == pytest.approx(differences.mean(), rel=1e-12)
    assert (interval.low, interval.high) == pytest.approx(
        (differences.mean() - half_width, differences.mean() + half_width), rel=1e-6)  # fmt: skip
    assert paired_mean_interval((ExactSum(), ExactSum())) is None


def test_exact_sums_are_correctly_rounded_and_order_free() -> None:
    generator = np.random.default_rng(8)
    values = np.concatenate([generator.normal(size=5000) * 10.0 ** generator.integers(-30, 30, 5000), [1e300, -1e300]])
    total = ExactSum()
    total.add(values)
    assert total.value() == math.fsum(values)  # fsum is correctly rounded too
    shuffled = ExactSum()
    for chunk in np.array_split(generator.permutation(values), 13):
        part = ExactSum()
        part.add(chunk)
        shuffled.merge(part)
    assert shuffled.to_state() == total.to_state()
    total.add(np.array([np.nan]))
    assert math.isnan(total.value()) and total.num_nonfinite == 1


def test_wilson_interval_matches_its_formula_at_the_edges() -> None:
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.16113, abs=1e-4)  # the textbook value for 0/20
    low, high = wilson_interval(81, 263)
    assert (low, high) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert all(math.isnan(bound) for bound in wilson_interval(0, 0))


def test_latency_percentiles_are_in_milliseconds() -> None:
    summary = LatencySummary.of([millisecond / 1000 for millisecond in range(1, 102)])  # 1..101 ms
    # Nearest-rank percentiles from the histogram, within its stated relative precision; the mean is exact.
    precision = LatencyHistogram.RELATIVE_PRECISION
    assert (summary.p50, summary.p90, summary.p99) == pytest.approx((51, 91, 100), rel=precision)
    assert summary.mean == pytest.approx(51, rel=1e-12)
    assert LatencySummary.of([]) is None


def test_latency_histograms_merge_by_adding_counts() -> None:
    latencies = np.random.default_rng(4).lognormal(1.0, 1.0, 3000)
    whole, first, second = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    whole.add(latencies), first.add(latencies[::2]), second.add(latencies[1::2])
    first.merge(second)
    assert first.to_state() == whole.to_state()
    for quantile in (0.5, 0.9, 0.99):
        nearest_rank = np.sort(latencies)[math.ceil(quantile * latencies.size) - 1]
        assert whole.percentile(quantile) == pytest.approx(nearest_rank, rel=LatencyHistogram.RELATIVE_PRECISION)
    document = whole.to_dict()
    assert len(document["bounds_ms"]) == len(document["counts"]) + 1 and sum(document["counts"]) == latencies.size


# ------------------------------------------------------------------------------------------- comparisons, on a server
@pytest.fixture(scope="module")
def client(classifier) -> ServingClient:
    with ServingClient(classifier.target, timeout=20) as opened:
        yield opened


@pytest.fixture(scope="module")
def labelled(classifier) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels that make both arms partly right: mostly EMA's class, some live's, some neither."""
    inputs = classification_inputs(NUM_EXAMPLES, seed=11)
    live = classifier.expected(inputs, SIGNATURE_LIVE).argmax(axis=1)
    ema = classifier.expected(inputs, SIGNATURE_EMA).argmax(axis=1)
    labels = np.where(np.arange(NUM_EXAMPLES) % 4 == 0, live, ema)
    labels = np.where(np.arange(NUM_EXAMPLES) % 9 == 0, (ema + 1) % 3, labels)
    return inputs, labels


def test_classification_statistics_match_an_independent_computation(client, classifier, labelled) -> None:
    inputs, labels = labelled
    report = compare(client, classifier.name, {"inputs": inputs}, labels=labels, options=CompareOptions(batch_size=64))

    live_scores, ema_scores = (classifier.expected(inputs, arm) for arm in (SIGNATURE_LIVE, SIGNATURE_EMA))
    live, ema = live_scores.argmax(axis=1), ema_scores.argmax(axis=1)
    live_right, ema_right = live == labels, ema == labels
    b, c = int(np.sum(live_right & ~ema_right)), int(np.sum(ema_right & ~live_right))
    assert b > 0 and c > 0  # the data really exercise the discordant pairs
    differences = ema_right.astype(float) - live_right.astype(float)
    half_width = 1.959964 * differences.std() / math.sqrt(NUM_EXAMPLES)

    assert (report.baseline, report.candidate, report.task, report.output) == (
        SIGNATURE_LIVE, SIGNATURE_EMA, "classification", "output_0")  # fmt: skip
    assert report.num_examples == report.num_paired == NUM_EXAMPLES and report.model_version == 1
    for arm, right in ((SIGNATURE_LIVE, live_right), (SIGNATURE_EMA, ema_right)):
        assert report.arms[arm].n == NUM_EXAMPLES and report.arms[arm].errors == 0
        assert report.arms[arm].num_requests == math.ceil(NUM_EXAMPLES / 64)
        assert report.arms[arm].accuracy == pytest.approx(right.mean())
        latency = report.arms[arm].latency_ms
        assert 0 < latency.p50 <= latency.p90 <= latency.p99
    assert report.agreement == pytest.approx(np.mean(live == ema))
    assert report.flip_rate == pytest.approx(np.mean(live != ema))
    assert report.discordant == {"serve_live_only_correct": b, "serve_ema_only_correct": c}
    assert report.mcnemar_p == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
    assert report.accuracy_diff.estimate == pytest.approx(ema_right.mean() - live_right.mean())
    assert (report.accuracy_diff.low, report.accuracy_diff.high) == pytest.approx(
        (differences.mean() - half_width, differences.mean() + half_width), rel=1e-5)  # fmt: skip
    assert report.mean_abs_diff == pytest.approx(np.abs(ema_scores - live_scores).mean(), rel=1e-5)
    assert report.max_abs_diff == pytest.approx(np.abs(ema_scores - live_scores).max(), rel=1e-5)


def test_the_json_document_has_the_documented_keys(client, classifier, labelled) -> None:
    inputs, labels = labelled
    document = compare(client, classifier.name, {"inputs": inputs}, labels=labels).to_dict()
    for arm in (SIGNATURE_LIVE, SIGNATURE_EMA):
        assert {"n", "errors", "accuracy", "latency_ms"} <= set(document["arms"][arm])
        assert set(document["arms"][arm]["latency_ms"]) >= {"p50", "p90", "p99"}
    assert {"agreement", "mcnemar_p", "accuracy_diff"} <= set(document)
    assert len(document["accuracy_diff"]["ci95"]) == 2 and "estimate" in document["accuracy_diff"]


def test_without_labels_only_the_arms_are_compared(client, classifier, labelled) -> None:
    inputs, _ = labelled
    report = compare(client, classifier.name, {"inputs": inputs})
    live = classifier.expected(inputs, SIGNATURE_LIVE).argmax(axis=1)
    ema = classifier.expected(inputs, SIGNATURE_EMA).argmax(axis=1)
    assert report.agreement == pytest.approx(np.mean(live == ema))
    assert report.mcnemar_p is None and report.accuracy_diff is None and report.arms[SIGNATURE_EMA].accuracy is None


def test_regression_errors_and_paired_intervals(regressor) -> None:
    generator = np.random.default_rng(2)
    inputs = generator.normal(size=(400, 4)).astype(np.float32)
    targets = (inputs @ np.array([[0.5], [-1.0], [0.3], [1.9]]) + generator.normal(0, 0.3, (400, 1))).ravel()
    with ServingClient(regressor.target) as client:
        report = compare(client, regressor.name, {"inputs": inputs}, labels=targets)

    errors = {arm: regressor.expected(inputs, arm).ravel() - targets for arm in (SIGNATURE_LIVE, SIGNATURE_EMA)}
    assert report.task == "regression" and report.agreement is None and report.mcnemar_p is None
    for arm, error in errors.items():
        assert report.arms[arm].mae == pytest.approx(np.abs(error).mean(), rel=1e-5)
        assert report.arms[arm].mse == pytest.approx((error**2).mean(), rel=1e-5)
    for interval, loss in ((report.mae_diff, np.abs), (report.mse_diff, np.square)):
        differences = loss(errors[SIGNATURE_EMA]) - loss(errors[SIGNATURE_LIVE])
        half_width = 1.959964 * differences.std() / math.sqrt(differences.size)
        assert interval.estimate == pytest.approx(differences.mean(), rel=1e-4)
        assert interval.low == pytest.approx(differences.mean() - half_width, rel=1e-4)
        assert interval.high == pytest.approx(differences.mean() + half_width, rel=1e-4)


def test_transient_failures_are_counted_and_the_rest_is_paired(fake_server, labelled) -> None:
    # The fake answers like the classifier, but every 3rd serve_ema request fails (RESOURCE_EXHAUSTED, not retried).
    fake_server.behaviour.fail_every[SIGNATURE_EMA] = (3, grpc.StatusCode.RESOURCE_EXHAUSTED)
    inputs, labels = labelled
    with ServingClient(fake_server.target) as client:
        # One batch in flight, so the server sees the batches in order and fails exactly the 3rd and the 6th.
        options = CompareOptions(batch_size=50, max_in_flight_batches=1, version=1)  # the fake has no metadata
        report = compare(client, "model", {"inputs": inputs}, labels=labels, options=options)
    answered = np.repeat([(index + 1) % 3 != 0 for index in range(6)], 50)  # batches 3 and 6 fail for EMA
    assert report.arms[SIGNATURE_EMA].errors == 2 and report.arms[SIGNATURE_EMA].n == 200
    assert report.arms[SIGNATURE_LIVE].errors == 0 and report.arms[SIGNATURE_LIVE].n == 300
    assert "RESOURCE_EXHAUSTED" in report.arms[SIGNATURE_EMA].first_error
    weights = fake_server.behaviour.weights
    live = (inputs[answered] @ weights[SIGNATURE_LIVE][0] + weights[SIGNATURE_LIVE][1]).argmax(axis=1)
    ema = (inputs[answered] @ weights[SIGNATURE_EMA][0] + weights[SIGNATURE_EMA][1]).argmax(axis=1)
    assert report.num_paired == 200
    assert report.agreement == pytest.approx(np.mean(live == ema))
    assert report.arms[SIGNATURE_EMA].accuracy == pytest.approx(np.mean(ema == labels[answered]))


def test_unknown_model_or_signature_stops_the_comparison_at_once(client, classifier, labelled) -> None:
    inputs = {"inputs": labelled[0]}
    with pytest.raises(ModelNotFoundError):
        compare(client, "no-such-model", inputs)
    with pytest.raises(SignatureNotFoundError):
        compare(client, classifier.name, inputs, options=CompareOptions(arms=(SIGNATURE_LIVE, "serve_nothing")))
    with pytest.raises(DataError, match="no output 'logits'"):
        compare(client, classifier.name, inputs, options=CompareOptions(output="logits"))


# ------------------------------------------------------------------------------------------------------- input files
@pytest.fixture(scope="module")
def signature(client, classifier):
    return client.metadata(classifier.name).signature(SIGNATURE_EMA)


def test_npz_inputs_are_cast_to_the_signature_dtype(tmp_path, signature) -> None:
    inputs = np.arange(20.0).reshape(5, 4)  # float64, as np.savez writes by default
    np.savez(tmp_path / "data.npz", inputs=inputs, labels=np.arange(5) % 3)
    dataset = load_dataset(tmp_path / "data.npz", signature, labels_key="labels")
    assert dataset.inputs["inputs"].dtype == np.float32 and dataset.num_examples == 5
    np.testing.assert_array_equal(dataset.inputs["inputs"], inputs.astype(np.float32))
    np.testing.assert_array_equal(dataset.labels, np.arange(5) % 3)


@pytest.mark.parametrize(("save", "mapped"), [(np.savez, True), (np.savez_compressed, False)])
def test_npz_members_are_memory_mapped_when_numpy_stored_them(tmp_path, signature, save, mapped) -> None:
    inputs = np.arange(40.0).reshape(10, 4)
    save(tmp_path / "data.npz", inputs=inputs, labels=np.arange(10) % 3)
    source = open_data([str(tmp_path / "data.npz")], signature, DataOptions(labels_key="labels", shard=Shard(1, 3)))
    assert isinstance(source.inputs["inputs"], np.memmap) == mapped and isinstance(source.labels, np.memmap) == mapped
    batches = list(source.batches(2))
    assert [batch.rows.tolist() for batch in batches] == [[1, 4], [7]]
    assert batches[0].inputs["inputs"].dtype == np.float32  # cast batch by batch, the file stays mapped
    np.testing.assert_array_equal(batches[0].inputs["inputs"], inputs[[1, 4]].astype(np.float32))
    np.testing.assert_array_equal(batches[1].labels, [1])


def test_npy_fills_the_only_input(tmp_path, signature) -> None:
    np.save(tmp_path / "data.npy", np.ones((3, 4), np.float32))
    assert load_dataset(tmp_path / "data.npy", signature).inputs["inputs"].shape == (3, 4)


def test_every_problem_of_an_input_file_is_reported_at_once(tmp_path, signature) -> None:
    np.savez(tmp_path / "bad.npz", image=np.ones((3, 4)), inputs=np.ones((3, 5)), y=np.ones(2))
    with pytest.raises(DataError) as raised:
        load_dataset(tmp_path / "bad.npz", signature, labels_key="y")
    message = str(raised.value)
    for expected in ("unexpected arrays ['image']", "'inputs' has shape [3, 5]", "first (batch) dimension",
                     "Received: ['image', 'inputs', 'y']"):  # fmt: skip
        assert expected in message
    np.savez(tmp_path / "missing.npz", x=np.ones((3, 4)))
    with pytest.raises(DataError, match=r"missing inputs \['inputs'\].*--labels KEY"):
        load_dataset(tmp_path / "missing.npz", signature)
    with pytest.raises(DataError, match=r"no labels array 'labels'"):
        load_dataset(tmp_path / "missing.npz", signature, labels_key="labels")


def test_unreadable_files_are_data_errors(tmp_path, signature) -> None:
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(DataError, match="--data"):
        load_dataset(tmp_path / "text.npz", signature)


def test_a_comparison_with_no_answer_from_an_arm_says_so(fake_server, labelled) -> None:
    fake_server.behaviour.fail_every[SIGNATURE_LIVE] = (1, grpc.StatusCode.RESOURCE_EXHAUSTED)
    with ServingClient(fake_server.target) as client:
        with pytest.raises(ServingError, match="No example was answered by both arms"):
            compare(client, "model", {"inputs": labelled[0][:10]}, options=CompareOptions(version=1))
