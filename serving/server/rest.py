"""The REST front end (``--rest-api-port``): TF Serving's ``/v1/models/...`` API over the same model manager.

Routes, JSON shapes and HTTP codes follow TF Serving (``model_servers/http_rest_api_handler.cc``,
``util/json_tensor.cc``, ``g3doc/api_rest.md``):

* ``GET /v1/models/NAME[/versions/N|/labels/L]``: GetModelStatus as JSON (``model_version_status``).
* ``GET /v1/models/NAME[/versions/N|/labels/L]/metadata``: ``{"model_spec": ..., "metadata": {"signature_def": ...}}``.
* ``POST /v1/models/NAME[/versions/N|/labels/L]:predict`` with ``signature_name`` and either ``instances`` (row
  form, answered as ``predictions``) or ``inputs`` (column form, answered as ``outputs``). Binary strings travel as
  ``{"b64": "..."}``; string outputs whose name ends in ``_bytes`` are answered that way.
* Errors are ``{"error": "<message>"}`` with TF Serving's mapping of status codes to HTTP codes.

The HTTP server is the standard library's threading server: one thread per request, joined on shutdown so in-flight
requests finish.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import threading
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2

from ema_export.names import SIGNATURE_DEFAULT
from serving.server import tensors
from serving.server.errors import RpcStatus, invalid_argument
from serving.server.grpc_service import SIGNATURE_DEF_FIELD, get_model_metadata, get_model_status
from serving.server.manager import ModelManager
from serving.server.servable import Signature, TensorSpecInfo, check_array

logger = logging.getLogger("serving.server")

_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.IGNORECASE
)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.IGNORECASE
)
_BYTES_SUFFIX = "_bytes"
_MAX_BODY_BYTES = 1 << 31

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


class RestApi:
    """The REST API without HTTP: ``handle(method, path, body)`` -> (HTTP status, JSON text)."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, str]:
        """Answer one request; never raises."""
        try:
            return 200, self._route(method, path, body)
        except RpcStatus as status:
            return _HTTP_STATUS.get(status.code, 500), json.dumps({"error": status.message})
        except Exception as error:  # one bad request must never take the server down
            logger.exception("Unexpected error while answering %s %s", method, path)
            message = f"Internal error in ema-serving: {type(error).__name__}: {error}"
            return 500, json.dumps({"error": message})

    def _route(self, method: str, path: str, body: bytes) -> str:
        if method == "POST":
            match = _PREDICT_PATH.fullmatch(path)
            if match:
                spec = _model_spec(*match.group(1, 2, 3))
                if match.group(4).lower() != "predict":
                    raise RpcStatus(
                        grpc.StatusCode.UNIMPLEMENTED,
                        f"{match.group(4)} is not implemented by the ema-serving local server; use :predict",
                    )
                return self._predict(spec, body)
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
        document = _parse_json(body)
        signature_name = document.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise invalid_argument(
                "JSON Value: not formatted correctly. 'signature_name' key must be a string value."
            )
        servable = self._manager.get_servable(spec)
        key = signature_name or SIGNATURE_DEFAULT
        signature = servable.signatures.get(key)
        if signature is None:
            raise invalid_argument(f'Serving signature name: "{key}" not found in signature def')
        if "instances" in document and "inputs" in document:
            raise invalid_argument(
                "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist"
            )
        if "instances" in document:
            arrays, row_format = _arrays_from_instances(document["instances"], signature), True
        elif "inputs" in document:
            arrays, row_format = _arrays_from_inputs(document["inputs"], signature), False
        else:
            raise invalid_argument("Missing 'inputs' or 'instances' key")
        for name, array in arrays.items():
            check_array(signature.inputs[name], array)
        outputs = signature.run(arrays)
        return json.dumps(_predictions(outputs) if row_format else _columns(outputs))


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


def _parse_json(body: bytes) -> dict[str, Any]:
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise invalid_argument(f"JSON Parse error: {error}") from None
    if not isinstance(document, dict):
        raise invalid_argument(f"JSON Value: {_preview(document)} Is not object")
    return document


def _arrays_from_instances(instances: Any, signature: Signature) -> dict[str, np.ndarray]:
    """Row form: one element per example, a plain value (one input) or an object naming every input."""
    if not isinstance(instances, list):
        raise invalid_argument("Excepting 'instances' to be an list/array")
    if not instances:
        raise invalid_argument("No values in 'instances' array")
    specs = signature.inputs
    named = _is_named_object(instances[0])
    if not named and len(specs) > 1:
        raise invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple input tensors required as per "
            f"tensorinfo_map (inputs {sorted(specs)})"
        )
    if not named:
        spec = next(iter(specs.values()))
        return {spec.name: _json_to_array(instances, spec, "'instances' list")}
    columns: dict[str, list[Any]] = {name: [] for name in specs}
    for index, instance in enumerate(instances):
        if not _is_named_object(instance) or set(instance) != set(specs):
            raise invalid_argument(
                f"Failed to process element: {index} of 'instances' list. JSON object: {_preview(instance)} keys "
                f"must be equal to: {','.join(sorted(specs))}"
            )
        for name, value in instance.items():
            columns[name].append(value)
    return {name: _json_to_array(values, specs[name], "'instances' list") for name, values in columns.items()}


def _arrays_from_inputs(inputs: Any, signature: Signature) -> dict[str, np.ndarray]:
    """Column form: the whole tensor (one input) or an object of whole tensors by input name."""
    specs = signature.inputs
    if not _is_named_object(inputs):
        if len(specs) > 1:
            raise invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple input tensors required as per "
                f"tensorinfo_map (inputs {sorted(specs)})"
            )
        spec = next(iter(specs.values()))
        return {spec.name: _json_to_array(inputs, spec, "'inputs'")}
    arrays = {}
    for name, spec in specs.items():
        if name not in inputs:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = _json_to_array(inputs[name], spec, "'inputs'")
    return arrays


def _is_named_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_base64(value)


def _is_base64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _json_to_array(value: Any, spec: TensorSpecInfo, where: str) -> np.ndarray:
    """Convert a JSON value to the input's dtype, refusing what TF Serving refuses (with the input named)."""
    dtype = tensors.numpy_dtype(spec.datatype)
    if dtype is None:
        raise RpcStatus(
            grpc.StatusCode.UNIMPLEMENTED,
            f"Conversion of JSON values to type {tensors.datatype_name(spec.datatype)} (input {spec.name})",
        )
    if spec.datatype == tensors.DT_STRING:
        return _string_array(value, spec.name, where)
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError) as error:
        raise invalid_argument(
            f"Failed to process {where} for input '{spec.name}': nested lists must be dense (equal lengths at each "
            f"level) numbers of type {tensors.datatype_name(spec.datatype)}. Error: {error}"
        ) from None
    _check_json_kind(array, dtype, spec)
    return array.astype(dtype, copy=False)


def _check_json_kind(array: np.ndarray, dtype: np.dtype, spec: TensorSpecInfo) -> None:
    expected = tensors.datatype_name(spec.datatype)
    accepted = {"f": "fiu", "c": "fiu", "i": "iu", "u": "iu", "b": "b"}.get(dtype.kind, "")
    if array.size and array.dtype.kind not in accepted:
        sample = array.reshape(-1)[0]
        raise invalid_argument(
            f"JSON Value: {_preview(sample)} is not of expected type: {expected} (input '{spec.name}')"
        )
    if not array.size or array.dtype.kind == dtype.kind == "f" and dtype.itemsize >= array.dtype.itemsize:
        return
    if dtype.kind in "iu" or dtype == np.float32:
        _check_range(array, dtype, spec, expected)


def _check_range(array: np.ndarray, dtype: np.dtype, spec: TensorSpecInfo, expected: str) -> None:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = info.min, info.max
    elif array.dtype.kind in "iu":
        low, high = -(2**24 - 1), 2**24 - 1  # integers a float32 holds exactly
    else:
        finite = array[np.isfinite(array)]
        high = float(np.finfo(np.float32).max)
        if finite.size and np.abs(finite).max() > high:
            raise invalid_argument(
                f"Cannot convert JSON value: {np.abs(finite).max()} to float without loss of precision "
                f"(input '{spec.name}')."
            )
        return
    if array.min() < low or array.max() > high:
        worst = array.max() if array.max() > high else array.min()
        reason = "is not of expected type" if dtype.kind in "iu" else "cannot be converted without loss of precision to"
        raise invalid_argument(f"JSON Value: {worst} {reason}: {expected} (input '{spec.name}')")


def _string_array(value: Any, name: str, where: str) -> np.ndarray:
    def convert(item: Any) -> Any:
        if isinstance(item, list):
            return [convert(element) for element in item]
        if isinstance(item, str):
            return item.encode("utf-8")
        if _is_base64(item):
            try:
                return base64.b64decode(item["b64"], validate=True)
            except ValueError:
                raise invalid_argument(f"Unable to base64 decode (input '{name}')") from None
        raise invalid_argument(f"JSON Value: {_preview(item)} is not of expected type: string (input '{name}')")

    converted = convert(value)
    try:
        array = np.array(converted, dtype=object)
    except ValueError as error:
        raise invalid_argument(f"Failed to process {where} for input '{name}': {error}") from None
    if array.dtype != object or any(isinstance(item, list) for item in array.reshape(-1)):
        raise invalid_argument(f"Failed to process {where} for input '{name}': nested lists must be dense")
    return array


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


def _preview(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, np.generic) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, hands it to `RestApi`, writes the JSON answer; HTTP/1.0, so each connection closes."""

    server: _RestHttpServer
    server_version = "ema-serving"
    timeout = 60  # a client that stops sending cannot hold a thread (or shutdown) forever

    def do_GET(self) -> None:  # noqa: N802 (http.server's method name)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > _MAX_BODY_BYTES:
            status, text = 413, json.dumps({"error": f"Request body of {length} bytes is too large"})
        else:
            body = self.rfile.read(length) if length else b""
            status, text = self.server.api.handle(method, path, body)
        payload = text.encode("utf-8")
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else None)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's signature)
        logger.debug("REST %s - %s", self.address_string(), format % args)


class _RestHttpServer(ThreadingHTTPServer):
    daemon_threads = False  # shutdown joins request threads, so in-flight requests finish
    block_on_close = True

    def __init__(self, address: tuple[str, int], api: RestApi) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.api = api

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke (timeout, reset) is logged, not printed to stderr as the base class does."""
        logger.warning("REST connection from %s failed", client_address[0], exc_info=True)


class RestServer:
    """TF Serving's REST API on a port, served from a background thread.

    Args:
        manager: Where models come from.
        host: Interface to bind.
        port: Port to bind (0 picks a free one; see `port`).

    Raises:
        OSError: the port cannot be bound.
    """

    def __init__(self, manager: ModelManager, host: str, port: int) -> None:
        self._http = _RestHttpServer((host, port), RestApi(manager))
        self.port: int = self._http.server_address[1]
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.1}, name="ema-serving-rest", daemon=True
        )

    def start(self) -> None:
        """Start accepting requests."""
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, close the socket."""
        if self._thread.is_alive():
            self._http.shutdown()
        self._http.server_close()
