"""Shared fixtures for the client tests (no tests here): real exports served on loopback, and a fake server.

Registered once as a plugin in ``tests/conftest.py``, so that the session-scoped fixtures are created once per test
run, not once per module: the exports and servers are the slow part.

* ``classifier``: the seed LinearModule (4 features -> 3 class scores) exported by ema-export with the known LIVE/EMA
  weights of ``support.models``, served as model ``DEFAULT_MODEL_NAME``.
* ``regressor``: the same model shape with one output column (a regression head), served as ``"regressor"``.
* ``fake_server``: a PredictionService we script per test (failures, delays) to test retries, deadlines, errors.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf

import ema_export
from ema_export.names import DEFAULT_MODEL_NAME
from serving import codec
from serving.protocol import PredictResponse, prediction_service_pb2_grpc
from serving.server import start_server
from support.models import (
    EMA_B,
    EMA_W,
    LIVE_B,
    LIVE_W,
    NUM_FEATURES,
    LinearModule,
    linear_numpy,
    write_seed_checkpoints,
)

REGRESSION_LIVE = (np.array([[0.5], [-1.0], [0.25], [2.0]], np.float32), np.array([0.1], np.float32))
REGRESSION_EMA = (np.array([[0.45], [-0.9], [0.3], [1.8]], np.float32), np.array([0.0], np.float32))
REGRESSOR_NAME = "regressor"


class RegressionModule(tf.Module):
    """LinearModule's pattern with a single output column: a regression head."""

    def __init__(self) -> None:
        super().__init__(name="regression")
        self.weights = tf.Variable(tf.zeros([NUM_FEATURES, 1]), name="weights")
        self.biases = tf.Variable(tf.zeros([1]), name="biases")

    @tf.function(input_signature=[tf.TensorSpec([None, NUM_FEATURES], tf.float32, name="inputs")])
    def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.matmul(inputs, self.weights) + self.biases


@dataclass(frozen=True)
class ServedModel:
    """A model exported by ema-export and served on loopback, with the weights each arm computes with."""

    target: str
    name: str
    base_path: Path
    live: tuple[np.ndarray, np.ndarray]
    ema: tuple[np.ndarray, np.ndarray]

    def expected(self, inputs: np.ndarray, arm: str) -> np.ndarray:
        """What the arm must answer, computed with numpy."""
        weights = self.live if arm == "serve_live" else self.ema
        return linear_numpy(inputs, *weights)


def _export_and_serve(
    root: Path, name: str, factory: Callable[[], tf.Module], live: tuple, ema: tuple
) -> tuple[ServedModel, object]:
    write_seed_checkpoints(root / "ckpt", live=live, ema=ema)
    ema_export.export(root / "ckpt", root / "out", model=factory)
    server = start_server(model_name=name, model_base_path=str(root / "out"), port=0)
    server.wait_until_available(timeout=30)
    return ServedModel(f"127.0.0.1:{server.port}", name, root / "out", live, ema), server


@pytest.fixture(scope="session")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    served, server = _export_and_serve(
        tmp_path_factory.mktemp("classifier"), DEFAULT_MODEL_NAME, LinearModule, (LIVE_W, LIVE_B), (EMA_W, EMA_B)
    )
    with server:  # type: ignore[attr-defined]
        yield served


@pytest.fixture(scope="session")
def regressor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    served, server = _export_and_serve(
        tmp_path_factory.mktemp("regressor"), REGRESSOR_NAME, RegressionModule, REGRESSION_LIVE, REGRESSION_EMA
    )
    with server:  # type: ignore[attr-defined]
        yield served


def classification_inputs(num_examples: int, seed: int = 0) -> np.ndarray:
    """Random rows whose top-1 class is clear-cut under both arms (no near-ties float rounding could flip)."""
    generator = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    while len(rows) < num_examples:
        candidate = generator.normal(size=(num_examples, NUM_FEATURES)).astype(np.float32)
        margins = [np.sort(linear_numpy(candidate, *w), axis=1) for w in ((LIVE_W, LIVE_B), (EMA_W, EMA_B))]
        clear = np.all([m[:, -1] - m[:, -2] > 1e-3 for m in margins], axis=0)
        rows.extend(candidate[clear])
    return np.stack(rows[:num_examples])


# -------------------------------------------------------------------------------------------------------- fake server
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
