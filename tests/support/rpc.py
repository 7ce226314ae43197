"""Requests to the served seed model, built the way TF Serving's own examples build them, and the official stubs on a
loopback channel to send them with.

The expected answers live beside the exports they describe (`support.served.expected_output`, `ServedModel.expected`).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from support.models import EMA_B, EMA_W, LIVE_B, LIVE_W, NUM_FEATURES, linear_numpy

MODEL_NAME = "model"
INPUT_NAME = "inputs"
OUTPUT_NAME = "output_0"


def predict_request(
    inputs: np.ndarray | None = None,
    *,
    model: str = MODEL_NAME,
    signature: str = "",
    version: int | None = None,
    label: str | None = None,
) -> predict_pb2.PredictRequest:
    """A PredictRequest for the seed model, built the way TF Serving's own examples build them."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    if inputs is not None:
        request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(inputs))
    return request


def sample_inputs(batch: int = 2, seed: int = 0) -> np.ndarray:
    """A float32 batch for the seed model."""
    return np.random.default_rng(seed).normal(size=(batch, 4)).astype(np.float32)


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


def output_of(response: predict_pb2.PredictResponse) -> np.ndarray:
    """The seed model's output from a PredictResponse."""
    return tf.make_ndarray(response.outputs[OUTPUT_NAME])


@dataclass(frozen=True)
class Stubs:
    """The official generated stubs on one loopback channel."""

    channel: grpc.Channel
    prediction: prediction_service_pb2_grpc.PredictionServiceStub
    model: model_service_pb2_grpc.ModelServiceStub


def connect(port: int) -> Stubs:
    """Stubs for a server on 127.0.0.1."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return Stubs(
        channel,
        prediction_service_pb2_grpc.PredictionServiceStub(channel),
        model_service_pb2_grpc.ModelServiceStub(channel),
    )


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """Run an RPC that must fail and return its error."""
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, timeout=30, **kwargs)
    return raised.value
