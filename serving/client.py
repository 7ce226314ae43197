"""A TF Serving gRPC client that never loads the TensorFlow runtime.

Why a client of our own: ``tensorflow-serving-api`` needs all of TensorFlow to build a request (seconds to import,
hundreds of MB per process), its channel keeps gRPC's 4 MB receive limit that images exceed, and every caller re-writes
deadlines, retries and the metadata ``Any`` unpacking. ``ServingClient`` keeps one channel for its whole life (gRPC
multiplexes concurrent calls over it), sets the limits and the retry policy once in the channel's service config, and
returns plain dataclasses holding numpy arrays.

Predict requests and responses are framed and parsed as bytes (``serving.codec.tensor_pieces``/``decode_bytes``), so
each input array is copied once on its way out and outputs are views of the received buffer. The codec (and numpy)
is imported on the first call that needs it, so importing the client, or checking a model's status, stays fast.

Example:
    >>> with ServingClient("localhost:8500") as client:  # doctest: +SKIP
    ...     prediction = client.predict("model", {"inputs": batch}, signature=SIGNATURE_EMA)
    ...     logits = prediction.outputs["output_0"]
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import grpc

from ema_export.contracts import SIGNATURE_DEFAULT
from serving.protocol import (
    MODEL_SERVICE,
    PREDICTION_SERVICE,
    SIGNATURE_DEF_METADATA_FIELD,
    WIRE_LENGTH_DELIMITED,
    ClientConfigError,
    GetModelMetadataRequest,
    GetModelStatusRequest,
    InvalidRequestError,
    ModelServiceStub,
    PredictionServiceStub,
    ServingError,
    SignatureNotFoundError,
    error_from_rpc,
    get_model_metadata_pb2,
    get_model_status_pb2,
    iter_fields,
    length_delimited,
    model_pb2,
)

if TYPE_CHECKING:
    import numpy as np

PREDICT_METHOD = f"/{PREDICTION_SERVICE}/Predict"
"""The gRPC method path of Predict, as the generated stub calls it."""

# Field numbers in tensorflow_serving/apis/predict.proto; a map entry is a message {1: key, 2: value}.
_REQUEST_MODEL_SPEC, _REQUEST_INPUTS = 1, 2
_RESPONSE_OUTPUTS, _RESPONSE_MODEL_SPEC = 1, 2
_MAP_KEY, _MAP_VALUE = 1, 2

# tensorflow.error.Code names by number, for GetModelStatus answers (StatusProto.error_code).
_ERROR_CODES: dict[int, str] = {
    value.number: value.name
    for value in get_model_status_pb2.ModelVersionStatus.DESCRIPTOR.fields_by_name["status"]
    .message_type.fields_by_name["error_code"]
    .enum_type.values
}

DEFAULT_TIMEOUT_S = 30.0
"""Per-call deadline when none is given: long enough for a cold model's first batch, short enough to notice a hang."""

UNLIMITED = -1
"""gRPC's value for "no message size limit"; TF Serving itself accepts up to INT32_MAX bytes."""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that fail with UNAVAILABLE (server restarting, connection not up yet), with backoff.

    Why in the service config: gRPC then retries transparently, honours the call's overall deadline, and never
    retries a call the server has started answering.

    ``max_attempts`` counts the first try: 1 disables retries; gRPC caps it at 5.

    Raises:
        ClientConfigError: ``max_attempts`` outside 1..5 or a backoff that is not positive.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5 or self.initial_backoff_s <= 0 or self.max_backoff_s <= 0:
            raise ClientConfigError(
                "Invalid retry policy. Expected 1 <= max_attempts <= 5 (gRPC's cap) and positive backoffs; fix the "
                f"RetryPolicy. Received: {self}."
            )

    def service_config(self) -> dict[str, Any]:
        """The gRPC service config (as a dict, to be JSON-encoded) applying this policy to both TF Serving services."""
        services = [{"service": PREDICTION_SERVICE}, {"service": MODEL_SERVICE}]
        if self.max_attempts == 1:
            return {"methodConfig": [{"name": services}]}  # gRPC rejects a retryPolicy with fewer than 2 attempts
        return {
            "methodConfig": [
                {
                    "name": services,
                    "retryPolicy": {
                        "maxAttempts": self.max_attempts,
                        "initialBackoff": f"{self.initial_backoff_s:.3f}s",
                        "maxBackoff": f"{self.max_backoff_s:.3f}s",
                        "backoffMultiplier": self.backoff_multiplier,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }


@dataclass(frozen=True)
class TlsOptions:
    """TLS for the channel. All fields empty means "TLS with the system's root certificates".

    Attributes:
        root_certificates: PEM CA bundle that signed the server's certificate.
        private_key: PEM client key, for mutual TLS (with ``certificate_chain``).
        certificate_chain: PEM client certificate chain, for mutual TLS.
        server_name: expected name in the server certificate when it differs from the target host.
    """

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca_file: str | Path | None = None,
        key_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        server_name: str | None = None,
    ) -> TlsOptions:
        """Read the PEM files (any may be None)."""

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(ca_file), read(key_file), read(cert_file), server_name)


@dataclass(frozen=True)
class Prediction:
    """One Predict answer: decoded outputs, which version served it, and how long the call took."""

    outputs: dict[str, np.ndarray]
    signature: str
    model_version: int | None
    latency_s: float


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a signature, as the server describes it. ``shape`` None means unknown rank."""

    name: str
    dtype: str
    shape: tuple[int | None, ...] | None
    tensor_name: str


@dataclass(frozen=True)
class SignatureSpec:
    """A signature's inputs and outputs, keyed by the names requests and responses use."""

    name: str
    method_name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


@dataclass(frozen=True)
class ModelMetadata:
    """GetModelMetadata, parsed: the serving version and every signature."""

    model_name: str
    version: int | None
    signatures: dict[str, SignatureSpec]

    def signature(self, name: str) -> SignatureSpec:
        """The named signature.

        Raises:
            SignatureNotFoundError: the model has no signature of that name.
        """
        if name not in self.signatures:
            raise SignatureNotFoundError(
                f"Model {self.model_name!r} has no signature {name!r}. Expected one of "
                f"{sorted(self.signatures)}; pick one of those (--signature). Received: {name!r}."
            )
        return self.signatures[name]


@dataclass(frozen=True)
class VersionStatus:
    """The state of one version of a model (TF Serving's ModelVersionStatus): ``state`` is e.g. ``"AVAILABLE"``."""

    version: int
    state: str
    error_code: str
    error_message: str


class PendingPrediction:
    """A Predict call in flight; ``result()`` waits for it. Lets callers send several calls at once without threads."""

    def __init__(self, call: Any, signature: str, what: str, started: float) -> None:
        self._call = call
        self._signature = signature
        self._what = what
        self._started = started
        self._finished: float | None = None
        # Note the arrival time from gRPC's thread, so latency excludes any wait before the caller asks for it.
        call.add_done_callback(self._note_arrival)

    def _note_arrival(self, _call: Any) -> None:
        self._finished = time.perf_counter()

    def done(self) -> bool:
        """Whether the answer (or error) has arrived."""
        return self._call.done()

    def add_done_callback(self, callback: Callable[[PendingPrediction], None]) -> None:
        """Call ``callback(self)`` when the call completes (from a gRPC thread; keep it short and thread-safe)."""
        self._call.add_done_callback(lambda _call: callback(self))

    def result(self, timeout: float | None = None) -> Prediction:
        """Wait for the answer and decode it.

        Raises:
            ServingError: the subclass matching the gRPC status (see ``serving.protocol.error_from_rpc``).
        """
        try:
            response = self._call.result(timeout=timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error, what=self._what) from error
        except grpc.FutureCancelledError as error:
            raise ServingError(f"{self._what} was cancelled before it finished.") from error
        finished = self._finished if self._finished is not None else time.perf_counter()
        return _prediction(response, self._signature, finished - self._started)


class ServingClient:
    """Predict, GetModelMetadata and GetModelStatus against TF Serving (or ``serving.server``) over one channel.

    Args:
        target: ``host:port`` of the gRPC endpoint.
        timeout: default per-call deadline in seconds (each method also takes ``timeout=``).
        tls: None for plaintext; ``TlsOptions()`` for TLS with system roots, or with your CA / client certificate.
        retry: how UNAVAILABLE calls are retried.
        channel_options: extra ``(key, value)`` gRPC channel arguments, appended after ours so they win.

    Example:
        >>> with ServingClient("localhost:8500", timeout=5) as client:  # doctest: +SKIP
        ...     print(client.status("model"))
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        tls: TlsOptions | None = None,
        retry: RetryPolicy = RetryPolicy(),
        channel_options: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        options = [
            ("grpc.max_send_message_length", UNLIMITED),
            ("grpc.max_receive_message_length", UNLIMITED),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(retry.service_config())),
        ]
        if tls is not None and tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        options.extend(channel_options)
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(tls.root_certificates, tls.private_key, tls.certificate_chain)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._prediction = PredictionServiceStub(self._channel)
        # Predict itself exchanges bytes we frame and parse (see _predict_request_bytes): no serializers on this one.
        self._predict: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(PREDICT_METHOD)
        self._models = ModelServiceStub(self._channel)
        self._closed = threading.Event()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Safe to call twice."""
        if not self._closed.is_set():
            self._closed.set()
            self._channel.close()

    def predict(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        signature: str = SIGNATURE_DEFAULT,
        version: int | None = None,
        version_label: str | None = None,
        timeout: float | None = None,
    ) -> Prediction:
        """Run one signature of a model on a batch.

        Args:
            model: the served model name.
            inputs: input name -> array-like, named as the signature's inputs (see ``metadata()``). Arrays are sent
                with their own dtype: cast to the signature's dtype first.
            signature: ``serve_live``, ``serve_ema``, ``serving_default`` or another signature of the export.
            version: pin a version number; at most one of ``version`` and ``version_label``.
            version_label: pin a version label such as ``"stable"``.
            timeout: deadline in seconds for this call (default: the client's).

        Returns:
            The decoded outputs (read-only arrays), the version that answered and the call's latency.

        Raises:
            ServingError: a subclass per failure: ``ServerUnavailableError``, ``ModelNotFoundError``,
                ``SignatureNotFoundError``, ``InvalidRequestError``, ``DeadlineExceededError``, ``CodecError``.
        """
        request, what = self._predict_request(model, inputs, signature, version, version_label)
        started = time.perf_counter()
        try:
            # A blocking call costs the client about half the CPU of a future (no hand-off to gRPC's polling thread).
            response = self._predict(request, timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            raise error_from_rpc(error, what=what) from error
        return _prediction(response, signature, time.perf_counter() - started)

    def predict_async(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        signature: str = SIGNATURE_DEFAULT,
        version: int | None = None,
        version_label: str | None = None,
        timeout: float | None = None,
    ) -> PendingPrediction:
        """Start a Predict call and return at once; same arguments as ``predict``. Used to query arms concurrently."""
        request, what = self._predict_request(model, inputs, signature, version, version_label)
        started = time.perf_counter()
        call = self._predict.future(request, timeout=self._deadline(timeout))
        return PendingPrediction(call, signature, what, started)

    def metadata(
        self,
        model: str,
        *,
        version: int | None = None,
        version_label: str | None = None,
        timeout: float | None = None,
    ) -> ModelMetadata:
        """The model's signatures with their input and output names, dtypes and shapes.

        Raises:
            ServingError: as for ``predict``.
        """
        request = GetModelMetadataRequest(metadata_field=[SIGNATURE_DEF_METADATA_FIELD])
        request.model_spec.CopyFrom(_model_spec(model, version, version_label))
        response = self._call(self._prediction.GetModelMetadata, request, timeout, f"GetModelMetadata(model={model!r})")
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        packed = response.metadata.get(SIGNATURE_DEF_METADATA_FIELD)
        if packed is None or not packed.Unpack(signature_map):
            raise ServingError(
                f"GetModelMetadata(model={model!r}) returned no signature_def map. Expected TF Serving's "
                f"SignatureDefMap under metadata['{SIGNATURE_DEF_METADATA_FIELD}']; is the target a TF Serving "
                f"endpoint? Received fields: {sorted(response.metadata)}."
            )
        spec = response.model_spec
        return ModelMetadata(
            model_name=spec.name or model,
            version=spec.version.value if spec.HasField("version") else None,
            signatures={
                name: _signature_spec(name, definition)
                for name, definition in sorted(signature_map.signature_def.items())
            },
        )

    def status(
        self,
        model: str,
        *,
        version: int | None = None,
        version_label: str | None = None,
        timeout: float | None = None,
    ) -> list[VersionStatus]:
        """The state of each version of the model (all versions the server knows, or the one asked for).

        Raises:
            ServingError: as for ``predict``; an unknown model is ``ModelNotFoundError``.
        """
        request = GetModelStatusRequest()
        request.model_spec.CopyFrom(_model_spec(model, version, version_label))
        response = self._call(self._models.GetModelStatus, request, timeout, f"GetModelStatus(model={model!r})")
        states = get_model_status_pb2.ModelVersionStatus.State
        return [
            VersionStatus(
                version=item.version,
                state=states.Name(item.state) if item.state in states.values() else str(item.state),
                error_code=_ERROR_CODES.get(item.status.error_code, str(item.status.error_code)),
                error_message=item.status.error_message,
            )
            for item in sorted(response.model_version_status, key=lambda item: item.version)
        ]

    def _predict_request(
        self, model: str, inputs: Mapping[str, Any], signature: str, version: int | None, version_label: str | None
    ) -> tuple[bytes, str]:
        self._check_open()
        spec = _model_spec(model, version, version_label, signature)
        return _predict_request_bytes(spec, inputs), f"Predict(model={model!r}, signature={signature!r})"

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ServingError(
                f"The client for {self.target} is closed. Expected calls only inside its `with` block or before "
                "close(); open a new ServingClient. Received: a call after close()."
            )

    def _call(self, method: Any, request: Any, timeout: float | None, what: str) -> Any:
        self._check_open()
        try:
            return method(request, timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            raise error_from_rpc(error, what=what) from error


def _predict_request_bytes(spec: Any, inputs: Mapping[str, Any]) -> bytes:
    """Serialize a PredictRequest with each input array's memory copied once (``codec.tensor_pieces``).

    The same bytes ``PredictRequest(model_spec=spec, inputs={...}).SerializeToString()`` would give, without the
    intermediate array -> bytes -> message -> bytes copies of every tensor.
    """
    codec = _codec()
    spec_bytes = spec.SerializeToString()
    pieces: list[bytes | memoryview] = [length_delimited(_REQUEST_MODEL_SPEC, len(spec_bytes)), spec_bytes]
    for name, values in inputs.items():
        key = name.encode("utf-8")
        tensor, tensor_length = codec.tensor_pieces(values)
        key_field = length_delimited(_MAP_KEY, len(key))
        value_field = length_delimited(_MAP_VALUE, tensor_length)
        entry_length = len(key_field) + len(key) + len(value_field) + tensor_length
        pieces += [length_delimited(_REQUEST_INPUTS, entry_length), key_field, key, value_field, *tensor]
    return b"".join(pieces)


def _prediction(response: bytes, signature: str, latency_s: float) -> Prediction:
    outputs, spec = _parse_predict_response(response)
    return Prediction(
        outputs=outputs,
        signature=spec.signature_name or signature,
        model_version=spec.version.value if spec.HasField("version") else None,
        latency_s=latency_s,
    )


def _parse_predict_response(data: bytes) -> tuple[dict[str, np.ndarray], Any]:
    """Read a serialized PredictResponse: outputs decoded as views of ``data`` where possible, and the model spec."""
    codec = _codec()
    outputs: dict[str, np.ndarray] = {}
    spec = model_pb2.ModelSpec()
    for number, wire_type, value in iter_fields(memoryview(data)):
        if number == _RESPONSE_OUTPUTS and wire_type == WIRE_LENGTH_DELIMITED:
            key, tensor = b"", memoryview(b"")
            for entry_number, entry_wire_type, entry_value in iter_fields(value):
                if entry_number == _MAP_KEY and entry_wire_type == WIRE_LENGTH_DELIMITED:
                    key = bytes(entry_value)
                elif entry_number == _MAP_VALUE and entry_wire_type == WIRE_LENGTH_DELIMITED:
                    tensor = entry_value
            outputs[key.decode("utf-8")] = codec.decode_bytes(tensor)
        elif number == _RESPONSE_MODEL_SPEC and wire_type == WIRE_LENGTH_DELIMITED:
            spec.MergeFromString(bytes(value))
    return outputs, spec


def _codec() -> ModuleType:
    """The tensor codec, imported on first use: it needs numpy (~50 ms), which ``status()`` and a bare import do not."""
    from serving import codec

    return codec


def _model_spec(model: str, version: int | None, version_label: str | None, signature: str | None = None) -> Any:
    if version is not None and version_label is not None:
        raise InvalidRequestError(
            "A request can pin a version number or a version label, not both. Expected at most one of version= and "
            f"version_label= (--version / --version-label); drop one. Received: version={version}, "
            f"version_label={version_label!r}."
        )
    spec = model_pb2.ModelSpec(name=model)
    if signature is not None:
        spec.signature_name = signature
    if version is not None:
        spec.version.value = int(version)
    if version_label is not None:
        spec.version_label = version_label
    return spec


def _tensor_spec(name: str, info: Any) -> TensorSpec:
    shape: tuple[int | None, ...] | None
    if info.tensor_shape.unknown_rank:
        shape = None
    else:
        shape = tuple(dim.size if dim.size >= 0 else None for dim in info.tensor_shape.dim)
    return TensorSpec(name=name, dtype=_codec().dtype_name(info.dtype), shape=shape, tensor_name=info.name)


def _signature_spec(name: str, definition: Any) -> SignatureSpec:
    return SignatureSpec(
        name=name,
        method_name=definition.method_name,
        inputs={key: _tensor_spec(key, info) for key, info in sorted(definition.inputs.items())},
        outputs={key: _tensor_spec(key, info) for key, info in sorted(definition.outputs.items())},
    )
