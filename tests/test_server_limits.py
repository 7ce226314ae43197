"""What one request may cost the local server: limits checked before anything is allocated, and work that stops
once nobody waits for it. Real servers on loopback, official stubs; the RSS test measures a real server process."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from tensorflow.core.framework import types_pb2

from serving.server import servable as servable_module, start_server, tensors as tensors_module
from support.rpc import INPUT_NAME, connect, output_of, predict_request, rpc_error, sample_inputs
from support.served import expected_output, publish_version
from support.serving_process import serve_process

pytestmark = pytest.mark.slow  # serves exports

StatusCode = grpc.StatusCode
HUGE_ROWS = 2**24  # [2^24, 4] float32 is 256 MiB decoded, from one float_val


def _broadcast_request(rows: int, values: tuple[float, ...] = (1.0,)):
    """A Predict request declaring [rows, 4] float32 but carrying only ``values`` (TensorFlow repeats the last)."""
    request = predict_request()
    tensor = request.inputs[INPUT_NAME]
    tensor.dtype = types_pb2.DT_FLOAT
    tensor.tensor_shape.dim.add().size = rows
    tensor.tensor_shape.dim.add().size = 4
    tensor.float_val.extend(values)
    return request


@pytest.fixture()
def base_path(seed_library, tmp_path):
    path = tmp_path / "models"
    publish_version(seed_library, path, 1)
    return path


def test_tiny_request_declaring_a_huge_shape_is_refused_before_allocating(base_path):
    request = _broadcast_request(HUGE_ROWS)
    assert request.ByteSize() < 64  # the attack: a few dozen bytes on the wire
    with serve_process(base_path) as server:
        stubs = connect(server.port)
        inputs = sample_inputs()
        stubs.prediction.Predict(predict_request(inputs), timeout=30)  # warm: the baseline includes a served request
        baseline = server.rss_bytes()
        started = time.monotonic()
        error = rpc_error(stubs.prediction.Predict, request)
        refused_in = time.monotonic() - started
        growth = server.rss_bytes() - baseline
        # The server still answers normally afterwards.
        np.testing.assert_allclose(output_of(stubs.prediction.Predict(predict_request(inputs), timeout=30)),
                                   expected_output(inputs), rtol=1e-5)
        stubs.channel.close()
    assert error.code() == StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"tensor parsing error: {INPUT_NAME}: ")
    assert "--max-broadcast-bytes" in error.details() and "[16777216, 4]" in error.details()
    decoded_bytes = HUGE_ROWS * 4 * 4
    assert growth < decoded_bytes / 16, f"RSS grew {growth} bytes refusing a request"  # before: +2.5 GB
    assert refused_in < 5.0, refused_in  # generous: the check reads shapes only (milliseconds)


def test_broadcast_limit_is_configurable_and_zero_restores_tf_serving_behaviour(base_path):
    rows = 4096  # 64 KiB decoded from one value
    inputs = np.ones((rows, 4), np.float32)
    with start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0,
                      max_broadcast_bytes=16 * 1024) as limited:
        stubs = connect(limited.port)
        error = rpc_error(stubs.prediction.Predict, _broadcast_request(rows))
        assert error.code() == StatusCode.INVALID_ARGUMENT and "--max-broadcast-bytes" in error.details()
        # Every value sent: nothing expands, so the same shape is served.
        full = stubs.prediction.Predict(predict_request(inputs), timeout=30)
        np.testing.assert_allclose(output_of(full), expected_output(inputs), rtol=1e-5)
        stubs.channel.close()
    with start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0,
                      max_broadcast_bytes=0) as unlimited:
        stubs = connect(unlimited.port)
        response = stubs.prediction.Predict(_broadcast_request(rows), timeout=30)
        np.testing.assert_allclose(output_of(response), expected_output(inputs), rtol=1e-5)
        stubs.channel.close()


def test_request_size_limit_bounds_messages_and_decoded_inputs(base_path):
    with start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0,
                      max_request_bytes=64 * 1024, max_broadcast_bytes=0) as server:
        stubs = connect(server.port)
        small = sample_inputs(batch=1024)  # 16 KiB: served
        np.testing.assert_allclose(output_of(stubs.prediction.Predict(predict_request(small), timeout=30)),
                                   expected_output(small), rtol=1e-5)
        # A message over the limit is refused by gRPC itself, from its length prefix.
        too_big = rpc_error(stubs.prediction.Predict, predict_request(sample_inputs(batch=8192)))
        assert too_big.code() == StatusCode.RESOURCE_EXHAUSTED
        # A small message that decodes to more than the limit is refused before decoding.
        expands = rpc_error(stubs.prediction.Predict, _broadcast_request(8192))
        assert expands.code() == StatusCode.INVALID_ARGUMENT and "--max-request-bytes" in expands.details()
        stubs.channel.close()


def test_work_stops_once_the_deadline_passed(base_path, monkeypatch):
    runs = []
    original_decode = tensors_module.decode

    def slow_decode(*args):
        time.sleep(0.5)  # a heavy decode, during which the client's deadline passes
        return original_decode(*args)

    with start_server(model_base_path=base_path, port=0, file_system_poll_wait_seconds=0) as server:
        monkeypatch.setattr(tensors_module, "decode", slow_decode)
        monkeypatch.setattr(servable_module.Signature, "run", lambda *args, **kwargs: runs.append(args))
        stubs = connect(server.port)
        with pytest.raises(grpc.RpcError) as late:
            stubs.prediction.Predict(predict_request(sample_inputs()), timeout=0.2)
        time.sleep(0.6)  # the handler finishes decoding after the client gave up
        stubs.channel.close()
    assert late.value.code() == StatusCode.DEADLINE_EXCEEDED
    assert not runs, "the model ran for a request nobody waited for any more"
