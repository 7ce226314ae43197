"""The REST front end (``--rest-api-port``): TF Serving's ``/v1/models/...`` API over the same model manager.

Routes, JSON shapes, HTTP codes and messages follow TF Serving (``model_servers/http_server.cc``,
``http_rest_api_handler.cc``, ``http_rest_api_util.cc``, ``util/json_tensor.cc``, ``g3doc/api_rest.md``):

* Only paths matching ``(?i)/v1/.*`` reach the API (http_rest_api_util.h:33); anything else gets libevent's plain
  HTML 404 page, as TF Serving's HTTP server sends it (evhttp_server.cc:175-178).
* ``OPTIONS`` (a CORS preflight) is 200 with an empty body when an ``Origin`` header names an http(s) origin, else
  400, also empty (http_server.cc:170-178).
* ``GET /v1/models/NAME[/versions/N|/labels/L]``: GetModelStatus as JSON (``model_version_status``).
* ``GET /v1/models/NAME[/versions/N|/labels/L]/metadata``: ``{"model_spec": ..., "metadata": {"signature_def": ...}}``.
* ``POST /v1/models/NAME[/versions/N|/labels/L]:predict`` with ``signature_name`` and either ``instances`` (row
  form, answered as ``predictions``) or ``inputs`` (column form, answered as ``outputs``). Binary strings travel as
  ``{"b64": "..."}``; string outputs whose name ends in ``_bytes`` are answered that way. JSON numbers are converted
  as rapidjson converts them (a float is cast, never range-checked), and the tensor then runs through the same
  Predict path as gRPC, so the graph, not this module, judges dtype and shape.
* ``:classify`` and ``:regress`` get TF Serving's request and signature checks, then UNIMPLEMENTED.
* Errors are ``{"error": "<message>"}`` with TF Serving's mapping of status codes to HTTP codes; messages that quote
  the request (``JSON Value: ...``) quote it as rapidjson's pretty writer does, cut at 256 bytes (json_tensor.cc:229).

The HTTP server is the standard library's threading server: one thread per connection. Bodies are read as libevent
(TF Serving's HTTP library) reads them: Content-Length or chunked, refused above ``--max-request-bytes``. A stop
closes idle connections at once and lets requests being answered finish, within the grace period.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2

from ema_export.contracts import SIGNATURE_DEFAULT
from serving import codec
from serving.server import tensors
from serving.server.errors import RpcStatus, invalid_argument
from serving.server.grpc_service import SIGNATURE_DEF_FIELD, get_model_metadata, get_model_status
from serving.server.manager import ModelManager
from serving.server.servable import (
    LoadedVersion,
    Signature,
    check_classification_signature,
    check_regression_signature,
)

logger = logging.getLogger("serving.server")

_API_PATH = re.compile(r"/v1/.*", re.IGNORECASE | re.DOTALL)
_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.IGNORECASE
)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.IGNORECASE
)
_CORS_ORIGIN = re.compile(r"https?://")
_BYTES_SUFFIX = "_bytes"
_JSON_CONTENT_TYPE = "application/json"
_LIBEVENT_CONTENT_TYPE = "text/html; charset=ISO-8859-1"
"""libevent's default Content-Type, which its error pages go out with."""

_MAX_JSON_DEBUG_BYTES = 256
"""json_tensor.cc's kMaxJsonDebugStringBytes: how much of a JSON value an error message quotes."""

# TF Serving's ToHTTPStatusCode (model_servers/http_server.cc).
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


@dataclass(frozen=True)
class RestResponse:
    """One HTTP answer: status, body, and its Content-Type (None: no body type, as TF Serving's OPTIONS answer)."""

    status: int
    body: bytes
    content_type: str | None = _JSON_CONTENT_TYPE


def libevent_error_page(status: int) -> RestResponse:
    """The page libevent's ``evhttp_send_error`` writes (TF Serving's answer to a path outside ``/v1/``)."""
    phrase = HTTPStatus(status).phrase
    page = f"<HTML><HEAD>\n<TITLE>{status} {phrase}</TITLE>\n</HEAD><BODY>\n<H1>{phrase}</H1>\n</BODY></HTML>\n"
    return RestResponse(status, page.encode("ascii"), _LIBEVENT_CONTENT_TYPE)


class RestApi:
    """The REST API without HTTP: ``respond(method, path, body, origin)`` -> `RestResponse`."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def respond(self, method: str, path: str, body: bytes, origin: str | None = None) -> RestResponse:
        """Answer one request as TF Serving's HTTP server does (http_server.cc:131-190); never raises."""
        if not _API_PATH.fullmatch(path):
            return libevent_error_page(404)
        if method == "OPTIONS":
            allowed = origin is not None and _CORS_ORIGIN.search(origin)
            return RestResponse(200 if allowed else 400, b"", None)
        status, text = self.handle(method, path, body)
        return RestResponse(status, text.encode("utf-8"))

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, str]:
        """Answer one ``/v1/`` request with (HTTP status, JSON text); never raises."""
        try:
            return 200, self._route(method, path, body)
        except RpcStatus as status:
            return _HTTP_STATUS.get(status.code, 500), _error_json(status.message)
        except Exception as error:  # one bad request must never take the server down
            logger.exception("Unexpected error while answering %s %s", method, path)
            return 500, _error_json(f"Internal error in ema-serving: {type(error).__name__}: {error}")

    def _route(self, method: str, path: str, body: bytes) -> str:
        # http_rest_api_handler.cc:65-108: parse, then dispatch on method; anything else is "Malformed request".
        if method == "POST":
            match = _PREDICT_PATH.fullmatch(path)
            if match:
                spec = _model_spec(*match.group(1, 2, 3))
                verb = match.group(4).lower()
                if verb == "predict":
                    return self._predict(spec, body)
                return self._classify_or_regress(spec, body, verb)
        elif method == "GET":
            match = _STATUS_PATH.fullmatch(path)
            if match:
                if not match.group(1):
                    raise invalid_argument("Missing model name in request.")
                spec = _model_spec(*match.group(1, 2, 3))
                return self._metadata(spec) if match.group(4) else self._status(spec)
        raise invalid_argument(f"Malformed request: {method} {path}")

    def _status(self, spec: model_pb2.ModelSpec) -> str:
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
        response = get_model_status(self._manager, request)
        return json_format.MessageToJson(response, always_print_fields_with_no_presence=True)

    def _metadata(self, spec: model_pb2.ModelSpec) -> str:
        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=[SIGNATURE_DEF_FIELD])
        response = get_model_metadata(self._manager, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata[SIGNATURE_DEF_FIELD].Unpack(signature_map)
        options = {"preserving_proto_field_name": True, "always_print_fields_with_no_presence": True}
        document = {
            "model_spec": json_format.MessageToDict(response.model_spec, **options),
            "metadata": {SIGNATURE_DEF_FIELD: json_format.MessageToDict(signature_map, **options)},
        }
        return json.dumps(document, indent=1)

    def _predict(self, spec: model_pb2.ModelSpec, body: bytes) -> str:
        """``FillPredictRequestFromJson`` (json_tensor.cc:655-705), then Predict, then ``MakeJsonFromTensors``."""
        document = _parse_json(body)
        signature_name = _signature_name(document)
        servable = self._manager.get_servable(spec)
        key = signature_name or SIGNATURE_DEFAULT
        if key not in servable.signature_defs:  # GetInfoMap (http_rest_api_handler.cc:228-241)
            raise invalid_argument(f'Serving signature name: "{key}" not found in signature def')
        if not servable.signature_defs[key].inputs:
            raise invalid_argument(f"Failed to get input map for signature: {signature_name or 'DEFAULT'}")
        signature = servable.signatures[key]
        fast = not (b"true" in body or b"false" in body)  # numpy would read a JSON bool as a number
        if "instances" in document:
            if "inputs" in document:
                raise _format_error(document, "Not formatted correctly expecting only one of 'inputs' or 'instances' "
                                              "keys to exist ")
            instances = document["instances"]
            if not isinstance(instances, list):
                raise _format_error(document, "Expecting 'instances' to be an list/array")
            if not instances:
                raise _format_error(document, "No values in 'instances' array")
            arrays, row_format = _arrays_from_instances(instances, signature, fast), True
        elif "inputs" in document:
            arrays, row_format = _arrays_from_inputs(document["inputs"], signature, fast), False
        else:
            raise invalid_argument("Missing 'inputs' or 'instances' key")
        outputs = _run_predict(servable, key, arrays)
        return json.dumps(_predictions(outputs) if row_format else _columns(outputs))

    def _classify_or_regress(self, spec: model_pb2.ModelSpec, body: bytes, verb: str) -> str:
        """TF Serving's Classify/Regress REST checks (json_tensor.cc:818-851, classifier.cc, regressor.cc), then
        this server's one limit: it does not run tf.Example signatures."""
        document = _parse_json(body)
        signature_name = _signature_name(document)
        examples = document.get("examples")
        if "examples" not in document:
            raise _format_error(document, "When method is classify, key 'examples' is expected and was not found")
        if not isinstance(examples, list):
            raise _format_error(document, "Expecting 'examples' value to be an list/array")
        if not examples:
            raise _format_error(document, "'examples' value is an empty array")
        servable = self._manager.get_servable(spec)
        check = check_classification_signature if verb == "classify" else check_regression_signature
        check(servable, signature_name)
        raise RpcStatus(
            grpc.StatusCode.UNIMPLEMENTED,
            f":{verb} passed TF Serving's signature checks, but the ema-serving local server does not run "
            "tf.Example signatures; use :predict",
        )


def _error_json(message: str) -> str:
    """``MakeJsonFromStatus`` (json_tensor.cc:1129-1139): ``{"error": ...}`` from rapidjson's pretty writer."""
    return json.dumps({"error": message}, indent=4, ensure_ascii=False)


def _run_predict(servable: LoadedVersion, key: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Predict that TF Serving's REST handler calls: method check, then the session run."""
    signature = servable.signature(key)
    return signature.run(arrays)


def _model_spec(name: str, version: str | None, label: str | None) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=unquote(name))
    if version is not None:
        try:
            spec.version.value = int(version)
        except ValueError:
            raise invalid_argument(f"Failed to convert version: {version} to numeric.") from None
    if label is not None:
        spec.version_label = unquote(label)
    return spec


_RAPIDJSON_PARSE_ERRORS = {
    "Expecting value": "Invalid value.",
    "Expecting property name enclosed in double quotes": "Missing a name for object member.",
    "Expecting ':' delimiter": "Missing a colon after a name of object member.",
    "Unterminated string starting at": "Missing a closing quotation mark in string.",
    "Invalid \\escape": "Invalid escape character in string.",
    "Invalid \\uXXXX escape": "Incorrect hex digit after \\u escape in string.",
}
"""Python's JSON errors in rapidjson's words (``GetParseError_En``), where one maps to the other."""

_JSON_DECODER = json.JSONDecoder()


def _parse_json(body: bytes) -> dict[str, Any]:
    """``ParseJson`` (json_tensor.cc:473-502): non-empty, valid JSON, an object.

    Like rapidjson with ``kParseStopWhenDoneFlag``, parsing stops after the first complete value: whatever follows
    it is ignored, not refused.
    """
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        text = body.decode("utf-8")
        start = len(text) - len(text.lstrip(" \t\n\r"))
        if start == len(text):
            raise invalid_argument(f"JSON Parse error: The document is empty. at offset: {start}")
        document, _ = _JSON_DECODER.raw_decode(text, start)
    except UnicodeDecodeError as error:
        raise invalid_argument(f"JSON Parse error: Invalid encoding in string. at offset: {error.start}") from None
    except json.JSONDecodeError as error:
        reason = _RAPIDJSON_PARSE_ERRORS.get(error.msg, error.msg)
        raise invalid_argument(f"JSON Parse error: {reason} at offset: {error.pos}") from None
    except RecursionError:
        # TF Serving parses iteratively (kParseIterativeFlag, util/json_tensor.cc 483), so no depth breaks its parser;
        # the nesting is then refused as a tensor at the wrong level: INVALID_ARGUMENT either way, never a crash.
        raise invalid_argument(
            "JSON Parse error: the document is nested too deeply (more levels than any tensor has)"
        ) from None
    if not isinstance(document, dict):
        raise _format_error(document, "Is not object")
    return document


def _signature_name(document: Mapping[str, Any]) -> str:
    """``FillSignature`` (json_tensor.cc:504-517): an optional string."""
    name = document.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid_argument(
            f"JSON Value: {json_debug_string(document)} not formatted correctly. 'signature_name' key must be a "
            "string value."
        )
    return name


def _format_error(value: Any, text: str) -> RpcStatus:
    """json_tensor.cc's ``FormatError``: ``JSON Value: <the value, as rapidjson writes it> <text>``."""
    return invalid_argument(f"JSON Value: {json_debug_string(value)} {text}")


# ------------------------------------------------------------------------------------- JSON -> tensors (requests)


def _arrays_from_instances(instances: list[Any], signature: Signature, fast: bool) -> dict[str, np.ndarray]:
    """Row form (``FillTensorMapFromInstancesList``, json_tensor.cc:519-609): one element per example."""
    specs = signature.inputs
    if not isinstance(instances[0], dict) and len(specs) > 1:
        raise invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple input tensors required as per "
            "tensorinfo_map"
        )
    if fast:
        arrays = _fast_instances(instances, signature)
        if arrays is not None:
            return arrays
    return _exact_instances(instances, signature)


def _fast_instances(instances: list[Any], signature: Signature) -> dict[str, np.ndarray] | None:
    """numpy's reading of a dense numeric batch, or None when only the exact walk can say what TF Serving does."""
    specs = signature.inputs
    if not _is_named_object(instances[0]):
        name, spec = next(iter(specs.items()))
        array = _fast_array(instances, spec.datatype)
        return None if array is None else {name: array}
    columns: dict[str, list[Any]] = {name: [] for name in specs}
    for instance in instances:
        if not _is_named_object(instance) or instance.keys() != columns.keys():
            return None
        for name, value in instance.items():
            columns[name].append(value)
    arrays = {name: _fast_array(values, specs[name].datatype) for name, values in columns.items()}
    return None if any(array is None for array in arrays.values()) else arrays  # type: ignore[return-value]


def _exact_instances(instances: list[Any], signature: Signature) -> dict[str, np.ndarray]:
    specs = signature.inputs
    names = sorted(specs)
    as_objects = _is_named_object(instances[0])
    values: dict[str, list[Any]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for index, element in enumerate(instances):
        if as_objects:
            if not _is_named_object(element):
                raise invalid_argument(f"Expecting object but got list at item {index} of input list")
            for name, item in element.items():
                try:
                    _add_instance_item(item, name, signature, values, shapes)
                except RpcStatus as status:
                    raise invalid_argument(
                        f"Failed to process element: {index} key: {name} of 'instances' list. Error: "
                        f"{_status_string(status)}"
                    ) from None
            if set(element) != set(names):
                raise invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. JSON object: "
                    f"{json_debug_string(element)} keys must be equal to: {','.join(names)}"
                )
        else:
            if _is_named_object(element):
                raise invalid_argument(f"Expecting value/list but got object at item {index} of input list")
            try:
                _add_instance_item(element, names[0], signature, values, shapes)
            except RpcStatus as status:
                raise invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. Error: {_status_string(status)}"
                ) from None
    return {
        name: _to_array(values[name], specs[name].datatype, (len(instances), *shapes[name])) for name in values
    }


def _add_instance_item(
    item: Any,
    name: str,
    signature: Signature,
    values: dict[str, list[Any]],
    shapes: dict[str, tuple[int, ...]],
) -> None:
    """``AddInstanceItem`` (json_tensor.cc:440-470): one example's value for one input, same size and shape as the
    first example's."""
    if name not in signature.inputs:
        raise invalid_argument(f"JSON object: does not have named input: {name}")
    shape, flat = _fill_tensor(item, signature.inputs[name].datatype)
    if name not in shapes:
        shapes[name], values[name] = shape, flat
        return
    expected = math.prod(shapes[name])
    if expected != len(flat):
        raise invalid_argument(f"Expecting tensor size: {expected} but got: {len(flat)}")
    if shapes[name] != shape:
        raise invalid_argument(f"Expecting shape {_shape_string(shapes[name])} but got: {_shape_string(shape)}")
    values[name].extend(flat)


def _arrays_from_inputs(inputs: Any, signature: Signature, fast: bool) -> dict[str, np.ndarray]:
    """Column form (``FillTensorMapFromInputsMap``, json_tensor.cc:611-652): one whole tensor per input."""
    specs = signature.inputs
    if not _is_named_object(inputs):
        if len(specs) > 1:
            raise invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple input tensors required as per "
                "tensorinfo_map"
            )
        name, spec = next(iter(specs.items()))
        return {name: _json_tensor(inputs, spec.datatype, fast)}
    arrays = {}
    for name, spec in specs.items():
        if name not in inputs:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = _json_tensor(inputs[name], spec.datatype, fast)
    return arrays


def _json_tensor(value: Any, datatype: int, fast: bool) -> np.ndarray:
    array = _fast_array(value, datatype) if fast else None
    if array is not None:
        return array
    shape, flat = _fill_tensor(value, datatype)
    return _to_array(flat, datatype, shape)


_INT_RANGES = {
    **dict.fromkeys(("int32", "int16", "int8", "uint8"), (-(2**31), 2**31 - 1)),  # rapidjson IsInt(), then a cast
    "int64": (-(2**63), 2**63 - 1),  # IsInt64()
    "uint32": (0, 2**32 - 1),  # IsUint()
    "uint64": (0, 2**64 - 1),  # IsUint64()
}
"""What ``AddValueToTensor`` (json_tensor.cc:287-345) accepts per integer dtype: the rapidjson test it applies."""


def _fast_array(value: Any, datatype: int) -> np.ndarray | None:
    """A dense numeric JSON value as numpy reads it, when that is provably what TF Serving would build."""
    dtype = codec.numpy_dtype_of(datatype)
    name = codec.datatype_string(datatype)
    if dtype is None or datatype == codec.DT_STRING or name in ("half", "bfloat16", "complex64", "complex128"):
        return None
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):  # ragged or out of numpy's range: the exact walk says what TF Serving says
        return None
    kind = array.dtype.kind
    if name == "bool":
        return array if kind == "b" else None
    if name in ("float", "double"):
        accepted = kind in "iuf"
    else:
        low, high = _INT_RANGES[name]
        accepted = kind in "iu" and (array.size == 0 or (int(array.min()) >= low and int(array.max()) <= high))
    if not accepted:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        return array.astype(dtype)


def _fill_tensor(value: Any, datatype: int) -> tuple[tuple[int, ...], list[Any]]:
    """``GetDenseTensorShape`` + ``FillTensorProto`` (json_tensor.cc:349-437): shape from the first element at each
    level, every list of that size, every leaf at the last level and of the input's type."""
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    rank = len(shape)
    flat: list[Any] = []

    def fill(item: Any, level: int) -> None:
        if not isinstance(item, list):
            if level != rank:
                raise invalid_argument(
                    f"JSON Value: {json_debug_string(item)} found at incorrect level: {level + 1} in the JSON DOM. "
                    f"Expected at level: {rank}"
                )
            flat.append(_json_leaf(item, datatype))
            return
        if level >= rank:
            raise invalid_argument(f"Encountered list at unexpected level: {level} expected < {rank}")
        if len(item) != shape[level]:
            raise invalid_argument(
                f"Encountered list at unexpected size: {len(item)} at level: {level} expected size: {shape[level]}"
            )
        for element in item:
            fill(element, level + 1)

    fill(value, 0)
    return tuple(shape), flat


def _json_leaf(item: Any, datatype: int) -> Any:
    """One JSON scalar as ``AddValueToTensor`` takes it (json_tensor.cc:287-345), or its refusal."""
    name = codec.datatype_string(datatype)
    if isinstance(item, dict):
        if datatype != codec.DT_STRING:
            raise _type_error(item, name)
        return _base64_value(item)
    is_number = isinstance(item, (int, float)) and not isinstance(item, bool)
    if name in ("float", "double"):
        if not is_number:
            raise _type_error(item, name)
        return float(item)
    if name in _INT_RANGES:
        low, high = _INT_RANGES[name]
        if not (is_number and isinstance(item, int) and low <= item <= high):
            raise _type_error(item, name)
        return item
    if name == "bool":
        if not isinstance(item, bool):
            raise _type_error(item, name)
        return item
    if datatype == codec.DT_STRING:
        if not isinstance(item, str):
            raise _type_error(item, name)
        return item.encode("utf-8")
    raise RpcStatus(
        grpc.StatusCode.UNIMPLEMENTED, f"Conversion of JSON Value: {json_debug_string(item)} to type: {name}"
    )


def _base64_value(item: dict[str, Any]) -> bytes:
    """``JsonDecodeBase64Object`` (json_tensor.cc:374-389): exactly ``{"b64": "<base64>"}``."""
    if not _is_base64(item):
        raise invalid_argument(f"JSON Value: {json_debug_string(item)} not formatted correctly for base64 data")
    text = item["b64"]
    try:  # absl::Base64Unescape accepts missing padding
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (ValueError, binascii.Error):
        raise invalid_argument("Unable to base64 decode") from None


def _type_error(item: Any, dtype_name: str) -> RpcStatus:
    return invalid_argument(
        f"JSON Value: {json_debug_string(item)} Type: {_json_type(item)} is not of expected type: {dtype_name}"
    )


def _to_array(flat: list[Any], datatype: int, shape: tuple[int, ...]) -> np.ndarray:
    """The collected leaves as the input's dtype; integers wrap and floats overflow to inf as C++ casts do."""
    if datatype == codec.DT_STRING:
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    dtype = codec.numpy_dtype_of(datatype)
    assert dtype is not None
    wide = np.array(flat, dtype=np.float64 if dtype.kind == "f" else np.uint64 if dtype == np.uint64 else np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        return wide.astype(dtype).reshape(shape)


def _status_string(status: RpcStatus) -> str:
    """``absl::Status::ToString()``: ``INVALID_ARGUMENT: <message>``."""
    return f"{status.code.name}: {status.message}"


def _shape_string(shape: tuple[int, ...]) -> str:
    """json_tensor.cc's ``ShapeToString``: ``[2,3]``."""
    return "[" + ",".join(str(size) for size in shape) + "]"


def _json_type(item: Any) -> str:
    """rapidjson's type names as ``JsonTypeString`` spells them (json_tensor.cc:95-112)."""
    if item is None:
        return "Null"
    if isinstance(item, bool):
        return "True" if item else "False"
    if isinstance(item, dict):
        return "Object"
    if isinstance(item, list):
        return "Array"
    if isinstance(item, str):
        return "String"
    return "Number"


def _is_named_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_base64(value)


def _is_base64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


# ----------------------------------------------------------------------------------- JSON in error messages


class _LimitReached(Exception):  # noqa: N818 (control flow, never escapes)
    pass


def json_debug_string(value: Any, limit: int = _MAX_JSON_DEBUG_BYTES) -> str:
    """A JSON value as TF Serving quotes it in errors (``JsonValueToDebugString``, json_tensor.cc:229-236).

    rapidjson's PrettyWriter with single-line arrays: objects one member a line, indented by four spaces, arrays on
    one line. The writer stops at the first token that starts at or after ``limit`` bytes, so long values are cut
    (and may be invalid JSON), which keeps a message that quotes a request small.
    """
    parts: list[str] = []
    size = 0

    def emit(text: str) -> None:
        nonlocal size
        if size >= limit:
            raise _LimitReached
        parts.append(text)
        size += len(text.encode("utf-8"))

    def write(item: Any, prefix: str, depth: int) -> None:
        if isinstance(item, dict):
            emit(prefix + "{")
            for index, (key, member) in enumerate(item.items()):
                emit(("," if index else "") + "\n" + "    " * (depth + 1) + _json_string(str(key)))
                write(member, ": ", depth + 1)
            emit("\n" + "    " * depth + "}" if item else "}")
        elif isinstance(item, list):
            emit(prefix + "[")
            for index, element in enumerate(item):
                write(element, ", " if index else "", depth + 1)
            emit("]")
        else:
            emit(prefix + _json_scalar(item))

    try:
        write(value, "", 0)
    except _LimitReached:
        pass
    return "".join(parts)


def _json_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _json_scalar(item: Any) -> str:
    if item is None:
        return "null"
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, str):
        return _json_string(item)
    if isinstance(item, float):
        return _rapidjson_double(item)
    return str(item)


def _rapidjson_double(number: float) -> str:
    """A double as rapidjson's ``Writer::Double`` writes it (shortest digits, its own exponent rules)."""
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "-Infinity" if number < 0 else "Infinity"
    sign = "-" if math.copysign(1.0, number) < 0 else ""
    mantissa, _, exponent = repr(abs(number)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction.rstrip("0")).lstrip("0") or "0"
    point = len(whole.lstrip("0")) if whole.strip("0") else -(len(fraction) - len(fraction.lstrip("0")))
    point += int(exponent or 0)  # the decimal point sits after `point` digits (rapidjson's kk)
    if digits == "0":
        return sign + "0.0"
    length = len(digits)
    if length <= point <= 21:
        return sign + digits + "0" * (point - length) + ".0"
    if 0 < point <= 21:
        return sign + digits[:point] + "." + digits[point:]
    if -6 < point <= 0:
        return sign + "0." + "0" * -point + digits
    tail = "." + digits[1:] if length > 1 else ""
    return f"{sign}{digits[0]}{tail}e{point - 1}"


# ------------------------------------------------------------------------------------ tensors -> JSON (responses)


def _predictions(outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Row form: ``predictions`` holds one entry per example (an object when there are several outputs)."""
    batch_size = None
    for name, array in outputs.items():
        if array.ndim == 0:
            raise invalid_argument(f"Tensor name: {name} has no shape information ")
        if batch_size is not None and array.shape[0] != batch_size:
            raise invalid_argument(
                f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} expecting: {batch_size}"
            )
        batch_size = array.shape[0]
    values = {name: _json_value(name, array) for name, array in outputs.items()}
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    return {"predictions": [{name: values[name][row] for name in values} for row in range(batch_size or 0)]}


def _columns(outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Column form: ``outputs`` holds the whole tensor (or an object of them when there are several)."""
    values = {name: _json_value(name, array) for name, array in outputs.items()}
    return {"outputs": next(iter(values.values())) if len(values) == 1 else values}


def _json_value(name: str, array: np.ndarray) -> Any:
    """An output as JSON values; floats written as their shortest decimal (TF Serving writes 0.2, not 0.2000000029)."""
    if array.dtype == object or array.dtype.kind in "SU":
        as_bytes = name.endswith(_BYTES_SUFFIX)
        return _map_nested(
            array.tolist(),
            lambda item: {"b64": base64.b64encode(item).decode("ascii")} if as_bytes else _text(item),
        )
    if array.dtype.kind == "c":
        raise invalid_argument(f"Failed to write JSON value for tensor type: {array.dtype} (output {name})")
    if array.dtype.kind == "f" and array.dtype != np.float64:
        return array.astype(np.float32).astype(str).astype(np.float64).tolist()
    return array.tolist()


def _map_nested(value: Any, function: Any) -> Any:
    if isinstance(value, list):
        return [_map_nested(item, function) for item in value]
    return function(value)


def _text(item: Any) -> str:
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)


_READ_BYTES = 1 << 20  # the body is read in pieces, so memory follows what arrives, not what a header claims
_MAX_CHUNK_LINE = 1024


class _BodyError(Exception):
    """A request body that cannot be read: the HTTP status and the JSON error to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, hands it to `RestApi`, writes the JSON answer; HTTP/1.0, so each connection closes.

    Every answer is JSON, including the ones the base class would write as an HTML page (malformed request line,
    unknown method): TF Serving's clients parse ``{"error": ...}``. Methods follow TF Serving: GET, POST, HEAD, PUT,
    DELETE, OPTIONS and PATCH reach its handler (``evhttp_set_allowed_methods``, ``util/net_http/server/internal/
    evhttp_server.cc`` 114-117), which answers all but GET and POST "Malformed request: <METHOD> <path>"
    (``model_servers/http_rest_api_handler.cc`` 74-75); libevent answers other methods 501 (``http.c``).
    """

    server: _RestHttpServer
    server_version = "ema-serving"
    default_request_version = "HTTP/1.0"  # so an answer to a garbled request line still has a status line
    timeout = 60  # a client that stops sending cannot hold a thread forever; shutdown closes it sooner

    def do_GET(self) -> None:  # noqa: N802 (http.server's method name)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._dispatch("OPTIONS")

    def parse_request(self) -> bool:
        self.server.connection_busy(self.connection)  # a request line arrived: no longer an idle connection
        return super().parse_request()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's error answers (bad request line, 501 for unknown methods), as JSON."""
        self.close_connection = True
        if code == HTTPStatus.NOT_IMPLEMENTED and getattr(self, "command", None):
            message = f"Method {self.command} is not supported; use GET or POST (TF Serving's REST API)"
        self._reply(RestResponse(code, _error_json(message or _phrase(code) or str(code)).encode("utf-8")))

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        try:
            body = self._read_body()
        except _BodyError as error:
            self.close_connection = True
            response = RestResponse(error.status, _error_json(error.message).encode("utf-8"))
        else:
            response = self.server.api.respond(method, path, body, self.headers.get("Origin"))
        self._reply(response)

    def _read_body(self) -> bytes:
        """The request body, as libevent reads it: chunked, or Content-Length bytes, or none."""
        limit = self.server.limits.max_request_bytes
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None:
            if encoding.strip().lower() != "chunked":
                raise _BodyError(501, f"Transfer-Encoding {encoding!r} is not supported; send chunked or plain")
            return self._read_chunked(limit)
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return b""  # libevent: no Content-Length and no Transfer-Encoding means no body
        # libevent refuses a length that is not a whole decimal number >= 0 with 400 (http.c, evhttp_get_body_length).
        if len(set(lengths)) > 1 or not re.fullmatch(r"\s*\+?[0-9]+", lengths[0]):
            raise _BodyError(
                400, f"Content-Length {', '.join(lengths)} is not a number of bytes; send one whole number >= 0"
            )
        length = int(lengths[0])
        if length > limit:
            raise _BodyError(413, _too_large(length, limit))
        return self._read_exactly(length)

    def _read_exactly(self, length: int) -> bytes:
        pieces = []
        remaining = length
        while remaining:
            piece = self.rfile.read(min(remaining, _READ_BYTES))
            if not piece:
                raise _BodyError(400, f"The request body ended after {length - remaining} of {length} bytes")
            pieces.append(piece)
            remaining -= len(piece)
        return b"".join(pieces)

    def _read_chunked(self, limit: int) -> bytes:
        pieces = []
        total = 0
        while True:
            line = self.rfile.readline(_MAX_CHUNK_LINE)
            size_text = line.split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
                raise _BodyError(400, f"Malformed chunk size line {line[:40]!r} in a chunked body")
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > limit:
                raise _BodyError(413, _too_large(total, limit))
            pieces.append(self._read_exactly(size))
            if self.rfile.readline(_MAX_CHUNK_LINE).strip():
                raise _BodyError(400, "A chunk of a chunked body is longer than its size line says")
        while self.rfile.readline(_MAX_CHUNK_LINE).strip():  # trailer fields, up to the blank line
            pass
        return b"".join(pieces)

    def _reply(self, response: RestResponse) -> None:
        payload = response.body
        self.send_response(response.status, _phrase(response.status))
        if response.content_type is not None:
            self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's signature)
        logger.debug("REST %s - %s", self.address_string(), format % args)


def _phrase(status: int) -> str | None:
    return HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else None


def _too_large(size: int, limit: int) -> str:
    return (
        f"Request body of {size} bytes is larger than this server accepts ({limit} bytes, --max-request-bytes); "
        "send smaller batches"
    )


class _RestHttpServer(ThreadingHTTPServer):
    """The threading HTTP server, knowing its open connections so that a stop never waits on an idle one."""

    daemon_threads = False  # shutdown joins request threads, so in-flight requests finish
    block_on_close = True

    def __init__(self, address: tuple[str, int], api: RestApi, limits: tensors.RequestLimits) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.api = api
        self.limits = limits
        self._connections: dict[socket.socket, bool] = {}  # open connection -> a request is being answered
        self._connections_changed = threading.Condition()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_changed:
            self._connections[request] = False
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_changed:
            self._connections.pop(request, None)
            self._connections_changed.notify_all()
        super().shutdown_request(request)

    def connection_busy(self, connection: socket.socket) -> None:
        with self._connections_changed:
            if connection in self._connections:
                self._connections[connection] = True

    def close_connections(self, deadline: float) -> None:
        """Close idle connections now and busy ones once answered (or at ``deadline``), unblocking their threads."""
        with self._connections_changed:
            while True:
                for connection, busy in list(self._connections.items()):
                    if not busy:
                        _shut(connection)
                        self._connections.pop(connection)
                remaining = deadline - time.monotonic()
                if not self._connections or remaining <= 0:
                    break
                self._connections_changed.wait(remaining)
            for connection in self._connections:
                logger.warning("REST request from %s still running after the grace period is cut off",
                               _peer(connection))
                _shut(connection)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke (timeout, reset, closed at shutdown) is logged, not printed to stderr."""
        logger.debug("REST connection from %s failed", client_address[0], exc_info=True)


def _shut(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer


def _peer(connection: socket.socket) -> str:
    try:
        return str(connection.getpeername()[0])
    except OSError:
        return "a closed connection"


class RestServer:
    """TF Serving's REST API on a port, served from a background thread.

    Args:
        manager: Where models come from.
        host: Interface to bind.
        port: Port to bind (0 picks a free one; see `port`).
        limits: What one request may cost (the body size limit).

    Raises:
        OSError: the port cannot be bound.
    """

    def __init__(
        self, manager: ModelManager, host: str, port: int, *, limits: tensors.RequestLimits = tensors.DEFAULT_LIMITS
    ) -> None:
        self._http = _RestHttpServer((host, port), RestApi(manager), limits)
        self.port: int = self._http.server_address[1]
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.1}, name="ema-serving-rest", daemon=True
        )

    def start(self) -> None:
        """Start accepting requests."""
        self._thread.start()

    def stop_accepting(self) -> None:
        """Close the listening socket: new connections are refused; open ones are still answered."""
        if self._thread.is_alive():
            self._http.shutdown()
        self._http.socket.close()

    def stop(self, deadline: float | None = None) -> None:
        """Stop accepting, let requests being answered finish (until ``deadline``), close every connection.

        Idle connections (nothing sent yet) are closed at once, so they cannot hold the stop back.
        """
        self.stop_accepting()
        self._http.close_connections(time.monotonic() if deadline is None else deadline)
        self._http.server_close()  # joins the request threads, all unblocked by now
