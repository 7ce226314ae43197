"""What a request would cost to decode, read from its shapes, dtypes and value counts alone (no server)."""

from __future__ import annotations

import pytest
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.server.errors import RpcStatus
from serving.server.tensors import RequestLimits, check_request_cost


@pytest.mark.parametrize(
    ("tensor", "decoded", "broadcast"),
    [
        (dict(dtype=types_pb2.DT_FLOAT, shape=[1000, 4], float_val=[1.0]), 16000, 15996),
        (dict(dtype=types_pb2.DT_FLOAT, shape=[1000, 4]), 16000, 16000),  # no value at all: zeros
        (dict(dtype=types_pb2.DT_DOUBLE, shape=[10], tensor_content=b"\0" * 80), 80, 0),
        (dict(dtype=types_pb2.DT_COMPLEX64, shape=[10], scomplex_val=[1.0, 2.0]), 80, 72),
        (dict(dtype=types_pb2.DT_STRING, shape=[100], string_val=[b"x"]), 800, 792),
        (dict(dtype=types_pb2.DT_INT8, shape=[100], int_val=list(range(100))), 100, 0),
    ],
)
def test_cost_is_read_from_shapes_and_value_counts(tensor, decoded, broadcast):
    proto = tensor_pb2.TensorProto(dtype=tensor.pop("dtype"))
    for size in tensor.pop("shape"):
        proto.tensor_shape.dim.add().size = size
    for field, values in tensor.items():
        if field == "tensor_content":
            proto.tensor_content = values
        else:
            getattr(proto, field).extend(values)
    inputs = {"x": proto}
    check_request_cost(inputs, RequestLimits(max_request_bytes=decoded, max_broadcast_bytes=max(broadcast, 1)))
    with pytest.raises(RpcStatus, match="--max-request-bytes"):
        check_request_cost(inputs, RequestLimits(max_request_bytes=decoded - 1, max_broadcast_bytes=0))
    if broadcast:
        with pytest.raises(RpcStatus, match="--max-broadcast-bytes"):
            check_request_cost(inputs, RequestLimits(max_request_bytes=decoded, max_broadcast_bytes=broadcast - 1))
