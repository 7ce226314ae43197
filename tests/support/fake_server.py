"""A PredictionService scripted per test (failures, delays, a count of calls), and a self-signed certificate: what
the client tests need a real export cannot give them (retries, deadlines, errors, TLS).

The fake answers Predict with the seed linear model computed in numpy, so its outputs equal the `classifier`'s.
Registered once as a plugin in ``tests/conftest.py`` (fixtures `fake_server`, `self_signed_certificate`).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from serving import codec
from serving.protocol import PredictResponse, prediction_service_pb2_grpc
from support.models import EMA_B, EMA_W, LIVE_B, LIVE_W, linear_numpy


@dataclass
class FakeBehaviour:
    """What the fake server does: per-signature failures, delays, and a count of calls seen."""

    fail_first: dict[str, tuple[int, grpc.StatusCode]] = field(default_factory=dict)
    fail_every: dict[str, tuple[int, grpc.StatusCode]] = field(default_factory=dict)
    delay_s: dict[str, float] = field(default_factory=dict)
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=lambda: {"serve_live": (LIVE_W, LIVE_B), "serve_ema": (EMA_W, EMA_B)}
    )
    calls: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakePredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Answers Predict with the linear model in numpy, after the scripted failures and delays."""

    def __init__(self, behaviour: FakeBehaviour) -> None:
        self.behaviour = behaviour

    def Predict(self, request, context):  # noqa: N802 - gRPC method name
        behaviour = self.behaviour
        signature = request.model_spec.signature_name or "serving_default"
        with behaviour.lock:
            behaviour.calls[signature] = count = behaviour.calls.get(signature, 0) + 1
        first = behaviour.fail_first.get(signature)
        if first and count <= first[0]:
            context.abort(first[1], f"scripted failure {count}")
        every = behaviour.fail_every.get(signature)
        if every and count % every[0] == 0:
            context.abort(every[1], f"scripted failure {count}")
        time.sleep(behaviour.delay_s.get(signature, 0.0))
        inputs = codec.decode(request.inputs["inputs"])
        weights = behaviour.weights.get(signature, behaviour.weights["serve_ema"])
        response = PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.signature_name = signature
        response.model_spec.version.value = 1
        codec.encode(linear_numpy(inputs, *weights), out=response.outputs["output_0"], form="values")
        return response


@dataclass
class FakeServer:
    target: str
    behaviour: FakeBehaviour


def serve_fake(credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, FakeServer]:
    """Start the fake PredictionService on 127.0.0.1, port 0, with unlimited message sizes."""
    behaviour = FakeBehaviour()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(FakePredictionService(behaviour), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, FakeServer(f"127.0.0.1:{port}", behaviour)


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server, fake = serve_fake()
    yield fake
    server.stop(grace=None)


@pytest.fixture(scope="session")
def self_signed_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(certificate, key) PEM for CN/SAN localhost, made with the openssl command line."""
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(directory / "key.pem"),
         "-out", str(directory / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return (directory / "cert.pem").read_bytes(), (directory / "key.pem").read_bytes()
