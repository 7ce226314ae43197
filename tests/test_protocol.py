"""The protocol modules load without the TensorFlow runtime, and TensorFlow still imports cleanly afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import grpc
import pytest

from serving import protocol

CLIENT_MODULES = (
    "serving.protocol",
    "serving.codec",
    "serving.client",
    "serving.ab",
    "serving.router",
    "serving.client_cli",
    "serving.tfrecord",
    "serving.data",
    "serving.stats",
    "serving.report",
    "serving.canary",
)


def run_python(code: str) -> dict:
    """Run `code` in a fresh interpreter and return the JSON it prints on its last line."""
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a child Python process imports TensorFlow
def test_client_modules_never_import_the_tensorflow_runtime() -> None:
    result = run_python(
        f"""
        import importlib, json, sys
        for name in {CLIENT_MODULES!r}:
            importlib.import_module(name)
        from serving import ServingClient
        print(json.dumps({{
            "runtime": sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.python")),
            "keras": "keras" in sys.modules,
        }}))
        """
    )
    assert result == {"runtime": [], "keras": False}


@pytest.mark.slow  # a child Python process imports TensorFlow
def test_tensorflow_imported_afterwards_works_and_shares_the_protocol_classes() -> None:
    result = run_python(
        """
        import json, sys
        from serving import protocol
        before = "tensorflow.python" in sys.modules
        import tensorflow as tf
        from tensorflow.core.framework import tensor_pb2
        from tensorflow_serving.apis import predict_pb2
        proto = tf.make_tensor_proto([1.0, 2.0])
        request = protocol.PredictRequest()
        request.inputs["x"].CopyFrom(proto)  # mixing our messages with TensorFlow's must work
        print(json.dumps({
            "before": before,
            "real_init_ran": hasattr(tf, "constant") and hasattr(tf, "__version__"),
            "same_module": tensor_pb2 is protocol.tensor_pb2 and predict_pb2 is protocol.predict_pb2,
            "same_class": type(proto) is protocol.TensorProto,
            "sum": float(tf.reduce_sum(tf.constant(tf.make_ndarray(request.inputs["x"])))),
        }))
        """
    )
    assert result == {"before": False, "real_init_ran": True, "same_module": True, "same_class": True, "sum": 3.0}


@pytest.mark.slow  # a child Python process imports TensorFlow
def test_protocol_imported_after_tensorflow_reuses_its_modules() -> None:
    result = run_python(
        """
        import json
        import tensorflow as tf
        from serving import codec, protocol
        print(json.dumps({
            "same_class": type(tf.make_tensor_proto([1, 2])) is protocol.TensorProto,
            "decoded": codec.decode(tf.make_tensor_proto([1, 2])).tolist(),
        }))
        """
    )
    assert result == {"same_class": True, "decoded": [1, 2]}


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, "connection refused", protocol.ServerUnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", protocol.DeadlineExceededError),
        (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(nope)", protocol.ModelNotFoundError),
        (grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: canary", protocol.ModelNotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "x" not found.', protocol.SignatureNotFoundError),
        (grpc.StatusCode.INVALID_ARGUMENT, "input size does not match", protocol.InvalidRequestError),
        (grpc.StatusCode.INTERNAL, "boom", protocol.ServingError),
    ],
)
def test_grpc_statuses_map_to_named_errors(code: grpc.StatusCode, details: str, expected: type) -> None:
    error = protocol.error_from_rpc(FakeRpcError(code, details), what="Predict(model='m')")
    assert type(error) is expected
    assert "Predict(model='m')" in str(error) and f"Received: {code.name}: {details}" in str(error)
