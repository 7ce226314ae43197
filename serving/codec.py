"""numpy arrays <-> ``TensorProto``, without TensorFlow.

Why not ``tf.make_tensor_proto`` / ``tf.make_ndarray``: they need the TensorFlow runtime (see ``serving.protocol``),
spend most of a small tensor's time in Python-level type inference, copy a large one several times on its way to the
wire, and read typed fields one Python object per value. This codec takes the dtype from numpy and works on the
serialized form directly:

* ``encode_bytes`` / ``tensor_pieces``: an array to the bytes of a ``TensorProto``, copying its memory once (the
  client frames the pieces straight into a PredictRequest);
* ``decode_bytes``: serialized bytes to an array that is a view of the received buffer where the wire already holds
  the array's bytes, and vectorised numpy where it holds varints;
* ``encode`` / ``decode``: the same for ``TensorProto`` message objects, for callers that have messages.

A ``TensorProto`` carries its values in one of two forms and a decoder must read both:

* ``tensor_content``: the little-endian bytes of the whole C-ordered array (TF Serving answers this way with
  ``--enable_serialization_as_tensor_content``; ``tf.make_tensor_proto`` writes it for most numeric dtypes);
* a typed repeated field (``float_val``, ``double_val``, ``int_val`` for 8/16/32-bit integers, ``int64_val``,
  ``uint32_val``, ``uint64_val``, ``bool_val``, ``half_val`` holding the *bit patterns* of float16/bfloat16,
  ``scomplex_val``/``dcomplex_val`` as interleaved real/imaginary parts, ``string_val``). TF Serving answers this way by
  default. Fewer values than elements is legal: the last value is repeated, so one value fills the whole shape
  ("broadcast"), and no value at all means zeros.

Strings are always ``string_val``; they decode to a numpy ``object`` array of ``bytes`` (as ``tf.make_ndarray`` does).
bfloat16 needs ``ml_dtypes`` (installed with TensorFlow), imported only when a bfloat16 tensor is met.

One decoder serves both ends, with a ``Policy`` saying what to do with values the shape does not need (see there):
``STRICT`` for the client, which would rather fail than guess at a corrupt answer, and ``FROM_PROTO`` for the local
server, which must accept exactly what TF Serving accepts. Both fill a short value list the same way.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, cast

import numpy as np

from serving.protocol import (
    WIRE_FIXED32,
    WIRE_FIXED64,
    WIRE_LENGTH_DELIMITED,
    WIRE_VARINT,
    CodecError,
    TensorProto,
    WireFormatError,
    encode_varint,
    field_key,
    iter_fields,
    length_delimited,
    tensor_shape_pb2,
    types_pb2,
)

Form = Literal["content", "values"]


class Policy(enum.Enum):
    """How ``decode`` treats a tensor that carries more than its shape needs.

    Both policies fill a short value list as TensorFlow does (the last value repeats; no value means zeros), since
    ``tf.make_tensor_proto`` writes one value for a constant and TF Serving's clients rely on it.

    * ``STRICT`` (the client's): more typed values than elements, a dangling complex part, or ``tensor_content`` of
      the wrong length is a ``TensorDecodeError``, as with ``tf.make_ndarray``: an answer carrying more than its shape
      is corrupt, and guessing which part is meant would hide it.
    * ``FROM_PROTO`` (the local server's): TensorFlow's ``Tensor::FromProto``, so a request TF Serving accepts is
      accepted here. Line numbers are ``tensorflow/core/framework/tensor.cc`` at commit 6e83c64a1c4d:
      a shape with no elements builds an empty tensor without looking at any value (``N > 0``, 825);
      ``tensor_content`` must hold exactly the shape's bytes (``Helper<T>::Decode``, 143-156); typed fields go through
      ``FromProtoField`` (462-497): extra values are ignored (``copy_n(begin, n, data)``, 487-488), fewer repeat the
      last (490-492), none means zeros (483-484); complex fields count whole (real, imaginary) pairs, so a dangling
      part is ignored (``NumElements`` returns ``size() / 2``, 381-383 and 397-399).
      One deliberate difference: ``tensor_content`` of a string tensor (TensorFlow's own string-list encoding, which
      ``tf.make_tensor_proto`` never writes) is refused under both policies, as ``tf.make_ndarray`` refuses it.
    """

    STRICT = "strict"
    FROM_PROTO = "from_proto"


class TensorDecodeError(CodecError):
    """A tensor the decoding policy refuses (as opposed to bytes that are not a protocol buffer at all).

    Attributes:
        reason: the cause in a few words without advice (``tensor_content holds 3 bytes but shape [2] of float needs
            8``), for a caller that phrases its own message: the local server answers
            ``tensor parsing error: <input>: <reason>`` as TF Serving does.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


_DT = types_pb2.DataType
_BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class Datatype:
    """One TensorFlow ``DataType`` the codec carries: the one table both the client and the local server read.

    Attributes:
        enum: the ``DataType`` value (``DT_FLOAT`` is 1).
        name: the codec's name, numpy's spelling (``"float32"``, ``"bfloat16"``, ``"string"``).
        field: the repeated ``TensorProto`` field of the values form (``"float_val"``...).
    """

    enum: int
    name: str
    field: str

    @functools.cached_property
    def numpy(self) -> np.dtype:
        """The numpy dtype of an element (``object`` for strings); bfloat16 imports ``ml_dtypes`` on first use."""
        return numpy_dtype(self.name)


DATATYPES: Mapping[int, Datatype] = MappingProxyType(
    {
        datatype.enum: datatype
        for datatype in (
            Datatype(_DT.Value("DT_HALF"), "float16", "half_val"),
            Datatype(_DT.Value("DT_BFLOAT16"), _BFLOAT16, "half_val"),
            Datatype(_DT.Value("DT_FLOAT"), "float32", "float_val"),
            Datatype(_DT.Value("DT_DOUBLE"), "float64", "double_val"),
            Datatype(_DT.Value("DT_INT8"), "int8", "int_val"),
            Datatype(_DT.Value("DT_INT16"), "int16", "int_val"),
            Datatype(_DT.Value("DT_INT32"), "int32", "int_val"),
            Datatype(_DT.Value("DT_INT64"), "int64", "int64_val"),
            Datatype(_DT.Value("DT_UINT8"), "uint8", "int_val"),
            Datatype(_DT.Value("DT_UINT16"), "uint16", "int_val"),
            Datatype(_DT.Value("DT_UINT32"), "uint32", "uint32_val"),
            Datatype(_DT.Value("DT_UINT64"), "uint64", "uint64_val"),
            Datatype(_DT.Value("DT_BOOL"), "bool", "bool_val"),
            Datatype(_DT.Value("DT_COMPLEX64"), "complex64", "scomplex_val"),
            Datatype(_DT.Value("DT_COMPLEX128"), "complex128", "dcomplex_val"),
            Datatype(_DT.Value("DT_STRING"), "string", "string_val"),
        )
    }
)
"""Every ``DataType`` the codec reads and writes, by enum value."""

_DATATYPE_BY_NAME: dict[str, int] = {datatype.name: enum for enum, datatype in DATATYPES.items()}
DT_STRING: int = _DT.Value("DT_STRING")

SUPPORTED_DTYPES: tuple[str, ...] = tuple(datatype.name for datatype in DATATYPES.values())
"""Dtype names the codec reads and writes (``"string"`` is numpy ``object``/``bytes_``/``str_``)."""


@functools.cache
def _bfloat16() -> np.dtype:
    try:
        import ml_dtypes
    except ImportError as error:  # pragma: no cover - ml_dtypes ships with TensorFlow and JAX
        raise CodecError(
            "bfloat16 tensors need the 'ml_dtypes' package, which numpy uses to hold them. Expected it to be "
            "installed; fix with `pip install ml_dtypes`. Received: a DT_BFLOAT16 tensor."
        ) from error
    bfloat16: np.dtype = np.dtype(ml_dtypes.bfloat16)
    return bfloat16


@functools.cache
def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a codec dtype name (``object`` for strings), little-endian as on the wire."""
    if name == _BFLOAT16:
        return _bfloat16()
    if name == "string":
        return np.dtype(object)
    little_endian: np.dtype = np.dtype(name).newbyteorder("<")
    return little_endian


def numpy_dtype_of(datatype: int) -> np.dtype | None:
    """The numpy dtype of a ``DataType`` value, or None when the codec does not carry it."""
    known = DATATYPES.get(datatype)
    return None if known is None else known.numpy


def dtype_name(datatype: int) -> str:
    """The codec's name for a ``DataType`` value (``"float32"``, ``"string"``...), else TF's own (``"DT_RESOURCE"``)."""
    known = DATATYPES.get(datatype)
    if known is not None:
        return known.name
    return _DT.Name(datatype) if datatype in _DT.values() else f"DataType({datatype})"


def datatype_string(datatype: int) -> str:
    """TensorFlow's ``DataTypeString`` (``DT_FLOAT`` -> ``"float"``), how TF Serving's messages spell a dtype."""
    return _DT.Name(datatype)[3:].lower() if datatype in _DT.values() else f"unknown dtype {datatype}"


def datatype_of(dtype: Any) -> int:
    """The ``DataType`` enum value for a numpy dtype (or anything ``np.dtype`` accepts, or a codec dtype name).

    Raises:
        CodecError: the dtype has no TensorFlow counterpart the codec supports.
    """
    if isinstance(dtype, str) and dtype in _DATATYPE_BY_NAME:
        return _DATATYPE_BY_NAME[dtype]
    return _datatype_of_numpy(np.dtype(dtype))


@functools.lru_cache(maxsize=64)
def _datatype_of_numpy(resolved: np.dtype) -> int:
    # Cached: ``dtype.name`` formats a string each time, half the cost of encoding a small tensor.
    if resolved.kind in "OSU":
        return DT_STRING
    datatype = _DATATYPE_BY_NAME.get(resolved.name)
    if datatype is None:
        raise CodecError(
            f"Cannot encode numpy dtype {resolved} as a TensorFlow tensor. Expected one of "
            f"{', '.join(SUPPORTED_DTYPES)}; cast the array with .astype(...) first. Received: dtype={resolved}."
        )
    return datatype


def _as_array(values: Any, dtype: Any) -> np.ndarray:
    if dtype is not None and not isinstance(dtype, np.dtype) and dtype in _DATATYPE_BY_NAME:
        dtype = numpy_dtype(dtype)
    try:
        array = np.asarray(values, dtype=dtype)
        if array.dtype.kind in "SU" and not isinstance(values, np.ndarray):
            # numpy's fixed-width strings drop trailing NUL characters; keep the caller's exact values instead.
            array = np.asarray(values, dtype=object)
        return array
    except (TypeError, ValueError) as error:
        raise CodecError(
            f"Cannot convert the values to a dense numpy array of dtype {dtype}. Expected an array, a scalar or "
            f"nested lists of one shape; build the array with numpy first. Received: {type(values).__name__}: {error}"
        ) from error


def _as_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, (np.bytes_, bytearray, memoryview)):
        return bytes(item)
    raise CodecError(
        "Cannot encode a string tensor element. Expected bytes or str; convert the element first. "
        f"Received: {type(item).__name__}."
    )


def encode(
    values: Any,
    *,
    dtype: Any = None,
    shape: tuple[int, ...] | list[int] | None = None,
    form: Form = "content",
    out: Any = None,
) -> Any:
    """Encode an array (or scalar, or nested lists) as a ``TensorProto``.

    Why two forms: ``tensor_content`` is one memory copy and what servers decode fastest; the ``*_val`` fields are what
    TF Serving itself answers with by default, and what older tooling writes, so tests and replays need both.

    Args:
        values: array-like. Its numpy dtype is sent as is (no float64 -> float32 guessing): cast first if the
            signature wants another dtype.
        dtype: optional dtype to convert to first (numpy dtype or a name from ``SUPPORTED_DTYPES``).
        shape: optional shape. When given and ``values`` holds one element, that one value is written once and
            broadcast to the shape (the compact ``*_val`` form); otherwise it must hold exactly as many elements.
        form: ``"content"`` (raw bytes) or ``"values"`` (typed repeated field). Strings always use ``string_val``.
        out: an existing ``TensorProto`` to fill (e.g. ``request.inputs["x"]``), saving a copy; it is cleared first.

    Returns:
        The filled ``TensorProto``.

    Raises:
        CodecError: unsupported dtype, ragged values, or a shape that does not fit.

    Example:
        >>> encode(np.zeros((2, 4), np.float32)).tensor_shape.dim[0].size
        2
    """
    array = _as_array(values, dtype)
    datatype = datatype_of(array.dtype)
    proto = TensorProto() if out is None else out
    if out is not None:
        proto.Clear()
    proto.dtype = datatype
    target_shape = array.shape if shape is None else tuple(int(size) for size in shape)
    num_elements = math.prod(target_shape)
    broadcast = shape is not None and array.size == 1 and num_elements != 1
    if not broadcast and array.size != num_elements:
        raise CodecError(
            f"Cannot encode {array.size} values as a tensor of shape {list(target_shape)}. Expected exactly "
            f"{num_elements} values, or one value to broadcast; reshape the array or fix shape=. "
            f"Received: values of shape {list(array.shape)}."
        )
    proto.tensor_shape.CopyFrom(_shape_proto(target_shape))
    if datatype == DT_STRING:
        proto.string_val.extend([_as_bytes(item) for item in array.reshape(-1)[: 1 if broadcast else None].tolist()])
    elif form == "content" and not broadcast:
        # Little-endian C order is the wire format; tobytes copies in C order, and only a big-endian array is cast.
        little = array.astype(array.dtype.newbyteorder("<")) if array.dtype.byteorder == ">" else array
        proto.tensor_content = little.tobytes()
    elif form in ("content", "values"):
        _append_values(proto, array.reshape(-1)[:1] if broadcast else array.reshape(-1), datatype)
    else:
        raise CodecError(f"Unknown form. Expected 'content' or 'values'; fix form=. Received: {form!r}.")
    return proto


@functools.lru_cache(maxsize=256)
def _shape_proto(shape: tuple[int, ...]) -> Any:
    # Shapes repeat across requests; building the message once per shape saves a noticeable share of small encodes.
    return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape])


def _append_values(proto: Any, flat: np.ndarray, datatype: int) -> None:
    field = DATATYPES[datatype].field
    if field in _FIXED_WIDTH:
        # Floats and complex parts travel as packed little-endian bytes: merging them as serialized bytes copies the
        # array once, where ``extend(flat.tolist())`` builds a Python float per value (about 8x the array, briefly).
        raw = np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("<")).view(_FIXED_WIDTH[field]).tobytes()
        proto.MergeFromString(length_delimited(_FIELD_NUMBERS[field], len(raw)) + raw)
    elif field == "half_val":
        proto.half_val.extend(flat.view(np.uint16).tolist())
    else:
        getattr(proto, field).extend(flat.tolist())


def decode(proto: Any, *, writable: bool = False, policy: Policy = Policy.STRICT) -> np.ndarray:
    """Decode a ``TensorProto`` message into a numpy array, from ``tensor_content`` or from its typed ``*_val`` field.

    Same rules and errors as ``decode_bytes``, read from the message's fields: numpy copies a repeated field of the
    C++/upb message in one call, where ``tf.make_ndarray`` builds a Python object per value.

    Args:
        proto: a ``TensorProto`` (from a ``PredictResponse.outputs`` map, for instance).
        writable: return an array that can be modified in place (else it may be a read-only view).
        policy: what to do with values the shape does not need (see ``Policy``); ``STRICT`` unless you are a server.

    Returns:
        The array; strings come back as an ``object`` array of ``bytes``.

    Raises:
        TensorDecodeError: unsupported dtype, unknown dimensions, or values the policy refuses.

    Example:
        >>> decode(encode(np.arange(3, dtype=np.int64))).tolist()
        [0, 1, 2]
    """
    shape_proto = proto.tensor_shape
    known, shape = _checked_header(proto.dtype, [dim.size for dim in shape_proto.dim], shape_proto.unknown_rank)
    return _assemble(known, shape, proto.tensor_content, lambda: _read_repeated(proto, known, policy), policy, writable)


def _checked_header(datatype: int, dims: list[int], unknown_rank: bool) -> tuple[Datatype, tuple[int, ...]]:
    """The dtype's row and the shape, refusing an unknown shape (then an unsupported dtype) as TensorFlow does."""
    if unknown_rank or min(dims, default=0) < 0:
        raise TensorDecodeError(
            "Cannot decode a tensor whose shape is not fully known. Expected non-negative sizes for every "
            f"dimension; a concrete tensor always has them. Received: shape={dims}, unknown_rank={unknown_rank}.",
            reason="tensor_shape has unknown_rank set; a request tensor needs a full shape"
            if unknown_rank
            else f"tensor_shape {dims} has a negative dimension",
        )
    known = DATATYPES.get(datatype)
    if known is None:
        raise TensorDecodeError(
            f"Cannot decode a tensor of dtype {dtype_name(datatype)}. Expected one of {', '.join(SUPPORTED_DTYPES)}; "
            f"return a plain numeric or string tensor from the signature. Received: dtype={dtype_name(datatype)}.",
            reason=f"dtype {_DT.Name(datatype) if datatype in _DT.values() else datatype} is not supported",
        )
    return known, tuple(dims)


def _assemble(
    known: Datatype,
    shape: tuple[int, ...],
    content: bytes | memoryview | None,
    read_values: Callable[[], np.ndarray],
    policy: Policy,
    writable: bool,
) -> np.ndarray:
    """The array from ``tensor_content`` when present, else from the typed values (read only when needed)."""
    num_elements = math.prod(shape)
    if num_elements == 0 and policy is Policy.FROM_PROTO:
        return np.empty(shape, dtype=known.numpy)  # FromProto reads no value for an empty shape
    if content is not None and len(content):
        flat = _from_content(content, known, shape, num_elements)
    else:
        flat = read_values()
    array = _fill(flat, num_elements, shape, known, policy).reshape(shape)
    return array.copy() if writable and not array.flags.writeable else array


def _read_repeated(proto: Any, known: Datatype, policy: Policy) -> np.ndarray:
    """A message's typed field as a flat array (one numpy call: the repeated field hands numpy its values)."""
    values = getattr(proto, known.field)
    dtype = known.numpy
    if known.enum == DT_STRING:
        flat = np.empty(len(values), dtype=object)
        flat[:] = list(values)
        return flat
    if dtype.kind == "c":
        parts = np.array(values, dtype=np.float32 if dtype.itemsize == 8 else np.float64)
        return _complex_pairs(parts, known.field, policy).view(dtype)
    if known.field == "half_val":
        return np.array(values).astype(np.uint16).view(dtype)  # bit patterns, in an int32 field
    try:
        # upb hands numpy a typed buffer, cast unchecked: narrower integers from int_val wrap as C++'s copy does.
        return np.array(values, dtype=dtype)
    except OverflowError:  # the pure-Python protobuf backend gives Python ints, which numpy range-checks
        return np.array(values, dtype=np.int64 if dtype.kind == "i" else np.uint64).astype(dtype)


def _fill(flat: np.ndarray, num_elements: int, shape: tuple[int, ...], known: Datatype, policy: Policy) -> np.ndarray:
    """Fit the values read to the shape: TensorFlow's rule for short lists, the policy's for long ones.

    Short: repeat the last value; no value means zeros (empty strings), as ``FromProtoField`` and ``tf.make_ndarray``
    both do.
    """
    if flat.size == num_elements:
        return flat
    if flat.size > num_elements:
        if policy is Policy.FROM_PROTO:
            return flat[:num_elements]
        raise TensorDecodeError(
            f"Cannot decode {flat.size} values into a {known.name} tensor of shape {list(shape)}. Expected at most "
            f"{num_elements}; the sender wrote a corrupt tensor. Received: {flat.size} values.",
            reason=f"{flat.size} values for shape {list(shape)}, which has {num_elements} elements",
        )
    if flat.size == 0:
        if flat.dtype == object:
            filled = np.empty(num_elements, dtype=object)
            filled[:] = [b""] * num_elements
            return filled
        return np.zeros(num_elements, dtype=flat.dtype)
    filled = np.empty(num_elements, dtype=flat.dtype)
    filled[: flat.size] = flat
    filled[flat.size :] = flat[-1]
    return filled


# ------------------------------------------------------------------------------------------------------ wire format
# TensorProto field numbers (tensorflow/core/framework/tensor.proto) and how each repeated field is laid out.
_DTYPE_FIELD, _SHAPE_FIELD, _CONTENT_FIELD, _STRING_FIELD = 1, 2, 4, 8
_SHAPE_DIM_FIELD, _SHAPE_UNKNOWN_RANK_FIELD, _DIM_SIZE_FIELD = 2, 3, 1
_FIELD_NUMBERS = {
    "float_val": 5, "double_val": 6, "int_val": 7, "scomplex_val": 9, "int64_val": 10, "bool_val": 11,
    "dcomplex_val": 12, "half_val": 13, "uint32_val": 16, "uint64_val": 17,
}  # fmt: skip
_FIXED_WIDTH = {"float_val": "<f4", "double_val": "<f8", "scomplex_val": "<f4", "dcomplex_val": "<f8"}
_VALUE_FIELDS_BY_NUMBER = {number: name for name, number in _FIELD_NUMBERS.items()}
_SMALL_VARINT_BYTES = 16_384  # below this, one pass over all bytes beats one pass per byte position (measured)


@functools.lru_cache(maxsize=256)
def _tensor_header(datatype: int, shape: tuple[int, ...]) -> bytes:
    """dtype and tensor_shape fields on the wire; cached, since a service sends the same few shapes over and over."""
    dims = b"".join(
        length_delimited(_SHAPE_DIM_FIELD, len(body)) + body
        for body in (
            (field_key(_DIM_SIZE_FIELD, WIRE_VARINT) + encode_varint(size)) if size else b"" for size in shape
        )
    )
    dtype_field = field_key(_DTYPE_FIELD, WIRE_VARINT) + encode_varint(datatype)
    return dtype_field + length_delimited(_SHAPE_FIELD, len(dims)) + dims


def tensor_pieces(
    values: Any, *, dtype: Any = None, shape: tuple[int, ...] | list[int] | None = None, form: Form = "content"
) -> tuple[list[bytes | memoryview], int]:
    """A serialized ``TensorProto`` as buffers to concatenate, and their total length.

    Why pieces: the array's own memory is one of them, so whoever frames the tensor into a larger message (the
    client's PredictRequest) copies it exactly once. Arguments as for ``encode``.
    """
    array = _as_array(values, dtype)
    datatype = datatype_of(array.dtype)
    if form != "content" or datatype == DT_STRING or (shape is not None and tuple(shape) != array.shape):
        serialized = encode(array, shape=shape, form=form).SerializeToString()
        return [serialized], len(serialized)
    if array.dtype.byteorder == ">" or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    header = _tensor_header(datatype, array.shape)
    if array.nbytes == 0:
        return [header], len(header)
    content = length_delimited(_CONTENT_FIELD, array.nbytes)
    body = array.reshape(-1).view(np.uint8).data
    return [header, content, body], len(header) + len(content) + array.nbytes


def encode_bytes(
    values: Any, *, dtype: Any = None, shape: tuple[int, ...] | list[int] | None = None, form: Form = "content"
) -> bytes:
    """Encode straight to the serialized bytes of a ``TensorProto``, copying the array's memory once.

    Byte-identical to ``encode(...).SerializeToString()`` (and to ``tf.make_tensor_proto(...)`` for the dtypes it
    writes as ``tensor_content``). Arguments as for ``encode``.
    """
    pieces, _ = tensor_pieces(values, dtype=dtype, shape=shape, form=form)
    return pieces[0] if len(pieces) == 1 and isinstance(pieces[0], bytes) else b"".join(pieces)


def decode_bytes(data: bytes | memoryview, *, writable: bool = False, policy: Policy = Policy.STRICT) -> np.ndarray:
    """Decode a serialized ``TensorProto`` without building the message: arrays are views of ``data`` where possible.

    Why: ``tensor_content`` and the packed fixed-width fields (``float_val``, ``double_val``, complex) already are the
    array's bytes, so they become numpy views of the received buffer; the varint fields (``int_val``, ``int64_val``,
    ``half_val``, ``bool_val``...) are decoded with vectorised numpy instead of one Python int at a time. Under
    ``Policy.STRICT``, results and errors match ``tf.make_ndarray(TensorProto.FromString(data))``; under
    ``Policy.FROM_PROTO``, TensorFlow's ``Tensor::FromProto``.

    Args:
        data: the serialized tensor (``bytes``, or a ``memoryview`` into a larger message).
        writable: return an array that can be modified in place (else it may be a read-only view of ``data``).
        policy: what to do with values the shape does not need (see ``Policy``).

    Raises:
        TensorDecodeError: unsupported dtype, unknown dimensions, or values the policy refuses.
        WireFormatError: bytes that are not a protocol buffer.
    """
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    datatype, dims, unknown_rank, content, chunks, strings = _parse_tensor(view)
    known, shape = _checked_header(datatype, dims, unknown_rank)

    def read_values() -> np.ndarray:
        if datatype == DT_STRING:
            flat = np.empty(len(strings), dtype=object)
            flat[:] = [bytes(item) for item in strings]
            return flat
        return _read_packed(chunks.get(_FIELD_NUMBERS[known.field], []), known, policy)

    return _assemble(known, shape, content, read_values, policy, writable)


def _from_content(
    content: bytes | memoryview, known: Datatype, shape: tuple[int, ...], num_elements: int
) -> np.ndarray:
    """``tensor_content`` as a view: exactly the shape's bytes (``Helper<T>::Decode``), never for strings."""
    if known.enum == DT_STRING:
        raise TensorDecodeError(
            f"Cannot decode a string tensor from {len(content)} bytes of tensor_content. Expected its values in "
            "string_val, where tf.make_tensor_proto writes them; the sender wrote a tensor this codec does not read. "
            "Received: tensor_content.",
            reason="string tensors cannot use tensor_content; use string_val",
        )
    expected = num_elements * known.numpy.itemsize
    if len(content) != expected:
        raise TensorDecodeError(
            f"Cannot decode tensor_content of {len(content)} bytes as {known.name}{list(shape)}. Expected {expected} "
            f"bytes ({num_elements} elements x {known.numpy.itemsize}); the sender wrote a corrupt tensor. "
            f"Received: {len(content)} bytes.",
            reason=f"tensor_content holds {len(content)} bytes but shape {list(shape)} of "
            f"{datatype_string(known.enum)} needs {expected}",
        )
    return np.frombuffer(content, dtype=known.numpy)


def _parse_tensor(
    view: memoryview,
) -> tuple[int, list[int], bool, memoryview | None, dict[int, list[memoryview | bytes]], list[memoryview]]:
    """(dtype, dims, unknown_rank, tensor_content, raw bytes of each numeric repeated field, string_val items)."""
    datatype = 0
    dims: list[int] = []
    unknown_rank = False
    content: memoryview | None = None
    chunks: dict[int, list[memoryview | bytes]] = {}
    strings: list[memoryview] = []
    for number, wire_type, value in iter_fields(view):
        if number == _DTYPE_FIELD and wire_type == WIRE_VARINT:
            datatype = value
        elif number == _SHAPE_FIELD and wire_type == WIRE_LENGTH_DELIMITED:
            unknown_rank = _parse_shape(value, dims) or unknown_rank
        elif number == _CONTENT_FIELD and wire_type == WIRE_LENGTH_DELIMITED:
            content = value
        elif number == _STRING_FIELD and wire_type == WIRE_LENGTH_DELIMITED:
            strings.append(value)
        elif number in _VALUE_FIELDS_BY_NUMBER:
            chunks.setdefault(number, []).append(_as_packed(number, wire_type, value))
    return datatype, dims, unknown_rank, content, chunks, strings


def _parse_shape(view: memoryview, dims: list[int]) -> bool:
    """Append the dimensions of a TensorShapeProto to ``dims``; return its unknown_rank flag."""
    unknown_rank = False
    for number, wire_type, value in iter_fields(view):
        if number == _SHAPE_DIM_FIELD and wire_type == WIRE_LENGTH_DELIMITED:
            size = 0
            for dim_number, dim_wire_type, dim_value in iter_fields(value):
                if dim_number == _DIM_SIZE_FIELD and dim_wire_type == WIRE_VARINT:
                    size = dim_value - (1 << 64) if dim_value >= 1 << 63 else dim_value  # int64 on the wire
            dims.append(size)
        elif number == _SHAPE_UNKNOWN_RANK_FIELD and wire_type == WIRE_VARINT:
            unknown_rank = bool(value)
    return unknown_rank


def _as_packed(number: int, wire_type: int, value: Any) -> memoryview | bytes:
    """The bytes one occurrence of a repeated numeric field adds to its packed form.

    Packed is what every serializer TF Serving uses writes, but parsers must also accept one key per value: a
    fixed-width value's bytes and a re-encoded varint are exactly what that value contributes to the packed form.
    """
    if wire_type == WIRE_LENGTH_DELIMITED:
        return cast(memoryview, value)  # already the packed form
    name = _VALUE_FIELDS_BY_NUMBER[number]
    expected = {"float_val": WIRE_FIXED32, "scomplex_val": WIRE_FIXED32, "double_val": WIRE_FIXED64,
                "dcomplex_val": WIRE_FIXED64}.get(name, WIRE_VARINT)  # fmt: skip
    if wire_type != expected:
        raise WireFormatError(
            f"Malformed {name}: wire type {wire_type}. Expected the packed form or wire type {expected}; the sender "
            "wrote a corrupt tensor. Received: a field of the wrong type."
        )
    return encode_varint(value) if wire_type == WIRE_VARINT else cast(memoryview, value)


def _read_packed(chunks: list[memoryview | bytes], known: Datatype, policy: Policy) -> np.ndarray:
    if len(chunks) == 1:
        raw = memoryview(chunks[0])
    else:  # absent (no values), or split over several occurrences, which protobuf concatenates
        raw = memoryview(b"".join(chunks))
    field, dtype = known.field, known.numpy
    if field in _FIXED_WIDTH:
        width = np.dtype(_FIXED_WIDTH[field]).itemsize
        if len(raw) % width:
            raise WireFormatError(
                f"Malformed {field}: {len(raw)} bytes is not a whole number of {width}-byte values. Expected a packed "
                "field written by a protobuf serializer. Received: a truncated field."
            )
        parts = np.frombuffer(raw, dtype=_FIXED_WIDTH[field])
        if dtype.kind == "c":
            return _complex_pairs(parts, field, policy).view(dtype)
        return parts.astype(dtype, copy=False)
    varints = _decode_varints(raw)
    if field == "half_val":
        return varints.astype(np.uint16).view(dtype)
    if field == "bool_val":
        return varints.astype(bool)
    if dtype.kind == "i":
        return varints.view(np.int64).astype(dtype)  # negative int32 values are sign-extended to 64 bits
    return varints.astype(dtype)


def _complex_pairs(parts: np.ndarray, field: str, policy: Policy) -> np.ndarray:
    """(real, imaginary) parts, whole pairs only: FromProto counts ``size() / 2`` elements; STRICT refuses a spare."""
    if parts.size % 2 == 0:
        return parts
    if policy is Policy.FROM_PROTO:
        return parts[:-1]
    raise TensorDecodeError(
        f"Cannot decode {field} with an odd number of parts. Expected (real, imaginary) pairs; the "
        f"sender wrote a corrupt tensor. Received: {parts.size} parts.",
        reason=f"{field} holds {parts.size} parts, not (real, imaginary) pairs",
    )


def _decode_varints(raw: memoryview) -> np.ndarray:
    """Decode packed base-128 varints with numpy: each value ends at its first byte below 0x80.

    Large fields take one vectorised pass per byte position (at most 10, usually 1 or 2) over the values that long;
    small ones one pass over all bytes. Either way no Python step per value.
    """
    data = np.frombuffer(raw, dtype=np.uint8)
    if data.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if data[-1] >= 0x80:
        raise WireFormatError(
            "Malformed packed varints: the last value is truncated. Expected a packed field written by a protobuf "
            "serializer. Received: a truncated field."
        )
    ends = np.flatnonzero(data < 0x80)
    if ends.size == data.size:
        return data.astype(np.uint64)  # every value fits in one byte (small ints, bools)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise WireFormatError(
            "Malformed packed varints: a value is longer than 10 bytes. Expected a packed field written by a protobuf "
            "serializer. Received: a corrupted field."
        )
    if data.size < _SMALL_VARINT_BYTES:
        # Few bytes: numpy's per-call overhead dominates, so do it in one pass over every byte.
        offsets = np.arange(data.size) - np.repeat(starts, lengths)
        return np.bitwise_or.reduceat((data & 0x7F).astype(np.uint64) << (offsets * 7).astype(np.uint64), starts)
    values = (data[starts] & 0x7F).astype(np.uint64)
    for position in range(1, int(lengths.max())):
        longer = np.flatnonzero(lengths > position)
        values[longer] |= (data[starts[longer] + position] & 0x7F).astype(np.uint64) << np.uint64(7 * position)
    return values
