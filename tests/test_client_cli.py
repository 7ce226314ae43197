"""`ema-serving predict | compare | metadata | status` through CliRunner, against the local server."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from serving import client_cli
from serving.cli import main
from support.rpc import classification_inputs

pytestmark = pytest.mark.slow  # queries exports served on loopback (exported once per session)

COMMANDS = ("predict", "compare", "merge", "metadata", "status")


def run(*arguments: str):
    return CliRunner().invoke(main, list(arguments))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, classifier):
    inputs = classification_inputs(120, seed=21)
    labels = np.where(np.arange(120) % 3 == 0, classifier.expected(inputs, SIGNATURE_LIVE).argmax(axis=1),
                      classifier.expected(inputs, SIGNATURE_EMA).argmax(axis=1))  # fmt: skip
    path = tmp_path_factory.mktemp("cli") / "validation.npz"
    np.savez(path, inputs=inputs.astype(np.float64), labels=labels)  # float64 on purpose: the CLI casts it
    return path, inputs, labels


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_registered_and_has_help(command: str) -> None:
    assert main.get_command(None, command) is getattr(client_cli, command)
    result = run(command, "--help")
    assert result.exit_code == 0 and "--json" in result.output
    assert ("--target" in result.output) == (command != "merge")  # merge reads files, it talks to no server


def test_metadata_and_status_as_json(classifier) -> None:
    metadata = json.loads(run("metadata", "--target", classifier.target, "--json").output)
    assert metadata["signatures"][SIGNATURE_EMA]["inputs"]["inputs"]["shape"] == [None, 4]
    assert metadata["signatures"][SIGNATURE_LIVE]["outputs"]["output_0"]["dtype"] == "float32"
    status = json.loads(run("status", "--target", classifier.target, "--json").output)
    assert status["versions"] == [{"version": 1, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}]


def test_metadata_and_status_tables(classifier) -> None:
    table = run("metadata", "--target", classifier.target).output
    assert "serve_live input inputs float32 [None, 4]" in " ".join(table.split())
    assert "__saved_model_init_op" not in table
    assert "1 AVAILABLE OK -" in " ".join(run("status", "--target", classifier.target).output.split())


def test_round_robin_works_with_a_multi_address_target(classifier) -> None:
    # Two addresses of the same loopback server stand in for a headless Service's pods.
    port = classifier.target.rsplit(":", 1)[1]
    target = f"ipv4:127.0.0.1:{port},127.0.0.1:{port}"
    status = json.loads(run("status", "--target", target, "--round-robin", "--json").output)
    assert status["versions"][0]["state"] == "AVAILABLE"


def test_predict_prints_the_arms_outputs(classifier, data_file) -> None:
    path, inputs, _ = data_file
    # The .npz also holds labels: predict skips arrays that are not inputs.
    result = run("predict", "--target", classifier.target, "--data", str(path), "--signature", SIGNATURE_LIVE, "--json")
    document = json.loads(result.output)
    assert document["signature"] == SIGNATURE_LIVE and document["model_version"] == 1
    np.testing.assert_allclose(document["outputs"]["output_0"]["values"], classifier.expected(inputs, SIGNATURE_LIVE),
                               atol=1e-5)  # fmt: skip
    np.save(path.with_suffix(".npy"), inputs)
    table = run("predict", "--target", classifier.target, "--data", str(path.with_suffix(".npy"))).output
    assert table.startswith("serving_default (version 1") and "output_0  float32  [120, 3]" in table


def test_compare_json_has_the_documented_statistics(classifier, data_file) -> None:
    path, inputs, labels = data_file
    result = run("compare", "--target", classifier.target, "--model", classifier.name, "--data", str(path),
                 "--labels", "labels", "--batch-size", "50", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    live = classifier.expected(inputs, SIGNATURE_LIVE).argmax(axis=1) == labels
    ema = classifier.expected(inputs, SIGNATURE_EMA).argmax(axis=1) == labels
    b, c = int(np.sum(live & ~ema)), int(np.sum(ema & ~live))
    for arm, right in ((SIGNATURE_LIVE, live), (SIGNATURE_EMA, ema)):
        assert document["arms"][arm]["n"] == 120 and document["arms"][arm]["errors"] == 0
        assert document["arms"][arm]["accuracy"] == pytest.approx(right.mean())
        latency = document["arms"][arm]["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    live_classes = classifier.expected(inputs, SIGNATURE_LIVE).argmax(axis=1)
    agreement = np.mean(live_classes == classifier.expected(inputs, SIGNATURE_EMA).argmax(axis=1))
    assert document["agreement"] == pytest.approx(agreement)
    assert document["mcnemar_p"] == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue)
    differences = ema.astype(float) - live.astype(float)
    half_width = 1.959964 * differences.std() / math.sqrt(120)
    assert document["accuracy_diff"]["estimate"] == pytest.approx(differences.mean())
    assert document["accuracy_diff"]["ci95"] == pytest.approx([differences.mean() - half_width,
                                                               differences.mean() + half_width], rel=1e-5)  # fmt: skip


def test_compare_table_for_people(classifier, data_file) -> None:
    path, _, _ = data_file
    result = run("compare", "--target", classifier.target, "--data", str(path), "--labels", "labels")
    assert result.exit_code == 0, result.output
    for expected in ("arm", "serve_live", "serve_ema", "top-1 agreement", "accuracy diff", "exact McNemar p"):
        assert expected in result.output


@pytest.mark.parametrize(
    ("arguments", "exit_code", "expected"),
    [
        (("status", "--model", "no-such-model"), 4, "not served"),
        (("compare", "--signature-typo"), 2, "No such option"),
        (("compare", "--data", "{data}", "--labels", "y"), 2, "no labels array 'y' (--labels)"),
        (("compare", "--data", "{data}"), 2, "unexpected arrays ['labels'] (pass --labels KEY"),
        (("compare", "--data", "{data}", "--labels", "labels", "--candidate", "serve_nothing"), 4, "no signature"),
        (("predict", "--data", "{data}", "--version", "1", "--version-label", "stable"), 2, "not both"),
        (("compare", "--data", "{data}", "--labels", "labels", "--shard", "4/4"), 2, "Invalid shard 4/4"),
        (("compare", "--data", "no-such-*.tfrecord"), 2, "No data file matches 'no-such-*.tfrecord'"),
    ],
)
def test_errors_are_one_line_with_a_fix_and_no_traceback(classifier, data_file, arguments, exit_code, expected):
    path, _, _ = data_file
    arguments = [argument.replace("{data}", str(path)) for argument in arguments]
    result = run(arguments[0], "--target", classifier.target, *arguments[1:])
    assert result.exit_code == exit_code, result.output
    assert expected in result.output and "Traceback" not in result.output
    if exit_code != 2 or "No such option" not in expected:
        assert len(result.output.strip().splitlines()) == 1


def test_progress_goes_to_stderr_with_rows_per_second(classifier, data_file) -> None:
    path, _, _ = data_file
    result = CliRunner().invoke(main, ["compare", "--target", classifier.target, "--data", str(path), "--labels",
                                       "labels", "--progress", "--json"])  # fmt: skip
    assert result.exit_code == 0 and "rows/s" in result.stderr and "accuracy diff" in result.stderr
    assert json.loads(result.stdout)["num_paired"] == 120  # stdout stays one JSON document


def test_an_unreachable_server_is_reported_in_one_line(tmp_path) -> None:
    result = run("status", "--target", "127.0.0.1:9", "--timeout", "3")
    assert result.exit_code == 3
    assert result.output.startswith("Error: GetModelStatus(model='model') failed: the server is unreachable")
    assert "--target" in result.output and len(result.output.strip().splitlines()) == 1
