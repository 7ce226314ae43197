"""Graceful shutdown of a real `ema-serving serve` under load: on SIGTERM every admitted call gets its answer, new
calls get UNAVAILABLE (which clients retry elsewhere), health turns NOT_SERVING, and no call is CANCELLED."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.server import servable as servable_module, start_server
from support.rpc import connect, predict_request, sample_inputs
from support.served import publish_version
from support.serving_process import serve_process

pytestmark = pytest.mark.slow  # serves exports

StatusCode = grpc.StatusCode
NUM_CLIENTS = 8
NUM_RUNS = 5
GRACE_SECONDS = 5.0
BATCH = 20_000  # rows per request: enough work that calls are inside the server when SIGTERM lands


@dataclass(frozen=True)
class Outcome:
    client: int
    started: float
    ended: float
    code: grpc.StatusCode


def _client(port: int, index: int, outcomes: list[Outcome], running: threading.Event) -> None:
    """Send requests back to back; stop at the first refusal, as a client sent elsewhere would."""
    stubs = connect(port)
    request = predict_request(sample_inputs(batch=BATCH, seed=index))
    try:
        while True:
            started = time.monotonic()
            try:
                stubs.prediction.Predict(request, timeout=30)
                code = StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
            outcomes.append(Outcome(index, started, time.monotonic(), code))
            running.set()
            if code != StatusCode.OK:
                return
    finally:
        stubs.channel.close()


def _probe(port: int, statuses: list[str], done: threading.Event) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    while not done.is_set():
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service="PredictionService"),
                                  timeout=5)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        except grpc.RpcError as error:
            status = error.code().name
        if not statuses or statuses[-1] != status:
            statuses.append(status)
        if status != "SERVING" and status != "NOT_SERVING":
            break
        time.sleep(0.01)
    channel.close()


def _stop_under_load(port: int, stop) -> tuple[list[Outcome], list[str], float, float]:
    """Run NUM_CLIENTS clients and a health probe against ``port``, call ``stop()`` mid-load, collect what each saw."""
    outcomes: list[Outcome] = []
    health: list[str] = []
    running = threading.Event()
    done = threading.Event()
    clients = [threading.Thread(target=_client, args=(port, index, outcomes, running)) for index in range(NUM_CLIENTS)]
    probe = threading.Thread(target=_probe, args=(port, health, done))
    for thread in [*clients, probe]:
        thread.start()
    assert running.wait(30)
    time.sleep(0.3)
    signalled = time.monotonic()
    stop()
    stopped = time.monotonic()
    for thread in clients:
        thread.join(30)
    done.set()
    probe.join(30)
    return list(outcomes), health, signalled, stopped


def _check_run(outcomes: list[Outcome], health: list[str], signalled: float) -> int:
    """Assert what every client saw; return how many calls in flight at the stop were answered OK."""
    codes = [outcome.code for outcome in outcomes]
    assert set(codes) <= {StatusCode.OK, StatusCode.UNAVAILABLE}, codes  # no CANCELLED, no other error
    for client in range(NUM_CLIENTS):  # every client finished, told UNAVAILABLE, nothing left hanging
        mine = [outcome for outcome in outcomes if outcome.client == client]
        assert mine and mine[-1].code == StatusCode.UNAVAILABLE
    in_flight = [outcome for outcome in outcomes if outcome.started < signalled < outcome.ended]
    assert len(in_flight) == NUM_CLIENTS  # each client had one call out when the stop began
    assert health[0] == "SERVING" and "NOT_SERVING" in health, health
    return sum(outcome.code == StatusCode.OK for outcome in in_flight)


def test_sigterm_answers_every_admitted_call_and_refuses_new_ones(seed_library, tmp_path):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    with serve_process(base_path, f"--grace-period={GRACE_SECONDS}", "--enable_grpc_healthcheck_service") as server:
        stopped: list[str] = []
        outcomes, health, signalled, exited = _stop_under_load(
            server.port, lambda: stopped.append(server.terminate(timeout=GRACE_SECONDS + 30)[0])
        )
        assert server.process.returncode == 0 and "Stopped." in stopped[0]
    assert exited - signalled < GRACE_SECONDS + 3.0  # stop, then the interpreter's exit
    _check_run(outcomes, health, signalled)


def test_repeated_stops_under_load_cancel_nothing(seed_library, tmp_path):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    in_flight_answered_ok = 0
    for _ in range(NUM_RUNS):
        server = start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0,
                              enable_grpc_healthcheck_service=True)
        outcomes, health, signalled, stopped = _stop_under_load(
            server.port, lambda server=server: server.stop(GRACE_SECONDS)
        )
        assert stopped - signalled < GRACE_SECONDS
        in_flight_answered_ok += _check_run(outcomes, health, signalled)
    # Calls the server already held were drained to their answers, not cut off.
    assert in_flight_answered_ok > 0


def test_call_abandoned_while_queued_does_not_hold_the_stop(seed_library, tmp_path, monkeypatch):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    entered = threading.Event()
    original_run = servable_module.Signature.run

    def slow_run(self, arrays, output_filter=()):
        entered.set()
        time.sleep(0.5)  # holds the only worker while a second call waits in the queue
        return original_run(self, arrays, output_filter)

    server = start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0, grpc_max_threads=1,
                          enable_model_warmup=False)
    monkeypatch.setattr(servable_module.Signature, "run", slow_run)
    stubs = connect(server.port)
    request = predict_request(sample_inputs())
    first = threading.Thread(target=lambda: stubs.prediction.Predict(request, timeout=30))
    first.start()
    assert entered.wait(10)
    with pytest.raises(grpc.RpcError) as abandoned:
        stubs.prediction.Predict(request, timeout=0.1)  # gives up while queued: gRPC never runs its handler
    first.join(10)
    started = time.monotonic()
    server.stop(GRACE_SECONDS)
    assert time.monotonic() - started < GRACE_SECONDS / 2
    assert abandoned.value.code() == StatusCode.DEADLINE_EXCEEDED
    stubs.channel.close()
