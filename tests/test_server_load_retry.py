"""Failed loads are retried and config files re-applied on every poll, as TF Serving does, so a version copied in
slowly, or a label whose version was still loading, takes effect later instead of never.

Real servers on loopback, real version directories copied in piece by piece; intervals are a few hundred
milliseconds so each test stays short.
"""

from __future__ import annotations

import logging
import shutil
import time

import pytest
from click.testing import CliRunner
from tensorflow_serving.apis import get_model_status_pb2

from serving.cli import main as ema_serving
from serving.server import start_server
from support.fidelity import follows
from support.rpc import MODEL_NAME, connect, predict_request, sample_inputs
from support.served import publish_version, write_config

pytestmark = pytest.mark.slow  # serves exports of the seed model (exported once per session)

State = get_model_status_pb2.ModelVersionStatus.State
RETRY_MICROS = 300_000


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _state(server, version: int) -> str:
    states = dict(server.manager.version_states(MODEL_NAME))
    return State.Name(states[version].state) if version in states else "UNKNOWN"


def _copy_saved_model_only(library, base_path, version: int):
    """The first half of a slow, non-atomic ``cp -r``: the graph is there, the variables are not yet."""
    target = base_path / str(version)
    target.mkdir()
    shutil.copy(library.versions / str(version) / "saved_model.pb", target / "saved_model.pb")
    return target


@follows("A failed load is retried `--max_num_load_retries` times (default 5), `--load_retry_interval_micros` "
         "apart (default 1 min), LOADING meanwhile", "core/loader_harness.cc:74-85")
def test_version_copied_in_non_atomically_loads_once_the_copy_completes(seed_library, tmp_path):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    with start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0.1,
                      max_num_load_retries=5, load_retry_interval_micros=RETRY_MICROS) as server:
        partial = _copy_saved_model_only(seed_library, base_path, 2)
        _wait_for(lambda: (MODEL_NAME, 2) in server.manager.pending_retries())
        assert _state(server, 2) == "LOADING"
        assert server.model_versions() == {MODEL_NAME: [1]}  # the working version keeps serving meanwhile
        shutil.copytree(seed_library.versions / "2" / "variables", partial / "variables")
        shutil.copytree(seed_library.versions / "2" / "assets.extra", partial / "assets.extra")
        _wait_for(lambda: server.model_versions() == {MODEL_NAME: [2]})
        assert (_state(server, 2), _state(server, 1)) == ("AVAILABLE", "END")
        stubs = connect(server.port)
        assert stubs.prediction.Predict(predict_request(sample_inputs()), timeout=30).model_spec.version.value == 2
        stubs.channel.close()


@follows("After the last retry the version is END with the load error", "util/retrier.cc:27-52")
def test_retries_stop_after_the_last_one(seed_library, tmp_path, caplog):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    caplog.set_level(logging.INFO, logger="serving.server")
    with start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0,
                      max_num_load_retries=2, load_retry_interval_micros=50_000) as server:
        _copy_saved_model_only(seed_library, base_path, 2)
        server.poll_now()
        _wait_for(lambda: _state(server, 2) == "END")
        status = server.manager.version_states(MODEL_NAME, 2)[0][1]
        assert status.message and not server.manager.pending_retries()
        attempts = [record for record in caplog.records if "Loading model model version 2 from" in record.message]
        assert len(attempts) == 3  # the first attempt and two retries
        time.sleep(0.3)
        assert _state(server, 2) == "END" and server.model_versions() == {MODEL_NAME: [1]}


@follows("Retries stop when the version is no longer aspired", "core/basic_manager.cc:545-552")
def test_retries_stop_when_the_version_disappears(seed_library, tmp_path):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    with start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0,
                      max_num_load_retries=5, load_retry_interval_micros=60_000_000) as server:
        partial = _copy_saved_model_only(seed_library, base_path, 2)
        server.poll_now()
        assert (MODEL_NAME, 2) in server.manager.pending_retries()
        shutil.rmtree(partial)
        server.poll_now()
        assert not server.manager.pending_retries()
        assert _state(server, 2) == "END"


@follows("The model config file is re-applied on every poll: a label refused while its version was loading "
         "applies later", "model_servers/server.cc:165-180")
def test_config_file_label_applies_once_its_version_is_available(seed_library, tmp_path):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    model = {"name": MODEL_NAME, "base_path": base_path, "policy": "all {}"}
    config = write_config(tmp_path / "models.config", [model])
    with start_server(model_config_file=config, port=0, file_system_poll_wait_seconds=0,
                      model_config_file_poll_wait_seconds=0.1) as server:
        write_config(config, [{**model, "labels": {"canary": 2}}])  # version 2 is not there yet: refused
        time.sleep(0.5)
        assert server.manager.labels() == {}
        publish_version(seed_library, base_path, 2)
        server.poll_now()  # version 2 becomes AVAILABLE; the unchanged config file now applies
        _wait_for(lambda: server.manager.labels() == {MODEL_NAME: {"canary": 2}})


@pytest.mark.parametrize("flag", ["--max_num_load_retries", "--load_retry_interval_micros",
                                  "--enable_signature_method_name_check", "--enable_grpc_healthcheck_service"])
def test_serve_takes_tf_servings_flags(flag):
    result = CliRunner().invoke(ema_serving, ["serve", "--help"])
    assert result.exit_code == 0 and flag in result.output
