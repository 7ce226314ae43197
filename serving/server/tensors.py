"""TensorProto <-> numpy on the server side, with TensorFlow's own decoding rules and TF Serving's error messages.

Why not ``tf.make_ndarray``/``tf.make_tensor_proto``: they spend most of a small request's time in Python-level type
inference, and the benchmark target leaves the server about half a gRPC round trip for all of its own work. This
module reads ``tensor_content`` as a view over the received bytes and typed fields with one numpy call.

Decoding follows ``Tensor::FromProto`` (``tensorflow/core/framework/tensor.cc``), because a client that works against
TF Serving must work here: ``tensor_content`` must hold exactly the bytes of the shape; typed fields (``float_val``,
...) may hold fewer values than the shape needs, in which case the last value is repeated (one value fills the
whole shape) and no value at all means zeros; extra values are ignored. Anything TensorFlow would refuse is
INVALID_ARGUMENT ``tensor parsing error: <input>``, with the reason appended.

Encoding follows ``Tensor::AsProtoField`` (typed fields, TF Serving's default answer) or, when asked,
``AsProtoTensorContent`` (``--enable_serialization_as_tensor_content``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.protocol import length_delimited
from serving.server.errors import RpcStatus, invalid_argument

TensorProto = tensor_pb2.TensorProto
_DT = types_pb2.DataType

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


def check_request_cost(inputs: Mapping[str, TensorProto], limits: RequestLimits) -> None:
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


def _decoded_and_carried_bytes(proto: TensorProto, name: str) -> tuple[int, int]:
    """Bytes the tensor decodes to, and bytes of values the message itself carries."""
    codec = _CODECS.get(proto.dtype)
    if codec is None:
        return 0, 0  # refused later, by decode, with TF Serving's message
    num_elements = math.prod(max(dim.size, 0) for dim in proto.tensor_shape.dim)
    if proto.dtype == DT_STRING:
        return num_elements * _OBJECT_BYTES, _num_values(proto) * _OBJECT_BYTES
    itemsize = codec[0].itemsize
    if proto.tensor_content:
        return num_elements * itemsize, len(proto.tensor_content)
    values = _num_values(proto)
    if proto.dtype in _COMPLEX:
        values //= 2
    return num_elements * itemsize, values * itemsize


def _num_values(proto: TensorProto) -> int:
    codec = _CODECS.get(proto.dtype)
    return len(getattr(proto, codec[1])) if codec else 0


def _declared_shape(proto: TensorProto) -> list[int]:
    return [dim.size for dim in proto.tensor_shape.dim]

# DataType -> (numpy dtype, typed field of TensorProto that holds the values).
_CODECS: dict[int, tuple[np.dtype, str]] = {
    _DT.Value("DT_FLOAT"): (np.dtype(np.float32), "float_val"),
    _DT.Value("DT_DOUBLE"): (np.dtype(np.float64), "double_val"),
    _DT.Value("DT_INT32"): (np.dtype(np.int32), "int_val"),
    _DT.Value("DT_UINT8"): (np.dtype(np.uint8), "int_val"),
    _DT.Value("DT_INT16"): (np.dtype(np.int16), "int_val"),
    _DT.Value("DT_INT8"): (np.dtype(np.int8), "int_val"),
    _DT.Value("DT_UINT16"): (np.dtype(np.uint16), "int_val"),
    _DT.Value("DT_INT64"): (np.dtype(np.int64), "int64_val"),
    _DT.Value("DT_UINT32"): (np.dtype(np.uint32), "uint32_val"),
    _DT.Value("DT_UINT64"): (np.dtype(np.uint64), "uint64_val"),
    _DT.Value("DT_BOOL"): (np.dtype(np.bool_), "bool_val"),
    _DT.Value("DT_HALF"): (np.dtype(np.float16), "half_val"),
    _DT.Value("DT_BFLOAT16"): (np.dtype(tf.bfloat16.as_numpy_dtype), "half_val"),
    _DT.Value("DT_COMPLEX64"): (np.dtype(np.complex64), "scomplex_val"),
    _DT.Value("DT_COMPLEX128"): (np.dtype(np.complex128), "dcomplex_val"),
    _DT.Value("DT_STRING"): (np.dtype(object), "string_val"),
}
DT_STRING = _DT.Value("DT_STRING")
_DATATYPE_OF_NUMPY = {dtype: datatype for datatype, (dtype, _) in _CODECS.items() if datatype != DT_STRING}
_HALF_BITS = {_DT.Value("DT_HALF"), _DT.Value("DT_BFLOAT16")}
_COMPLEX = {_DT.Value("DT_COMPLEX64"), _DT.Value("DT_COMPLEX128")}
# Typed fields of fixed width: DataType -> (TensorProto field number, little-endian dtype of one wire value).
_PACKED_FIXED_WIDTH: dict[int, tuple[int, np.dtype]] = {
    _DT.Value("DT_FLOAT"): (5, np.dtype("<f4")),
    _DT.Value("DT_DOUBLE"): (6, np.dtype("<f8")),
    _DT.Value("DT_COMPLEX64"): (9, np.dtype("<f4")),
    _DT.Value("DT_COMPLEX128"): (12, np.dtype("<f8")),
}


def datatype_name(datatype: int) -> str:
    """TensorFlow's ``DataTypeString``: ``DT_FLOAT`` -> ``float``, as TF Serving's messages spell dtypes."""
    try:
        return _DT.Name(datatype)[3:].lower()
    except ValueError:
        return f"unknown dtype {datatype}"


def numpy_dtype(datatype: int) -> np.dtype | None:
    """The numpy dtype of a ``DataType``, or None when this server cannot carry it."""
    codec = _CODECS.get(datatype)
    return codec[0] if codec else None


def datatype_of(dtype: np.dtype) -> int:
    """The ``DataType`` of a numpy dtype (object and bytes/str arrays are DT_STRING)."""
    if dtype.kind in "OSU":
        return DT_STRING
    datatype = _DATATYPE_OF_NUMPY.get(dtype)
    if datatype is None:
        raise TypeError(f"numpy dtype {dtype} has no TensorFlow DataType this server can encode")
    return datatype


def proto_shape(proto: TensorProto, name: str) -> tuple[int, ...]:
    """The shape a request tensor declares, refusing what TensorFlow refuses (unknown rank, negative dimensions)."""
    shape_proto = proto.tensor_shape
    if shape_proto.unknown_rank:
        raise _parsing_error(name, "tensor_shape has unknown_rank set; a request tensor needs a full shape")
    shape = tuple(dim.size for dim in shape_proto.dim)
    if any(size < 0 for size in shape):
        raise _parsing_error(name, f"tensor_shape {list(shape)} has a negative dimension")
    return shape


def decode(proto: TensorProto, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode one request tensor whose dtype and shape were already checked against the signature.

    Args:
        proto: The request's TensorProto.
        name: The input's alias, named in every error.
        shape: ``proto_shape(proto, name)``.

    Returns:
        An array of that shape; a read-only view over ``tensor_content`` when the client sent raw bytes.

    Raises:
        RpcStatus: INVALID_ARGUMENT ``tensor parsing error: <name>`` and the reason.
    """
    codec = _CODECS.get(proto.dtype)
    if codec is None:
        raise _parsing_error(name, f"dtype {_dtype_label(proto.dtype)} is not supported")
    dtype, field = codec
    num_elements = math.prod(shape)
    if proto.tensor_content:
        return _from_content(proto.tensor_content, dtype, proto.dtype, name, shape, num_elements)
    return _from_values(getattr(proto, field), dtype, proto.dtype, shape, num_elements)


def _from_content(
    content: bytes, dtype: np.dtype, datatype: int, name: str, shape: tuple[int, ...], num_elements: int
) -> np.ndarray:
    if datatype == DT_STRING:
        raise _parsing_error(name, "string tensors cannot use tensor_content; use string_val")
    expected = num_elements * dtype.itemsize
    if len(content) != expected:
        raise _parsing_error(
            name,
            f"tensor_content holds {len(content)} bytes but shape {list(shape)} of {datatype_name(datatype)} "
            f"needs {expected}",
        )
    return np.frombuffer(content, dtype=dtype).reshape(shape)


def _from_values(values: Any, dtype: np.dtype, datatype: int, shape: tuple[int, ...], num_elements: int) -> np.ndarray:
    if datatype in _HALF_BITS:
        flat = np.array(values, dtype=np.int32).astype(np.uint16).view(dtype)
    elif datatype in _COMPLEX:
        parts = np.array(values, dtype=np.float32 if datatype == _DT.Value("DT_COMPLEX64") else np.float64)
        flat = parts[: len(parts) // 2 * 2].view(dtype)
    elif datatype == DT_STRING:
        flat = np.empty(len(values), dtype=object)
        flat[:] = list(values)
    else:
        flat = np.array(values, dtype=dtype)
    return _fill(flat, dtype, shape, num_elements)


def _fill(flat: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], num_elements: int) -> np.ndarray:
    """Apply TensorFlow's rule for typed fields: pad with the last value, zeros when empty, ignore extras."""
    if len(flat) == num_elements:
        return flat.reshape(shape)
    if len(flat) > num_elements:
        return flat[:num_elements].reshape(shape)
    if len(flat) == 0:
        filled = np.full(num_elements, b"" if dtype.kind == "O" else 0, dtype=dtype)
        return filled.reshape(shape)
    filled = np.empty(num_elements, dtype=dtype)
    filled[: len(flat)] = flat
    filled[len(flat) :] = flat[-1]
    return filled.reshape(shape)


def encode_into(target: TensorProto, array: np.ndarray, *, as_tensor_content: bool = False) -> None:
    """Write an output array into a response TensorProto (typed fields unless ``as_tensor_content``)."""
    datatype = datatype_of(array.dtype)
    target.dtype = datatype
    dims = target.tensor_shape.dim
    for size in array.shape:
        dims.add().size = size
    flat = array.reshape(-1)
    if datatype == DT_STRING:
        target.string_val.extend(item if isinstance(item, bytes) else str(item).encode() for item in flat)
    elif as_tensor_content:
        target.tensor_content = np.ascontiguousarray(flat).tobytes()
    elif datatype in _HALF_BITS:
        target.half_val.extend(flat.view(np.uint16).tolist())
    elif datatype in _PACKED_FIXED_WIDTH:
        # Floats travel as packed little-endian bytes: merging them as serialized bytes costs one copy of the
        # array, where ``extend(flat.tolist())`` built a Python float per value (about 8x the array, transiently).
        number, wire_dtype = _PACKED_FIXED_WIDTH[datatype]
        raw = np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("<")).view(wire_dtype).tobytes()
        target.MergeFromString(length_delimited(number, len(raw)) + raw)
    else:
        getattr(target, _CODECS[datatype][1]).extend(flat.tolist())


def _dtype_label(datatype: int) -> str:
    try:
        return _DT.Name(datatype)
    except ValueError:
        return str(datatype)


def _parsing_error(name: str, reason: str) -> RpcStatus:
    return invalid_argument(f"tensor parsing error: {name}: {reason}")
