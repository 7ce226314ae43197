"""`ema-serving merge`: shards' reports merged give exactly the single-process report, and mismatches are refused."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from serving.ab import MergeError, MixedVersionsError, merge_reports
from serving.cli import main
from support.rpc import classification_inputs

pytestmark = pytest.mark.slow  # compares the arms of exports served on loopback (exported once per session)

NUM_EXAMPLES = 211  # not a multiple of the shard count or the batch size
# What legitimately differs between one process and N: timings, how many requests were made, which shards ran.
MEASURED = {"wall_time_s", "shards", "state"}
MEASURED_PER_ARM = {"latency_ms", "latency_histogram", "requests"}


def run(*arguments: str):
    return CliRunner().invoke(main, list(arguments))


def write_examples(path, inputs: np.ndarray, labels: np.ndarray) -> None:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for row, label in zip(inputs, labels):
            label_feature = (tf.train.Feature(int64_list=tf.train.Int64List(value=[label])) if labels.dtype.kind == "i"
                             else tf.train.Feature(float_list=tf.train.FloatList(value=[label])))  # fmt: skip
            features = {"inputs": tf.train.Feature(float_list=tf.train.FloatList(value=row)), "label": label_feature}
            writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())


def comparable(document: dict) -> dict:
    document = {key: value for key, value in document.items() if key not in MEASURED}
    document["arms"] = {
        name: {key: value for key, value in arm.items() if key not in MEASURED_PER_ARM}
        for name, arm in document["arms"].items()
    }
    return document


def shard_reports(target: str, model: str, data: str, num_shards: int, directory) -> list:
    paths = []
    for index in range(num_shards):
        result = run("compare", "--target", target, "--model", model, "--data", data, "--labels", "label",
                     "--batch-size", "16", "--shard", f"{index}/{num_shards}", "--json")  # fmt: skip
        assert result.exit_code == 0, result.output
        paths.append(directory / f"shard-{index}.json")
        paths[-1].write_text(result.output)
    return paths


@pytest.fixture(scope="module")
def classification_data(classifier, tmp_path_factory):
    inputs = classification_inputs(NUM_EXAMPLES, seed=41)
    live = classifier.expected(inputs, SIGNATURE_LIVE).argmax(axis=1)
    ema = classifier.expected(inputs, SIGNATURE_EMA).argmax(axis=1)
    labels = np.where(np.arange(NUM_EXAMPLES) % 3 == 0, live, ema)
    directory = tmp_path_factory.mktemp("merge")
    write_examples(directory / "val.tfrecord", inputs, labels)
    return directory


@pytest.fixture(scope="module")
def shards(classifier, classification_data):
    return shard_reports(classifier.target, classifier.name, str(classification_data / "val.tfrecord"), 3,
                         classification_data)  # fmt: skip


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_merged_shards_equal_one_process_field_by_field(kind, classifier, regressor, classification_data, shards,
                                                        tmp_path) -> None:  # fmt: skip
    if kind == "classification":
        served, data, paths = classifier, classification_data / "val.tfrecord", shards
    else:
        generator = np.random.default_rng(6)
        inputs = generator.normal(size=(NUM_EXAMPLES, 4)).astype(np.float32)
        targets = generator.normal(size=NUM_EXAMPLES).astype(np.float32)
        data = tmp_path / "targets.tfrecord"
        write_examples(data, inputs, targets)
        served, paths = regressor, shard_reports(regressor.target, regressor.name, str(data), 4, tmp_path)
    single = run("compare", "--target", served.target, "--model", served.name, "--data", str(data), "--labels",
                 "label", "--batch-size", "16", "--json")  # fmt: skip
    merged = run("merge", *map(str, paths), "--json")
    assert single.exit_code == 0 and merged.exit_code == 0, single.output + merged.output
    single_document, merged_document = json.loads(single.output), json.loads(merged.output)
    assert comparable(merged_document) == comparable(single_document)  # every statistic, bit for bit
    assert merged_document["task"] == kind and merged_document["num_paired"] == NUM_EXAMPLES
    assert [shard["index"] for shard in merged_document["shards"]] == list(range(len(paths)))
    for arm in (SIGNATURE_LIVE, SIGNATURE_EMA):  # latencies: every request of every shard is in the histogram
        requests = sum(json.loads(path.read_text())["arms"][arm]["requests"] for path in paths)
        assert sum(merged_document["arms"][arm]["latency_histogram"]["counts"]) == requests
    if kind == "regression":
        assert merged_document["mae_diff"]["estimate"] == single_document["mae_diff"]["estimate"] is not None


def test_merge_table_for_people(shards) -> None:
    result = run("merge", *map(str, shards))
    assert result.exit_code == 0 and "top-1 agreement" in result.output
    assert f"{NUM_EXAMPLES}/{NUM_EXAMPLES} examples answered by both arms" in result.output


def test_missing_or_repeated_shards_are_refused(shards) -> None:
    for chosen in (shards[:2], [*shards, shards[0]]):
        result = run("merge", *map(str, chosen))
        assert result.exit_code == 2 and "do not make up the data set exactly once" in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_shards_answered_by_different_versions_are_refused(shards) -> None:
    documents = [json.loads(path.read_text()) for path in shards]
    moved = copy.deepcopy(documents[1])  # as if this shard had started after version 2 replaced version 1
    moved["state"]["version"] = 2
    for arm in moved["state"]["arms"]:
        arm["versions"] = [2]
    with pytest.raises(MixedVersionsError, match=r"different versions \[1, 2\].*--version 2"):
        merge_reports([documents[0], moved, documents[2]])
    (shards[1].parent / "moved.json").write_text(json.dumps(moved))
    result = run("merge", str(shards[0]), str(shards[1].parent / "moved.json"), str(shards[2]))
    assert result.exit_code == 1 and "different versions" in result.output


def test_reports_of_other_comparisons_or_without_state_are_refused(shards) -> None:
    documents = [json.loads(path.read_text()) for path in shards]
    other = copy.deepcopy(documents[2])
    other["data"]["files"] = ["other.tfrecord"]
    with pytest.raises(MergeError, match=r"differ in \['data'\]"):
        merge_reports([documents[0], documents[1], other])
    stateless = {key: value for key, value in documents[0].items() if key != "state"}
    with pytest.raises(MergeError, match="no mergeable state"):
        merge_reports([stateless])
