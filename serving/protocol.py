"""TF Serving's generated protocol modules, loaded without the TensorFlow runtime, and the client's errors.

Why: ``tensorflow_serving/apis/*_pb2.py`` import ``tensorflow.core.framework.*_pb2`` (and ``tensorflow.core.protobuf``,
``tensorflow.compiler.xla.tsl.protobuf``). Those are plain generated modules in plain packages whose ``__init__.py``
files are empty, but Python imports a parent package before its children, and the parent here is ``tensorflow``,
whose ``__init__.py`` loads the whole runtime: seconds of start-up and hundreds of MB per client process
(tensorflow/serving#271, #557, #2140).

How: while the generated modules are imported, ``sys.modules["tensorflow"]`` holds a stand-in package, an empty module
whose ``__path__`` is the real ``tensorflow`` directory. ``importlib.util.find_spec("tensorflow")`` locates that
directory without executing anything (it is a top-level name; ``find_spec`` of a *sub*module would import its parent).
The real sub-packages (``tensorflow.core``, ``tensorflow.core.framework``, ...) and the ``*_pb2`` modules are then
found and executed normally through that path. Afterwards the stand-in is removed, so:

* a later ``import tensorflow`` executes the real ``tensorflow/__init__.py`` as if nothing had happened;
* the ``*_pb2`` modules stay registered under their real names, so TensorFlow reuses them instead of executing them
  again: each ``.proto`` file is added to protobuf's default descriptor pool once, and ``tf.make_tensor_proto`` returns
  instances of the very ``TensorProto`` class this module exposes (whatever the protobuf backend);
* if TensorFlow is already imported (or being imported), nothing is faked: the modules are imported normally.

The swap is guarded by a lock so two threads of this module cannot interleave; a thread importing TensorFlow itself at
the same instant could observe the stand-in, so import ``serving`` modules at start-up, as usual for imports.

The errors every client-side module raises live here too, with the mapping from gRPC status codes, because both are
properties of the wire protocol rather than of any one caller.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import grpc

_RUNTIME_PACKAGE = "tensorflow"
_SWAP_LOCK = threading.Lock()


class ServingError(Exception):
    """Base class of every error the TensorFlow-free client raises; catch it to handle all of them."""

    code: str | None = None
    """The gRPC status code name behind the error (``"NOT_FOUND"``...), or None for client-side problems."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ProtocolImportError(ServingError, ImportError):
    """The generated TF Serving modules could not be found (the ``tensorflow-serving-api`` install is incomplete)."""


class ServerUnavailableError(ServingError):
    """The server could not be reached (gRPC UNAVAILABLE), after the channel's retries."""

    code = "UNAVAILABLE"


class DeadlineExceededError(ServingError, TimeoutError):
    """A call did not finish within its deadline (gRPC DEADLINE_EXCEEDED)."""

    code = "DEADLINE_EXCEEDED"


class ModelNotFoundError(ServingError, LookupError):
    """The model, version or version label is not served (gRPC NOT_FOUND, or INVALID_ARGUMENT for a label)."""

    code = "NOT_FOUND"


class SignatureNotFoundError(ServingError, LookupError):
    """The model has no signature of that name (TF Serving answers FAILED_PRECONDITION)."""

    code = "FAILED_PRECONDITION"


class InvalidRequestError(ServingError, ValueError):
    """The request was malformed: wrong input names, dtypes or shapes, or contradictory arguments."""

    code = "INVALID_ARGUMENT"


class ClientConfigError(ServingError, ValueError):
    """A client setting is invalid (a ``RetryPolicy`` outside gRPC's limits): a caller's mistake, found before any
    call, so no gRPC status code stands behind it."""


class CodecError(ServingError, ValueError):
    """An array could not be encoded into, or decoded from, a ``TensorProto``."""


class DataError(ServingError, ValueError):
    """An input file (``.npz``/``.npy``) does not match the model's signature."""


class WireFormatError(CodecError):
    """Bytes that are not a well-formed protocol buffer (truncated, or a varint longer than 10 bytes)."""


def _import_without_runtime(module_names: tuple[str, ...]) -> dict[str, types.ModuleType]:
    """Import generated modules under ``tensorflow.*`` without executing ``tensorflow/__init__.py``."""
    with _SWAP_LOCK:
        if _RUNTIME_PACKAGE in sys.modules:
            # TensorFlow (or another stand-in) is already there: the parent exists, import normally.
            return {name: importlib.import_module(name) for name in module_names}
        spec = importlib.util.find_spec(_RUNTIME_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ProtocolImportError(
                "Cannot load TF Serving's protocol modules: the 'tensorflow' package directory (which holds the "
                "generated tensorflow.core protos they import) was not found. Expected the 'tensorflow' and "
                "'tensorflow-serving-api' distributions to be installed; fix with `pip install tensorflow-serving-api`."
                f" Received: find_spec('tensorflow') = {spec!r}."
            )
        standin = types.ModuleType(_RUNTIME_PACKAGE, "Stand-in package used only while importing generated protos.")
        standin.__path__ = list(spec.submodule_search_locations)
        standin.__spec__ = importlib.machinery.ModuleSpec(_RUNTIME_PACKAGE, None, is_package=True)
        standin.__spec__.submodule_search_locations = standin.__path__
        sys.modules[_RUNTIME_PACKAGE] = standin
        try:
            return {name: importlib.import_module(name) for name in module_names}
        finally:
            # Only the stand-in goes; the generated submodules stay so TensorFlow reuses them (see module docstring).
            if sys.modules.get(_RUNTIME_PACKAGE) is standin:
                del sys.modules[_RUNTIME_PACKAGE]


_MODULES = _import_without_runtime(
    (
        "tensorflow.core.framework.types_pb2",
        "tensorflow.core.framework.tensor_shape_pb2",
        "tensorflow.core.framework.tensor_pb2",
        "tensorflow.core.protobuf.meta_graph_pb2",
        "tensorflow.core.example.example_pb2",
        "tensorflow_serving.apis.model_pb2",
        "tensorflow_serving.apis.predict_pb2",
        "tensorflow_serving.apis.get_model_metadata_pb2",
        "tensorflow_serving.apis.get_model_status_pb2",
        "tensorflow_serving.apis.prediction_service_pb2_grpc",
        "tensorflow_serving.apis.model_service_pb2_grpc",
    )
)

types_pb2: Any = _MODULES["tensorflow.core.framework.types_pb2"]
tensor_shape_pb2: Any = _MODULES["tensorflow.core.framework.tensor_shape_pb2"]
tensor_pb2: Any = _MODULES["tensorflow.core.framework.tensor_pb2"]
meta_graph_pb2: Any = _MODULES["tensorflow.core.protobuf.meta_graph_pb2"]
example_pb2: Any = _MODULES["tensorflow.core.example.example_pb2"]  # tf.Example, for TFRecord evaluation data
model_pb2: Any = _MODULES["tensorflow_serving.apis.model_pb2"]
predict_pb2: Any = _MODULES["tensorflow_serving.apis.predict_pb2"]
get_model_metadata_pb2: Any = _MODULES["tensorflow_serving.apis.get_model_metadata_pb2"]
get_model_status_pb2: Any = _MODULES["tensorflow_serving.apis.get_model_status_pb2"]
prediction_service_pb2_grpc: Any = _MODULES["tensorflow_serving.apis.prediction_service_pb2_grpc"]
model_service_pb2_grpc: Any = _MODULES["tensorflow_serving.apis.model_service_pb2_grpc"]

TensorProto: Any = tensor_pb2.TensorProto
PredictRequest: Any = predict_pb2.PredictRequest
PredictResponse: Any = predict_pb2.PredictResponse
GetModelMetadataRequest: Any = get_model_metadata_pb2.GetModelMetadataRequest
GetModelStatusRequest: Any = get_model_status_pb2.GetModelStatusRequest
PredictionServiceStub: Any = prediction_service_pb2_grpc.PredictionServiceStub
ModelServiceStub: Any = model_service_pb2_grpc.ModelServiceStub

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
"""Fully qualified gRPC service names, used to scope the retry policy in the channel's service config."""
MODEL_SERVICE = "tensorflow.serving.ModelService"

SIGNATURE_DEF_METADATA_FIELD = "signature_def"
"""The only ``metadata_field`` TF Serving answers in GetModelMetadata; the reply packs a ``SignatureDefMap``."""


def error_from_rpc(error: grpc.RpcError, *, what: str) -> ServingError:
    """Translate a failed gRPC call into the matching ``ServingError`` subclass.

    Why: callers (and the CLI) handle "server down", "no such model" and "bad input" differently; a bare
    ``grpc.RpcError`` makes them parse status codes themselves.

    Args:
        error: the exception raised by a stub call (it is also a ``grpc.Call`` with ``code()``/``details()``).
        what: a short description of the call for the message, e.g. ``"Predict(model='m', signature='serve_ema')"``.

    Returns:
        The translated error; raise it ``from error``.
    """
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    name = code.name if code is not None else "UNKNOWN"
    received = f"Received: {name}: {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailableError(
            f"{what} failed: the server is unreachable. Expected a TF Serving gRPC endpoint at the target; check the "
            f"host:port (--target) and that the server is running. {received}"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(
            f"{what} failed: no answer within the deadline. Expected the call to finish in time; raise the timeout "
            f"(--timeout) or send smaller batches. {received}"
        )
    if code == grpc.StatusCode.NOT_FOUND or "version label" in (details or ""):
        return ModelNotFoundError(
            f"{what} failed: the model, version or label is not served. Expected a name and version the server "
            f"loaded; check --model/--version/--version-label against `ema-serving status`. {received}",
            code=name,
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION and "signature" in (details or "").lower():
        return SignatureNotFoundError(
            f"{what} failed: the model has no such signature. Expected one of the export's signatures; list them "
            f"with `ema-serving metadata`. {received}"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(
            f"{what} failed: the server rejected the request. Expected inputs matching the signature's names, "
            f"dtypes and shapes; compare them with `ema-serving metadata`. {received}"
        )
    return ServingError(f"{what} failed with gRPC status {name}. {received}", code=name)


# ------------------------------------------------------------------------------------------------------ wire format
# The few protobuf wire-format primitives the codec and the client need to read and write TensorProto and the
# Predict messages as bytes. Why by hand: going through message objects costs a copy of every tensor per step
# (array -> bytes -> message -> serialized, and back), and reading TF Serving's default ``float_val`` answers through
# a message iterates over Python floats. Written directly, a tensor is one join of its bytes, and a packed fixed-width
# field is a numpy view of the received buffer. https://protobuf.dev/programming-guides/encoding/

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LENGTH_DELIMITED = 2
WIRE_FIXED32 = 5


def encode_varint(value: int) -> bytes:
    """Base-128 varint; negative numbers as their 64-bit two's complement (10 bytes), as protobuf's int32/int64."""
    if value < 0:
        value += 1 << 64
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_key(field_number: int, wire_type: int) -> bytes:
    """The key (tag) that starts a field on the wire."""
    return encode_varint(field_number << 3 | wire_type)


def length_delimited(field_number: int, payload_length: int) -> bytes:
    """Key and length prefix of a length-delimited field whose payload (written next) has ``payload_length`` bytes."""
    return field_key(field_number, WIRE_LENGTH_DELIMITED) + encode_varint(payload_length)


def _read_varint(data: memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    end = len(data)
    while position < end:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
        if shift >= 70:
            break
    raise WireFormatError(
        "Malformed protocol buffer: a varint is truncated or longer than 10 bytes. Expected bytes written by a "
        "protobuf serializer; the message was corrupted in transit or is not a protobuf. "
        f"Received: {len(data)} bytes."
    )


def iter_fields(data: memoryview) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(field number, wire type, value)`` for each field of a serialized message, in wire order.

    ``value`` is an int for varints, else a zero-copy ``memoryview`` of the field's bytes (for fixed32/fixed64, the
    4 or 8 raw little-endian bytes). Group wire types (deprecated, unused by TF Serving) are refused.
    """
    position, end = 0, len(data)
    while position < end:
        # Keys, lengths and small values are one byte almost always: read those inline, the rest in _read_varint.
        key = data[position]
        if key < 0x80:
            position += 1
        else:
            key, position = _read_varint(data, position)
        field_number, wire_type = key >> 3, key & 7
        value: int | memoryview
        if wire_type == WIRE_VARINT:
            value, position = _read_varint(data, position)
        elif wire_type == WIRE_LENGTH_DELIMITED:
            length = data[position] if position < end else 0x80
            if length < 0x80:
                position += 1
            else:
                length, position = _read_varint(data, position)
            value, position = data[position : position + length], position + length
        elif wire_type in (WIRE_FIXED32, WIRE_FIXED64):
            width = 4 if wire_type == WIRE_FIXED32 else 8
            value, position = data[position : position + width], position + width
        else:
            raise WireFormatError(
                f"Malformed or unsupported protocol buffer: wire type {wire_type} in field {field_number}. Expected "
                "varint, fixed32, fixed64 or length-delimited fields. Received: a group or a corrupted key."
            )
        if position > end:
            raise WireFormatError(
                f"Malformed protocol buffer: field {field_number} runs past the end of the message. Expected complete "
                f"fields; the message was truncated. Received: {end} bytes."
            )
        yield field_number, wire_type, value
