"""Versions come and go while the server runs: hot loading, version policies, labels, warmup, start-up errors and
graceful shutdown. Each test runs its own server on its own copy of the ema-export versions."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2, prediction_log_pb2

import ema_export
from ema_export.names import ASSETS_EXTRA_DIR, SIGNATURE_LIVE, WARMUP_FILENAME
from serving.config import ModelConfigError
from serving.server import ModelLoadError, ModelPathError, ServerStartError, servable as servable_module, start_server
from support.models import LinearModule
from support.rpc import MODEL_NAME, connect, output_of, predict_request, rpc_error, sample_inputs
from support.served import SeedLibrary, expected_output, publish_version, write_config

pytestmark = pytest.mark.slow  # serves exports of the seed model (exported once per session)

StatusCode = grpc.StatusCode
State = get_model_status_pb2.ModelVersionStatus.State


def _states(stubs, name: str = MODEL_NAME) -> dict[int, str]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    response = stubs.model.GetModelStatus(request, timeout=30)
    return {status.version: State.Name(status.state) for status in response.model_version_status}


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _reload(stubs, models: list[dict]) -> None:
    request = model_management_pb2.ReloadConfigRequest()
    request.config.model_config_list.SetInParent()
    for model in models:
        config = request.config.model_config_list.config.add(
            name=model["name"], base_path=str(model["base_path"]), model_platform="tensorflow"
        )
        if "policy" in model:
            getattr(config.model_version_policy, model["policy"]).SetInParent()
        for label, version in model.get("labels", {}).items():
            config.version_labels[label] = version
    response = stubs.model.HandleReloadConfigRequest(request, timeout=60)
    assert response.status.error_code == 0


# ---------------------------------------------------------------------------------------------- hot loading


def test_new_version_hot_loads_while_requests_run(seed_library: SeedLibrary, tmp_path):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    answers: list[tuple[int, bool]] = []
    errors: list[str] = []
    stop = threading.Event()

    with start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0.1) as server:
        stubs = connect(server.port)

        def client(seed: int) -> None:
            inputs = sample_inputs(batch=2, seed=seed)
            while not stop.is_set():
                try:
                    response = stubs.prediction.Predict(predict_request(inputs), timeout=30)
                except grpc.RpcError as error:
                    errors.append(f"{error.code()}: {error.details()}")
                    continue
                version = response.model_spec.version.value
                answers.append((version, np.allclose(output_of(response), expected_output(inputs, version),
                                                     rtol=1e-5, atol=1e-6)))

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        try:
            _wait_for(lambda: len(answers) > 20)
            # The real exporter, writing into the watched directory: a temporary name, then a rename.
            ema_export.export(seed_library.checkpoints[2], base_path, model=LinearModule, version=2)
            _wait_for(lambda: any(version == 2 for version, _ in answers[-5:]))
            count = len(answers)
            _wait_for(lambda: len(answers) > count + 20)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert not errors
        assert all(correct for _, correct in answers)
        assert {version for version, _ in answers} == {1, 2}
        _wait_for(lambda: _states(stubs) == {2: "AVAILABLE", 1: "END"})
        stubs.channel.close()


def test_only_numeric_version_directories_are_served(seed_library, tmp_path):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    shutil.copytree(seed_library.versions / "2", base_path / "temp-export-12345")  # a complete but unpublished copy
    (base_path / "README").write_text("notes")
    (base_path / "3").write_text("a file, not a directory")
    # TF Serving lists every child whose name parses as an int64, files too: the latest version is this file, which
    # fails to load, so the model never becomes available (file_system_storage_path_source.cc 87-89, 118-134).
    with pytest.raises(ModelLoadError, match="version 3"):
        start_server(model_base_path=base_path, port=0, max_num_load_retries=0)
    (base_path / "3").unlink()
    with start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0) as server:
        assert server.model_versions() == {MODEL_NAME: [1]}


def test_broken_version_fails_alone_and_is_retried_after_it_is_replaced(seed_library, tmp_path):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    # One attempt per load (TF Serving's --max_num_load_retries=0); tests/test_server_load_retry.py covers retries.
    with start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0,
                      max_num_load_retries=0) as server:
        stubs = connect(server.port)
        broken = base_path / "2"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"this is not a SavedModel")
        server.poll_now()
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = MODEL_NAME
        request.model_spec.version.value = 2
        status = stubs.model.GetModelStatus(request, timeout=30).model_version_status[0]
        assert State.Name(status.state) == "END"
        assert status.status.error_code != 0 and "saved_model.pb" in status.status.error_message
        response = stubs.prediction.Predict(predict_request(sample_inputs()), timeout=30)
        assert response.model_spec.version.value == 1  # the working version kept serving

        shutil.rmtree(broken)
        server.poll_now()  # the broken version vanished: it may be retried when it comes back
        publish_version(seed_library, base_path, 2)
        server.poll_now()
        assert _states(stubs) == {2: "AVAILABLE", 1: "END"}
        stubs.channel.close()


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("", [3]), ("latest { num_versions: 2 }", [2, 3]), ("all {}", [1, 2, 3]), ("specific { versions: 1 }", [1])],
)
def test_version_policies(seed_library, tmp_path, policy, expected):
    base_path = tmp_path / "models"
    for version in (1, 2):
        publish_version(seed_library, base_path, version)
    publish_version(seed_library, base_path, 1, as_version=3)
    model = {"name": MODEL_NAME, "base_path": base_path}
    if policy:
        model["policy"] = policy
    config = write_config(tmp_path / "models.config", [model])
    with start_server(model_config_file=config, port=0, file_system_poll_wait_seconds=0) as server:
        assert server.model_versions() == {MODEL_NAME: expected}


# --------------------------------------------------------------------------------------- labels and reloads


def test_labels_are_added_moved_and_checked_by_config_reload(seed_library, tmp_path):
    base_path = tmp_path / "models"
    for version in (1, 2):
        publish_version(seed_library, base_path, version)
    model = {"name": MODEL_NAME, "base_path": base_path, "policy": "all"}
    config = write_config(tmp_path / "models.config", [{**model, "policy": "all {}"}])
    with start_server(model_config_file=config, port=0, file_system_poll_wait_seconds=0) as server:
        stubs = connect(server.port)
        inputs = sample_inputs()
        assert rpc_error(stubs.prediction.Predict, predict_request(inputs, label="stable")).code() == (
            StatusCode.INVALID_ARGUMENT
        )
        _reload(stubs, [{**model, "labels": {"stable": 1, "canary": 2}}])
        for label, version in (("stable", 1), ("canary", 2)):
            response = stubs.prediction.Predict(predict_request(inputs, label=label, signature=SIGNATURE_LIVE),
                                                timeout=30)
            assert response.model_spec.version.value == version
            np.testing.assert_allclose(output_of(response), expected_output(inputs, version, SIGNATURE_LIVE),
                                       rtol=1e-5)
        request = model_management_pb2.ReloadConfigRequest()
        request.config.model_config_list.config.add(name=MODEL_NAME, base_path=str(base_path),
                                                    model_platform="tensorflow").version_labels["canary"] = 3
        error = rpc_error(stubs.model.HandleReloadConfigRequest, request)
        assert error.code() == StatusCode.FAILED_PRECONDITION
        assert "Request to assign label to version 3 of model model" in error.details()
        assert stubs.prediction.Predict(predict_request(inputs, label="canary"), timeout=30)  # unchanged

        request.config.model_config_list.config[0].base_path = "relative/models"
        error = rpc_error(stubs.model.HandleReloadConfigRequest, request)
        assert error.code() == StatusCode.INVALID_ARGUMENT and "base_path must be absolute" in error.details()

        _reload(stubs, [])  # a config without the model unloads it
        assert rpc_error(stubs.prediction.Predict, predict_request(inputs)).code() == StatusCode.NOT_FOUND
        assert set(_states(stubs).values()) == {"END"}
        stubs.channel.close()


def test_start_up_labels_need_the_allow_flag_as_in_tf_serving(seed_library, tmp_path):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    config = write_config(tmp_path / "models.config",
                          [{"name": MODEL_NAME, "base_path": base_path, "labels": {"stable": 1}}])
    with pytest.raises(ServerStartError, match="allow-version-labels-for-unavailable-models"):
        start_server(model_config_file=config, port=0)
    with start_server(model_config_file=config, port=0, allow_version_labels_for_unavailable_models=True) as server:
        assert server.manager.labels() == {MODEL_NAME: {"stable": 1}}


def test_changed_config_file_is_applied_when_polled(seed_library, tmp_path):
    base_path = tmp_path / "models"
    for version in (1, 2):
        publish_version(seed_library, base_path, version)
    model = {"name": MODEL_NAME, "base_path": base_path, "policy": "all {}"}
    config = write_config(tmp_path / "models.config", [model])
    with start_server(model_config_file=config, port=0, file_system_poll_wait_seconds=0,
                      model_config_file_poll_wait_seconds=0.1) as server:
        write_config(config, [{**model, "labels": {"stable": 1}}])
        _wait_for(lambda: server.manager.labels() == {MODEL_NAME: {"stable": 1}})


# ------------------------------------------------------------------------------------------------------ warmup


def _write_warmup(version_dir, records: list[bytes]) -> None:
    path = version_dir / ASSETS_EXTRA_DIR / WARMUP_FILENAME
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


def test_warmup_records_are_replayed_when_a_version_loads(seed_library, tmp_path):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    with start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0) as server:
        servable = server.manager.get_servable(predict_request().model_spec)
        assert servable.num_warmup_records >= 1  # ema-export writes one record per arm


def test_failing_warmup_fails_the_load_unless_warmup_is_off(seed_library, tmp_path):
    base_path = tmp_path / "models"
    version_dir = publish_version(seed_library, base_path, 1)
    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.CopyFrom(predict_request(sample_inputs(), signature="missing_signature"))
    _write_warmup(version_dir, [log.SerializeToString()])
    with pytest.raises(ModelLoadError, match="Warmup request 1 .*missing_signature"):
        start_server(model_base_path=base_path, port=0)
    (version_dir / ASSETS_EXTRA_DIR / WARMUP_FILENAME).write_bytes(b"not a TFRecord file at all")
    with pytest.raises(ModelLoadError, match="TFRecord"):
        start_server(model_base_path=base_path, port=0)
    with start_server(model_base_path=base_path, port=0, enable_model_warmup=False) as server:
        assert server.model_versions() == {MODEL_NAME: [1]}


# ----------------------------------------------------------------------------------------- start-up and stop


def test_missing_or_empty_base_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelPathError, match="does not exist"):
        start_server(model_base_path=tmp_path / "nowhere", port=0)
    (tmp_path / "empty" / "temp-export").mkdir(parents=True)
    with pytest.raises(ModelPathError, match="no numeric version directory"):
        start_server(model_base_path=tmp_path / "empty", port=0)


def test_contradictory_or_missing_options_are_rejected(tmp_path):
    with pytest.raises(ServerStartError, match="exclusive"):
        start_server(model_base_path=tmp_path, model_config_file=tmp_path / "models.config")
    with pytest.raises(ServerStartError, match="No model to serve"):
        start_server()
    (tmp_path / "models.config").write_text('model_config_list { config { name: "m" base_path: "/x" } }')
    with pytest.raises(ModelConfigError, match="model_platform is missing"):
        start_server(model_config_file=tmp_path / "models.config")


def test_port_in_use_is_a_clear_error(seed_library, tmp_path):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    with (
        start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0) as first,
        pytest.raises(ServerStartError, match="Could not bind the gRPC port"),
    ):
        start_server(model_base_path=base_path, port=first.port, file_system_poll_wait_seconds=0)


def test_stop_lets_in_flight_requests_finish_then_refuses_new_ones(seed_library, tmp_path, monkeypatch):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    entered = threading.Event()
    original_run = servable_module.Signature.run

    def slow_run(self, arrays, output_filter=()):
        entered.set()
        time.sleep(0.5)  # a slow model: the request is in flight when stop() is called
        return original_run(self, arrays, output_filter)

    server = start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0)
    stubs = connect(server.port)
    monkeypatch.setattr(servable_module.Signature, "run", slow_run)
    outcome: list[object] = []
    inputs = sample_inputs()
    worker = threading.Thread(
        target=lambda: outcome.append(stubs.prediction.Predict(predict_request(inputs), timeout=30))
    )
    worker.start()
    assert entered.wait(10)
    started = time.monotonic()
    server.stop(grace=5.0)
    assert time.monotonic() - started < 5.0
    worker.join(10)
    np.testing.assert_allclose(output_of(outcome[0]), expected_output(inputs), rtol=1e-5)
    assert rpc_error(stubs.prediction.Predict, predict_request(inputs)).code() == StatusCode.UNAVAILABLE
    server.stop()  # a second stop is harmless
    stubs.channel.close()
