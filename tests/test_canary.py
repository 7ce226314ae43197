"""The canary procedure (`serving.canary`, `ema-serving canary`) walked on the local server, which applies TF Serving's
label rules: a label may only name an AVAILABLE version, and labels are checked before a new config loads anything.

The server polls the config file every 0.1 s, as ``tensorflow_model_server --model_config_file_poll_wait_seconds``
does every N seconds; versions 1 and 2 of the seed model are on disk (version 2's weights are doubled, so an answer
tells which version served it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tensorflow_serving.apis import model_management_pb2

from serving import ServingClient
from serving.canary import (
    CanaryError,
    CanaryRequest,
    promote_canary,
    read_config,
    rollback_canary,
    start_canary,
    with_policy_and_labels,
    write_config_atomically,
)
from serving.cli import main
from serving.config import parse_model_server_config
from serving.server import start_server
from support.rpc import MODEL_NAME, connect, rpc_error, sample_inputs
from support.served import SeedLibrary, expected_output, publish_version, write_config

pytestmark = pytest.mark.slow  # serves exports of the seed model (exported once per session)

CONFIG_POLL_S = 0.1
ONE_STEP_EDIT_LABELS = {"stable": 1, "canary": 2}
NOT_AVAILABLE = "Request to assign label to version 2 of model model, which is not currently available for inference"


@pytest.fixture
def served(seed_library: SeedLibrary, tmp_path: Path):
    """A server reading ``models.config`` (policy specific {1}) with versions 1 and 2 on disk, and a client."""
    base_path = tmp_path / "models"
    for version in (1, 2):
        publish_version(seed_library, base_path, version)
    config = write_config(tmp_path / "models.config",
                          [{"name": MODEL_NAME, "base_path": base_path, "policy": "specific { versions: 1 }"}])
    config.write_text("# Header comment kept across rewrites.\n" + config.read_text())
    # One load attempt (--max_num_load_retries=0): with TF Serving's default of 5 retries a minute apart, a broken
    # canary stays LOADING for minutes before its error shows, there as here.
    with start_server(model_config_file=config, port=0, file_system_poll_wait_seconds=CONFIG_POLL_S,
                      model_config_file_poll_wait_seconds=CONFIG_POLL_S, max_num_load_retries=0) as server, \
            ServingClient(f"127.0.0.1:{server.port}", timeout=10) as client:
        yield server, client, config


def _request(config: Path, **fields) -> CanaryRequest:
    return CanaryRequest(config, MODEL_NAME, timeout_s=30, poll_interval_s=0.05, **fields)


def _states(client: ServingClient) -> dict[int, str]:
    return {status.version: status.state for status in client.status(MODEL_NAME)}


def _answer_version(client: ServingClient, label: str) -> int:
    inputs = sample_inputs()
    outputs = client.predict(MODEL_NAME, {"inputs": inputs}, version_label=label).outputs["output_0"]
    matches = [version for version in (1, 2) if np.allclose(outputs, expected_output(inputs, version), rtol=1e-6)]
    assert len(matches) == 1, f"label {label} answered with neither version's values"
    return matches[0]


# ---------------------------------------------------------------------------------- the one-step edit is refused
def test_one_step_policy_and_labels_edit_is_refused_by_a_reload_request(served):
    server, client, config = served
    edited = with_policy_and_labels(read_config(config), MODEL_NAME, (1, 2), ONE_STEP_EDIT_LABELS)
    request = model_management_pb2.ReloadConfigRequest()
    request.config.CopyFrom(edited)
    error = rpc_error(connect(server.port).model.HandleReloadConfigRequest, request)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == NOT_AVAILABLE
    assert _states(client) == {1: "AVAILABLE"}, "the refused config's policy must not have been applied"


def test_one_step_edit_of_the_polled_file_never_takes_effect(served):
    _, client, config = served
    edited = with_policy_and_labels(read_config(config), MODEL_NAME, (1, 2), ONE_STEP_EDIT_LABELS)
    write_config_atomically(config, edited)
    time.sleep(15 * CONFIG_POLL_S)  # many polls: the label check fails each time, before anything loads
    assert _states(client) == {1: "AVAILABLE"}
    with pytest.raises(Exception, match="Unrecognized servable version label: canary"):
        client.metadata(MODEL_NAME, version_label="canary")


# ---------------------------------------------------------------------------------- the procedure that works
def test_start_then_rollback_then_start_and_promote(served):
    _, client, config = served
    started = start_canary(_request(config, canary_version=2), [client])
    assert (started.stable_version, started.canary_version) == (1, 2)
    assert [step.versions for step in started.steps] == [(1, 2), (1, 2)]
    assert [dict(step.labels) for step in started.steps] == [{}, {"stable": 1, "canary": 2}]
    assert _states(client) == {1: "AVAILABLE", 2: "AVAILABLE"}
    assert (_answer_version(client, "stable"), _answer_version(client, "canary")) == (1, 2)

    rolled_back = rollback_canary(_request(config), [client])
    assert [dict(step.labels) for step in rolled_back.steps] == [{"stable": 1, "canary": 1}] * 2
    assert _states(client)[2] == "END" and _states(client)[1] == "AVAILABLE"
    assert _answer_version(client, "canary") == 1, "clients pinned to the canary label are served by stable"

    start_canary(_request(config, canary_version=2), [client])
    promoted = promote_canary(_request(config), [client])
    assert promoted.steps[-1].versions == (2,)
    assert _states(client) == {1: "END", 2: "AVAILABLE"}
    assert (_answer_version(client, "stable"), _answer_version(client, "canary")) == (2, 2)
    assert read_config(config).model_config_list.config[0].version_labels == {"stable": 2, "canary": 2}
    assert config.read_text().startswith("# Header comment kept across rewrites.\n")


def test_a_canary_that_fails_to_load_restores_the_original_file(served, tmp_path):
    _, client, config = served
    before = config.read_text()
    broken = Path(read_config(config).model_config_list.config[0].base_path) / "3"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    with pytest.raises(CanaryError, match=r"Version 3 of model model failed to load on 127\.0\.0\.1:\d+: .*restored"):
        start_canary(_request(config, canary_version=3), [client])
    assert parse_model_server_config(config.read_text()) == parse_model_server_config(before)
    assert _states(client)[1] == "AVAILABLE"


def test_a_step_that_does_not_take_effect_times_out_naming_what_is_pending(served):
    _, client, config = served
    with pytest.raises(CanaryError, match=r"did not take effect within 0\.3 s: .*reports version 7 unknown"):
        start_canary(CanaryRequest(config, MODEL_NAME, canary_version=7, timeout_s=0.3, poll_interval_s=0.05),
                     [client])


def test_rollback_without_a_canary_in_progress_says_what_to_run(served):
    _, client, config = served
    with pytest.raises(CanaryError, match="has no canary in progress.*Run `ema-serving canary start` first"):
        rollback_canary(_request(config), [client])


# ---------------------------------------------------------------------------------- the file write
def test_write_replaces_the_file_by_rename_keeping_header_and_mode(tmp_path):
    path = write_config(tmp_path / "m.config", [{"name": "m", "base_path": "/models/m"}])
    path.write_text("# about this file\n#\n" + path.read_text())
    path.chmod(0o640)
    inode = path.stat().st_ino
    config = read_config(path)
    write_config_atomically(path, with_policy_and_labels(config, "m", (4, 3), {}))
    assert path.stat().st_ino != inode, "written in place: a polling server could read half of it"
    assert path.stat().st_mode & 0o777 == 0o640
    assert path.read_text().startswith("# about this file\n#\nmodel_config_list {")
    assert list(read_config(path).model_config_list.config[0].model_version_policy.specific.versions) == [3, 4]
    assert sorted(os.listdir(tmp_path)) == ["m.config"], "no temporary file may be left behind"
    assert not config.model_config_list.config[0].model_version_policy.HasField("specific"), "input was modified"


def test_edit_of_an_unknown_model_names_the_known_ones(tmp_path):
    path = write_config(tmp_path / "m.config", [{"name": "m", "base_path": "/models/m"}])
    with pytest.raises(CanaryError, match=r"no model named 'x'.*--model with one of \['m'\]"):
        with_policy_and_labels(read_config(path), "x", (1,), {})


# ---------------------------------------------------------------------------------- the command line
def test_cli_start_and_rollback(served):
    server, client, config = served
    common = ["--config", str(config), "--model", MODEL_NAME, "--target", f"127.0.0.1:{server.port}",
              "--poll-interval", "0.05", "--timeout", "30"]
    started = CliRunner().invoke(main, ["canary", "start", "--version", "2", *common])
    assert started.exit_code == 0, started.output
    assert "start model: stable 1, canary 2" in started.output
    assert "2. label stable=1, canary=2: versions [1, 2], labels canary=2, stable=1" in started.output
    rolled_back = CliRunner().invoke(main, ["canary", "rollback", "--json", *common])
    assert rolled_back.exit_code == 0, rolled_back.output
    assert '"action": "rollback"' in rolled_back.output
    assert _states(client)[2] == "END"


def test_cli_errors_are_one_line_without_traceback(served):
    server, _, config = served
    result = CliRunner().invoke(main, ["canary", "start", "--config", str(config), "--model", "nope", "--version",
                                       "2", "--target", f"127.0.0.1:{server.port}"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("Error: The model config lists no model")
    assert "Traceback" not in result.output


def test_cli_after_write_command_failure_is_reported(served, tmp_path):
    server, _, config = served
    before = config.read_text()
    result = CliRunner().invoke(main, ["canary", "start", "--config", str(config), "--model", MODEL_NAME,
                                       "--version", "2", "--target", f"127.0.0.1:{server.port}",
                                       "--after-write", "false {}"])
    assert result.exit_code == 1 and "--after-write command 'false {}' exited with 1" in result.output
    assert config.read_text() == before, "a write the servers were not given must be undone"


@pytest.mark.parametrize("command", ["start", "promote", "rollback"])
def test_every_canary_command_has_help(command):
    result = CliRunner().invoke(main, ["canary", command, "--help"])
    assert result.exit_code == 0 and "--config" in result.output and "--target" in result.output


def test_written_config_parses_as_tf_serving_text(tmp_path):
    path = write_config(tmp_path / "m.config", [{"name": "m", "base_path": "/models/m"}])
    write_config_atomically(path, with_policy_and_labels(read_config(path), "m", (1,), {"stable": 1}))
    assert text_format.Parse(path.read_text(), type(read_config(path))()).model_config_list.config[0].name == "m"


def test_a_second_canary_while_one_is_in_progress_is_refused_before_any_write(served):
    _, client, config = served
    start_canary(_request(config, canary_version=2), [client])
    before = config.read_text()
    with pytest.raises(CanaryError, match=r"Labels \{'canary': 2\} of model model would name versions that are not "
                                          r"served \(versions \[1, 3\]\).*promote.*rollback"):
        start_canary(_request(config, canary_version=3), [client])
    assert config.read_text() == before


def test_every_address_expands_a_name_to_each_address_it_resolves_to():
    from serving.canary_cli import every_address

    assert "127.0.0.1:8500" in every_address("localhost:8500")
    assert every_address("dns:///127.0.0.1:9") == ["127.0.0.1:9"]
    assert every_address("no-such-host.invalid:8500") == ["no-such-host.invalid:8500"]
