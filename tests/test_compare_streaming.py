"""compare as a stream: TFRecord, numpy and Python batches agree; the version is pinned; failed rows fail the run."""

from __future__ import annotations

import json
import shutil
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from serving import ServingClient
from serving.ab import CompareOptions, MixedVersionsError, PredictionWriter, compare
from serving.cli import main
from serving.protocol import ModelNotFoundError, prediction_service_pb2_grpc
from serving.server import start_server
from support.fake_server import FakeBehaviour, FakePredictionService
from support.rpc import classification_inputs

pytestmark = pytest.mark.slow  # compares the arms of exports served on loopback (exported once per session)

NUM_EXAMPLES = 150
STATISTICS = ("num_examples", "num_paired", "agreement", "flip_rate", "discordant", "mcnemar_p", "accuracy_diff",
              "mean_abs_diff", "max_abs_diff", "disagreements", "model_version", "task", "output")  # fmt: skip


def run(*arguments: str):
    return CliRunner().invoke(main, list(arguments))


def write_examples(path, inputs: np.ndarray, labels: np.ndarray, compression: str = "") -> None:
    with tf.io.TFRecordWriter(str(path), options=compression or None) as writer:
        for row, label in zip(inputs, labels):
            features = {
                "inputs": tf.train.Feature(float_list=tf.train.FloatList(value=row)),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())


@pytest.fixture(scope="module")
def labelled(classifier, tmp_path_factory):
    """The same labelled data as .npz and as two TFRecord files (plain and GZIP)."""
    inputs = classification_inputs(NUM_EXAMPLES, seed=31)
    live = classifier.expected(inputs, SIGNATURE_LIVE).argmax(axis=1)
    ema = classifier.expected(inputs, SIGNATURE_EMA).argmax(axis=1)
    labels = np.where(np.arange(NUM_EXAMPLES) % 4 == 0, live, ema)
    directory = tmp_path_factory.mktemp("streaming")
    np.savez(directory / "val.npz", inputs=inputs, label=labels)
    write_examples(directory / "val-0.tfrecord", inputs[:70], labels[:70])
    write_examples(directory / "val-1.tfrecord.gz", inputs[70:], labels[70:], "GZIP")
    return directory, inputs, labels


def test_tfrecord_npz_and_python_batches_give_the_same_report(classifier, labelled) -> None:
    directory, inputs, labels = labelled
    common = ("--target", classifier.target, "--labels", "label", "--batch-size", "32", "--json")
    from_tfrecord = run("compare", "--data", str(directory / "val-*.tfrecord*"), *common)
    from_npz = run("compare", "--data", str(directory / "val.npz"), *common)
    assert from_tfrecord.exit_code == 0 and from_npz.exit_code == 0, from_tfrecord.output + from_npz.output
    tfrecord, npz = json.loads(from_tfrecord.output), json.loads(from_npz.output)
    with ServingClient(classifier.target) as client:
        batches = ((({"inputs": inputs[start : start + 50]}, labels[start : start + 50]))
                   for start in range(0, NUM_EXAMPLES, 50))  # fmt: skip
        python = compare(client, classifier.name, batches).to_dict()
    for key in STATISTICS:
        assert tfrecord[key] == npz[key] == python[key], key
    assert tfrecord["data"]["kind"] == "tfrecord" and len(tfrecord["data"]["files"]) == 2
    for arm in (SIGNATURE_LIVE, SIGNATURE_EMA):
        right = classifier.expected(inputs, arm).argmax(axis=1) == labels
        assert tfrecord["arms"][arm]["accuracy"] == pytest.approx(right.mean())
        assert tfrecord["arms"][arm]["model_version"] == 1 and tfrecord["arms"][arm]["failed_rows"] == []
        interval = tfrecord["arms"][arm]["accuracy_interval"]
        assert interval["low"] < right.mean() < interval["high"] and interval["level"] == 0.95
    live = classifier.expected(inputs, SIGNATURE_LIVE).argmax(axis=1)
    ema = classifier.expected(inputs, SIGNATURE_EMA).argmax(axis=1)
    matrix = tfrecord["disagreements"]
    for row, baseline_class in enumerate(matrix["classes"]):
        for column, candidate_class in enumerate(matrix["classes"]):
            expected = 0 if row == column else np.sum((live == baseline_class) & (ema == candidate_class))
            assert matrix["counts"][row][column] == expected


def test_predictions_are_written_as_they_come_and_published_at_the_end(classifier, labelled, tmp_path) -> None:
    _, inputs, labels = labelled
    path = tmp_path / "predictions.jsonl"
    with ServingClient(classifier.target) as client:
        compare(client, classifier.name, {"inputs": inputs}, labels=labels, predictions=PredictionWriter(path),
                options=CompareOptions(batch_size=40))  # fmt: skip
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["row"] for line in lines] == list(range(NUM_EXAMPLES))
    np.testing.assert_allclose([line[SIGNATURE_EMA] for line in lines], classifier.expected(inputs, SIGNATURE_EMA),
                               atol=1e-5)  # fmt: skip
    assert [line["label"] for line in lines] == labels.tolist()
    assert sorted(item.name for item in tmp_path.iterdir()) == ["predictions.jsonl"]  # no partial file left


# ------------------------------------------------------------------------------------------------------ versions
@pytest.fixture
def republished(classifier, tmp_path):
    """A server of a copy of the classifier's base path, and a function that publishes version 2 and waits until
    version 1 is gone (TF Serving's default policy serves the latest version only)."""
    base = tmp_path / "models"
    shutil.copytree(classifier.base_path, base)
    with start_server(model_name=classifier.name, model_base_path=str(base), port=0,
                      file_system_poll_wait_seconds=0) as server:  # fmt: skip
        server.wait_until_available(timeout=30)
        target = f"127.0.0.1:{server.port}"

        def publish() -> None:
            shutil.copytree(base / "1", base / "tmp-2")
            (base / "tmp-2").rename(base / "2")
            server.poll_now()
            with ServingClient(target) as client:
                deadline = time.monotonic() + 30
                while [v.version for v in client.status(classifier.name) if v.state == "AVAILABLE"] != [2]:
                    assert time.monotonic() < deadline, "version 2 did not replace version 1"
                    time.sleep(0.05)

        yield target, publish


def batches_publishing_midway(inputs: np.ndarray, publish):
    yield {"inputs": inputs[:50]}
    publish()
    yield {"inputs": inputs[50:100]}


def test_the_version_is_pinned_and_its_disappearance_stops_the_run(classifier, labelled, republished) -> None:
    target, publish = republished
    options = CompareOptions(batch_size=50, max_in_flight_batches=1)
    with ServingClient(target) as client:
        with pytest.raises(ModelNotFoundError, match="Version 1 of model .* pinned when the comparison started"):
            compare(client, classifier.name, batches_publishing_midway(labelled[1], publish), options=options)


def test_unpinned_answers_from_two_versions_are_refused(classifier, labelled, republished) -> None:
    target, publish = republished
    options = CompareOptions(batch_size=50, max_in_flight_batches=1, pin_version=False)
    with ServingClient(target) as client:
        with pytest.raises(MixedVersionsError, match=r"versions \[1, 2\]"):
            compare(client, classifier.name, batches_publishing_midway(labelled[1], publish), options=options)


# ------------------------------------------------------------------------------------------------- failed rows
class FlakyService(FakePredictionService):
    """The fake's scripted failures, plus the real classifier's metadata (the CLI reads it first)."""

    def __init__(self, behaviour: FakeBehaviour, real_target: str) -> None:
        super().__init__(behaviour)
        self.real = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(real_target))

    def GetModelMetadata(self, request, context):  # noqa: N802 - gRPC method name
        return self.real.GetModelMetadata(request)


@pytest.fixture
def flaky(classifier):
    behaviour = FakeBehaviour(fail_every={SIGNATURE_EMA: (3, grpc.StatusCode.RESOURCE_EXHAUSTED)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(FlakyService(behaviour, classifier.target),
                                                                        server)  # fmt: skip
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_failed_rows_make_the_exit_status_non_zero_and_are_named(flaky, labelled) -> None:
    directory, _, _ = labelled
    arguments = ("compare", "--target", flaky, "--data", str(directory / "val.npz"), "--labels", "label",
                 "--batch-size", "50", "--in-flight", "1", "--json")  # fmt: skip
    result = run(*arguments)
    assert result.exit_code == 5, result.output
    # Batches 3 of 3 fail for serve_ema (every 3rd call): rows 100..149.
    assert "50 of 150 rows (33.33%) were not answered by both arms" in result.output
    assert "serve_ema rows 100..149 (" in result.output and "--max-failure-rate" in result.output
    document = json.loads(result.output[: result.output.rindex("}") + 1])
    assert document["arms"][SIGNATURE_EMA]["failed_rows"] == [[100, 150, 1]] and document["num_failed_rows"] == 50
    allowed = run(*arguments, "--max-failure-rate", "0.4")
    assert allowed.exit_code == 0, allowed.output
