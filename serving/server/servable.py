"""One loaded SavedModel version: its signatures, request validation, Predict, and warmup replay.

A `LoadedVersion` is immutable once built and safe to call from many threads at once: TensorFlow runs concurrent
calls of a loaded ``ConcreteFunction`` in parallel. The manager swaps versions by replacing references, so a request
that already holds a version finishes on it even after that version is unloaded (Python keeps it alive until the
last request lets go), which is how a hot swap never fails an in-flight request.

Request checks happen before TensorFlow runs, so every bad input gets TF Serving's status code and a message that
names the input: missing or extra inputs, wrong dtype, wrong rank or shape, undecodable tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from ema_export.names import ASSETS_EXTRA_DIR, SIGNATURE_DEFAULT, WARMUP_FILENAME
from serving.server import tensors
from serving.server.errors import RpcStatus, failed_precondition, invalid_argument

SERVE_TAG = "serve"
"""The MetaGraph tag TF Serving loads by default (``--saved_model_tags=serve``)."""

MAX_WARMUP_RECORDS = 1000
"""TF Serving's limit on warmup records (``WarmupConsts::kMaxNumRecords``)."""


class VersionLoadError(Exception):
    """A version could not be loaded or warmed up; the message becomes its END status in GetModelStatus."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TensorSpecInfo:
    """One input of a signature: dtype and shape from its SignatureDef (``-1`` = any size; None = any rank)."""

    name: str
    datatype: int
    shape: tuple[int, ...] | None

    def describe(self) -> str:
        shape = "unknown rank" if self.shape is None else str(list(self.shape))
        return f"{tensors.datatype_name(self.datatype)} {shape}"


@dataclass(frozen=True)
class Signature:
    """A callable serving signature and the input specs requests are checked against."""

    name: str
    function: Any
    inputs: Mapping[str, TensorSpecInfo]
    output_names: tuple[str, ...]

    def run(self, arrays: Mapping[str, np.ndarray], output_filter: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Call the signature on already checked inputs; return the requested outputs (all when no filter)."""
        try:
            # Converting here is ~10% faster than letting the function convert numpy arrays while binding them.
            results = self.function(**{name: tf.constant(array) for name, array in arrays.items()})
        except tf.errors.OpError as error:
            raise RpcStatus(_grpc_code(error.error_code), error.message) from None
        names = output_filter or self.output_names
        return {name: results[name].numpy() for name in names}


class LoadedVersion:
    """A SavedModel version loaded for serving.

    Args:
        model_name: The model it serves under.
        version: Its version number (the directory name).
        path: The version directory.
        signature_defs: Every SignatureDef of the ``serve`` MetaGraph, for GetModelMetadata.
        signatures: The callable ones, by key.
        loaded: The object ``tf.saved_model.load`` returned; held so its variables stay alive.
    """

    def __init__(
        self,
        model_name: str,
        version: int,
        path: Path,
        signature_defs: Mapping[str, meta_graph_pb2.SignatureDef],
        signatures: Mapping[str, Signature],
        loaded: Any,
    ) -> None:
        self.model_name = model_name
        self.version = version
        self.path = path
        self.signature_defs = signature_defs
        self.signatures = signatures
        self.num_warmup_records = 0
        self._loaded = loaded

    def signature(self, signature_name: str) -> Signature:
        """The signature a request names (empty = ``serving_default``), or TF Serving's error for it."""
        key = signature_name or SIGNATURE_DEFAULT
        signature = self.signatures.get(key)
        if signature is not None:
            return signature
        if key in self.signature_defs:
            method = self.signature_defs[key].method_name
            raise RpcStatus(
                grpc.StatusCode.INTERNAL,
                "Expected prediction signature method_name to be one of {tensorflow/serving/predict, "
                f"tensorflow/serving/classify, tensorflow/serving/regress}}. Was: {method}",
            )
        raise failed_precondition(
            f'Serving signature key "{key}" not found. Available signatures: {sorted(self.signatures)}.'
        )

    def predict(self, request: predict_pb2.PredictRequest, *, as_tensor_content: bool = False) -> predict_pb2.PredictResponse:
        """Answer a PredictRequest as TF Serving's ``RunPredict`` does.

        Raises:
            RpcStatus: FAILED_PRECONDITION for an unknown signature, INVALID_ARGUMENT for bad inputs or output
                filters, and TensorFlow's own code if the graph fails at run time.
        """
        signature = self.signature(request.model_spec.signature_name)
        check_input_names(signature, request.inputs.keys())
        arrays = {name: _decode_input(signature.inputs[name], proto) for name, proto in request.inputs.items()}
        outputs = signature.run(arrays, check_output_filter(signature, request.output_filter))
        response = predict_pb2.PredictResponse()
        spec = response.model_spec
        spec.name = request.model_spec.name
        spec.signature_name = signature.name
        spec.version.value = self.version
        for name, array in outputs.items():
            tensors.encode_into(response.outputs[name], array, as_tensor_content=as_tensor_content)
        return response


def check_input_names(signature: Signature, names: Any) -> None:
    """TF Serving's input-set checks: same count, then every alias known (``predict_util.cc``)."""
    sent = set(names)
    expected = set(signature.inputs)
    if sent == expected:
        return
    if len(sent) != len(expected):
        extra = ",".join(sorted(sent - expected))
        missing = ",".join(sorted(expected - sent))
        raise invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(expected)} len({{{','.join(sorted(sent))}}}) "
            f"!= len({{{','.join(sorted(expected))}}}). Sent extra: {{{extra}}}. Missing but required: {{{missing}}}."
        )
    unknown = sorted(sent - expected)[0]
    raise invalid_argument(
        f"input tensor alias not found in signature: {unknown}. Inputs expected to be in the set "
        f"{{{','.join(sorted(expected))}}}."
    )


def check_output_filter(signature: Signature, output_filter: Any) -> tuple[str, ...]:
    """Validate ``output_filter`` as TF Serving does: every alias known, none repeated."""
    seen: list[str] = []
    for alias in output_filter:
        if alias not in signature.output_names:
            raise invalid_argument(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                f"{{{','.join(sorted(signature.output_names))}}}."
            )
        if alias in seen:
            raise invalid_argument(f"duplicate output tensor alias: {alias}")
        seen.append(alias)
    return tuple(seen)


def check_array(spec: TensorSpecInfo, array: np.ndarray) -> None:
    """Check a decoded input's shape against its spec: same rank, and every fixed dimension equal."""
    _check_shape(spec, tuple(array.shape))


def _decode_input(spec: TensorSpecInfo, proto: tensors.TensorProto) -> np.ndarray:
    if proto.dtype != spec.datatype:
        raise invalid_argument(
            f"Expected input {spec.name} to be {tensors.datatype_name(spec.datatype)} but get "
            f"{tensors.datatype_name(proto.dtype)}. The signature expects {spec.describe()} for input '{spec.name}'."
        )
    shape = tensors.proto_shape(proto, spec.name)
    _check_shape(spec, shape)
    return tensors.decode(proto, spec.name, shape)


def _check_shape(spec: TensorSpecInfo, shape: tuple[int, ...]) -> None:
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape) or any(
        expected >= 0 and expected != size for expected, size in zip(spec.shape, shape)
    ):
        rank = f" (rank {len(shape)}, expected rank {len(spec.shape)})" if len(shape) != len(spec.shape) else ""
        raise invalid_argument(
            f"input '{spec.name}' has shape {list(shape)}{rank} but the signature expects {list(spec.shape)} "
            "(-1 = any size); send a tensor of that shape"
        )


def load_version(model_name: str, version: int, path: Path, *, warmup: bool = True) -> LoadedVersion:
    """Load one version directory, then replay its warmup requests if it has any.

    Raises:
        VersionLoadError: the SavedModel cannot be read or loaded, has no ``serve`` MetaGraph, or a warmup
            request fails (TF Serving fails the load in each of these cases).
    """
    signature_defs = _read_signature_defs(path)
    try:
        loaded = tf.saved_model.load(os.fspath(path), tags=[SERVE_TAG])
    except Exception as error:  # TensorFlow raises many types for a broken SavedModel; each fails only this load.
        raise VersionLoadError(f"Failed to load SavedModel at {path}: {type(error).__name__}: {error}") from None
    signatures = {
        key: _signature(key, function, signature_defs[key])
        for key, function in loaded.signatures.items()
        if key in signature_defs
    }
    servable = LoadedVersion(model_name, version, path, signature_defs, signatures, loaded)
    if warmup:
        servable.num_warmup_records = replay_warmup(servable)
    return servable


def _read_signature_defs(path: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    saved_model = saved_model_pb2.SavedModel()
    try:
        saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
    except (OSError, DecodeError) as error:
        raise VersionLoadError(
            f"Could not read {path / 'saved_model.pb'}: {error}. Expected a SavedModel directory",
            grpc.StatusCode.NOT_FOUND if isinstance(error, FileNotFoundError) else grpc.StatusCode.DATA_LOSS,
        ) from None
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise VersionLoadError(f"SavedModel at {path} has no MetaGraph tagged {SERVE_TAG!r}")


def _signature(key: str, function: Any, signature_def: meta_graph_pb2.SignatureDef) -> Signature:
    inputs = {}
    for name, info in signature_def.inputs.items():
        shape = None if info.tensor_shape.unknown_rank else tuple(dim.size for dim in info.tensor_shape.dim)
        inputs[name] = TensorSpecInfo(name, info.dtype, shape)
    return Signature(key, function, inputs, tuple(sorted(signature_def.outputs)))


def replay_warmup(servable: LoadedVersion) -> int:
    """Run ``assets.extra/tf_serving_warmup_requests`` against a version before it serves, as TF Serving does.

    Returns:
        The number of records replayed (0 when the file is absent: warmup data is optional).

    Raises:
        VersionLoadError: the file is not a TFRecord of PredictionLog, has more than 1000 records, holds a log
            type other than ``predict_log``, or one of its requests fails.
    """
    path = servable.path / ASSETS_EXTRA_DIR / WARMUP_FILENAME
    if not path.is_file():
        return 0
    count = 0
    try:
        for record in tf.data.TFRecordDataset(os.fspath(path)).as_numpy_iterator():
            count += 1
            if count > MAX_WARMUP_RECORDS:
                raise VersionLoadError(
                    f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}",
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
            _replay_record(servable, record, count, path)
    except tf.errors.OpError as error:
        raise VersionLoadError(
            f"{error.message}. Please verify your warmup data is in TFRecord format ({path})",
            grpc.StatusCode.DATA_LOSS,
        ) from None
    return count


def _replay_record(servable: LoadedVersion, record: bytes, index: int, path: Path) -> None:
    log = prediction_log_pb2.PredictionLog()
    try:
        log.ParseFromString(record)
    except DecodeError:
        raise VersionLoadError(
            f"Failed to parse warmup record {index} from {path} as a PredictionLog", grpc.StatusCode.INVALID_ARGUMENT
        ) from None
    log_type = log.WhichOneof("log_type")
    if log_type != "predict_log":
        raise VersionLoadError(
            f"Unsupported log_type for warmup: {log_type} (record {index} of {path}); this server replays "
            "predict_log records only",
            grpc.StatusCode.UNIMPLEMENTED,
        )
    try:
        servable.predict(log.predict_log.request)
    except RpcStatus as status:
        raise VersionLoadError(
            f"Warmup request {index} from {path} failed: {status.message}", status.code
        ) from None


def _grpc_code(tf_error_code: int) -> grpc.StatusCode:
    """TensorFlow's error codes are gRPC's numbering; map one to the gRPC enum."""
    for code in grpc.StatusCode:
        if code.value[0] == tf_error_code:
            return code
    return grpc.StatusCode.UNKNOWN
