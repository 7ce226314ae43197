"""The local server's side of the tensor codec: request cost limits, and TF Serving's status for a bad tensor.

Decoding and encoding are ``serving.codec``'s (the client's codec too): requests are decoded under
``Policy.FROM_PROTO``, TensorFlow's ``Tensor::FromProto`` rules (see there), because a client that works against TF
Serving must work here. Anything those rules refuse is INVALID_ARGUMENT ``tensor parsing error: <input>: <reason>``,
TF Serving's answer when ``FromProto`` fails. Responses are written as ``Tensor::AsProtoField`` does (typed fields,
TF Serving's default) or, when asked, ``AsProtoTensorContent`` (``--enable_serialization_as_tensor_content``).

What is the server's own is what a request may cost (``RequestLimits``), checked from declared shapes before anything
is decoded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving import codec
from serving.server.errors import RpcStatus, invalid_argument

MAX_MESSAGE_BYTES = 2**31 - 1
"""TF Serving's message limit: ``builder.SetMaxMessageSize(INT32_MAX)`` (``model_servers/server.cc`` 397)."""

DEFAULT_MAX_BROADCAST_BYTES = 16 << 20
"""Default for `RequestLimits.max_broadcast_bytes` (TF Serving has no such limit; see there)."""

_OBJECT_BYTES = 8
"""What one element of a decoded string tensor costs beyond its bytes: a reference in a numpy object array."""


@dataclass(frozen=True)
class RequestLimits:
    """What one request may cost the server, checked from declared shapes before anything is allocated.

    Attributes:
        max_request_bytes: Largest decoded size of a request's inputs together (elements x dtype size, summed over
            inputs), and the largest gRPC message and REST body accepted. Default: TF Serving's message limit,
            INT32_MAX (``model_servers/server.cc`` 397), so a request TF Serving can receive is accepted here.
        max_broadcast_bytes: Largest number of bytes a request's typed fields (``float_val``, ...) may expand to
            beyond the values they carry. TensorFlow fills a shape from fewer values by repeating the last one
            (``Tensor::FromProto``, ``FromProtoField`` in ``framework/tensor.cc``) and TF Serving has no limit on
            it, so 53 bytes declaring [2^24, 4] make it allocate the whole array. The local server refuses that
            expansion above this many bytes (16 MiB by default: zero-filled warmup images still fit); 0 removes
            the limit, as in TF Serving.
    """

    max_request_bytes: int = MAX_MESSAGE_BYTES
    max_broadcast_bytes: int = DEFAULT_MAX_BROADCAST_BYTES

    def check_decoded_bytes(self, decoded_bytes: int, where: str) -> None:
        """Refuse a request whose inputs decode to more than ``max_request_bytes`` (REST, after parsing)."""
        if decoded_bytes > self.max_request_bytes:
            raise invalid_argument(
                f"{where}: the inputs decode to {decoded_bytes} bytes, more than this server accepts per request "
                f"({self.max_request_bytes}, --max-request-bytes); send smaller batches"
            )


DEFAULT_LIMITS = RequestLimits()
"""The limits a server has unless told otherwise."""


def check_request_cost(inputs: Mapping[str, Any], limits: RequestLimits) -> None:
    """Refuse a request whose inputs would cost more than ``limits`` to decode, before any of them is decoded.

    Reads only shapes, dtypes and value counts (each O(1) on a parsed message), so a refusal costs microseconds
    whatever the request declares.

    Raises:
        RpcStatus: INVALID_ARGUMENT ``tensor parsing error: <input>: ...``, what TF Serving answers for a tensor it
            cannot build (``Tensor::FromProto`` failing), naming the limit's flag.
    """
    total = 0
    broadcast = 0
    for name, proto in inputs.items():
        decoded, carried = _decoded_and_carried_bytes(proto, name)
        total += decoded
        broadcast += max(decoded - carried, 0)
        if total > limits.max_request_bytes:
            raise _parsing_error(
                name,
                f"shape {_declared_shape(proto)} brings the request's inputs to {total} bytes decoded, more than "
                f"this server accepts per request ({limits.max_request_bytes}, --max-request-bytes); "
                "send smaller batches",
            )
        if limits.max_broadcast_bytes and broadcast > limits.max_broadcast_bytes:
            raise _parsing_error(
                name,
                f"{_num_values(proto)} value(s) would expand to shape {_declared_shape(proto)} ({decoded} bytes); "
                f"this server fills at most {limits.max_broadcast_bytes} bytes per request from repeated values "
                "(--max-broadcast-bytes, 0 = no limit); send the values, or a smaller shape",
            )


def _decoded_and_carried_bytes(proto: Any, name: str) -> tuple[int, int]:
    """Bytes the tensor decodes to, and bytes of values the message itself carries."""
    known = codec.DATATYPES.get(proto.dtype)
    if known is None:
        return 0, 0  # refused later, by decode, with TF Serving's message
    num_elements = math.prod(max(dim.size, 0) for dim in proto.tensor_shape.dim)
    values = len(getattr(proto, known.field))
    if known.enum == codec.DT_STRING:
        return num_elements * _OBJECT_BYTES, values * _OBJECT_BYTES
    itemsize = known.numpy.itemsize
    if proto.tensor_content:
        return num_elements * itemsize, len(proto.tensor_content)
    if known.numpy.kind == "c":
        values //= 2
    return num_elements * itemsize, values * itemsize


def _num_values(proto: Any) -> int:
    known = codec.DATATYPES.get(proto.dtype)
    return len(getattr(proto, known.field)) if known else 0


def _declared_shape(proto: Any) -> list[int]:
    return [dim.size for dim in proto.tensor_shape.dim]


def decode(proto: Any, name: str) -> np.ndarray:
    """Decode one request tensor (or a SignatureDef default) under TensorFlow's ``FromProto`` rules.

    Args:
        proto: The request's TensorProto.
        name: The input's alias, named in every error.

    Returns:
        An array of the declared shape; a read-only view when the client sent ``tensor_content`` or packed floats.

    Raises:
        RpcStatus: INVALID_ARGUMENT ``tensor parsing error: <name>: <reason>``.
    """
    try:
        return codec.decode(proto, policy=codec.Policy.FROM_PROTO)
    except codec.TensorDecodeError as error:
        raise _parsing_error(name, error.reason) from None


def _parsing_error(name: str, reason: str) -> RpcStatus:
    return invalid_argument(f"tensor parsing error: {name}: {reason}")
