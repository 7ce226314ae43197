"""One loaded SavedModel version: its signatures, request validation, Predict, and warmup replay.

Versions run the way TF Serving runs them: the SavedModel's ``serve`` MetaGraph is loaded into its own graph and
session (``tf.compat.v1.saved_model.loader``, the Python face of TF Serving's ``SavedModelBundle``), and each
signature becomes a session callable that feeds and fetches the SignatureDef's tensor names. Why not the eager
``tf.saved_model.load(...).signatures``: a session callable costs ~90 us less Python per call and runs about twice as
many small concurrent requests, and a SavedModel that loads here is one TF Serving's loader accepts.

A `LoadedVersion` is immutable once built and safe to call from many threads at once (``Session.run`` is
thread-safe). The manager swaps versions by replacing references, so a request that already holds a version finishes
on it even after that version is unloaded: Python keeps the session alive until the last request lets go, which is
how a hot swap never fails an in-flight request.

Request checks happen before TensorFlow runs, so every bad input gets TF Serving's status code and a message that
names the input: missing or extra inputs, wrong dtype, wrong rank or shape, undecodable tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
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

_SERVING_METHODS = frozenset(
    {"tensorflow/serving/predict", "tensorflow/serving/classify", "tensorflow/serving/regress"}
)
"""Signature methods TF Serving's Predict runs; any other (``__saved_model_init_op``) answers INTERNAL."""

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
    """A callable serving signature and the input specs requests are checked against.

    Attributes:
        name: The signature key.
        inputs: Input specs, in the order ``call`` takes them.
        output_names: Output aliases, in the order ``call`` returns them.
        call: Runs the signature: input arrays in, output arrays out (a session callable).
    """

    name: str
    inputs: Mapping[str, TensorSpecInfo]
    output_names: tuple[str, ...]
    call: Callable[..., list[np.ndarray]]

    def run(self, arrays: Mapping[str, np.ndarray], output_filter: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Run the signature on already checked inputs; return the requested outputs (all when no filter)."""
        try:
            values = self.call(*(arrays[name] for name in self.inputs))
        except tf.errors.OpError as error:
            raise RpcStatus(_grpc_code(error.error_code), error.message) from None
        except (TypeError, ValueError) as error:  # feeding checks that the checks above should already have caught
            raise invalid_argument(f"Could not feed the inputs of signature {self.name}: {error}") from None
        results = dict(zip(self.output_names, values, strict=True))
        return {name: results[name] for name in output_filter} if output_filter else results


class LoadedVersion:
    """A SavedModel version loaded for serving.

    Args:
        model_name: The model it serves under.
        version: Its version number (the directory name).
        path: The version directory.
        signature_defs: Every SignatureDef of the ``serve`` MetaGraph, for GetModelMetadata.
        signatures: The callable ones, by key.
        session: The session the version's graph runs in; held so it lives as long as the version.
    """

    def __init__(
        self,
        model_name: str,
        version: int,
        path: Path,
        signature_defs: Mapping[str, meta_graph_pb2.SignatureDef],
        signatures: Mapping[str, Signature],
        session: tf.compat.v1.Session,
    ) -> None:
        self.model_name = model_name
        self.version = version
        self.path = path
        self.signature_defs = signature_defs
        self.signatures = signatures
        self.num_warmup_records = 0
        self._session = session

    def signature(self, signature_name: str) -> Signature:
        """The signature a request names (empty = ``serving_default``), or TF Serving's error for it."""
        key = signature_name or SIGNATURE_DEFAULT
        signature = self.signatures.get(key)
        if signature is not None:
            return signature
        if key in self.signature_defs:
            method = self.signature_defs[key].method_name
            if method in _SERVING_METHODS:
                raise invalid_argument(
                    f"Signature {key} has sparse or composite inputs or outputs, which Predict cannot feed or fetch"
                )
            raise RpcStatus(
                grpc.StatusCode.INTERNAL,
                "Expected prediction signature method_name to be one of {tensorflow/serving/predict, "
                f"tensorflow/serving/classify, tensorflow/serving/regress}}. Was: {method}",
            )
        raise failed_precondition(
            f'Serving signature key "{key}" not found. Available signatures: {sorted(self.signatures)}.'
        )

    def predict(
        self, request: predict_pb2.PredictRequest, *, as_tensor_content: bool = False
    ) -> predict_pb2.PredictResponse:
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
        expected >= 0 and expected != size for expected, size in zip(spec.shape, shape, strict=True)
    ):
        rank = f" (rank {len(shape)}, expected rank {len(spec.shape)})" if len(shape) != len(spec.shape) else ""
        raise invalid_argument(
            f"input '{spec.name}' has shape {list(shape)}{rank} but the signature expects {list(spec.shape)} "
            "(-1 = any size); send a tensor of that shape"
        )


def load_version(model_name: str, version: int, path: Path, *, warmup: bool = True) -> LoadedVersion:
    """Load one version directory into its own session, then replay its warmup requests if it has any.

    Raises:
        VersionLoadError: the SavedModel cannot be read or loaded, has no ``serve`` MetaGraph, or a warmup
            request fails (TF Serving fails the load in each of these cases).
    """
    _check_saved_model(path)
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    try:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, [SERVE_TAG], os.fspath(path))
        signature_defs = dict(meta_graph.signature_def)
        signatures = {
            key: _signature(key, signature_def, graph, session)
            for key, signature_def in signature_defs.items()
            if signature_def.method_name in _SERVING_METHODS and _feedable(signature_def)
        }
    except Exception as error:  # TensorFlow raises many types for a broken SavedModel; each fails only this load.
        session.close()
        raise VersionLoadError(f"Failed to load SavedModel at {path}: {type(error).__name__}: {error}") from None
    servable = LoadedVersion(model_name, version, path, signature_defs, signatures, session)
    if warmup:
        servable.num_warmup_records = replay_warmup(servable)
    return servable


def _check_saved_model(path: Path) -> None:
    """Refuse a directory that is not a SavedModel with a ``serve`` MetaGraph, with a message naming the file."""
    saved_model = saved_model_pb2.SavedModel()
    try:
        saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
    except (OSError, DecodeError) as error:
        raise VersionLoadError(
            f"Could not read {path / 'saved_model.pb'}: {error}. Expected a SavedModel directory",
            grpc.StatusCode.NOT_FOUND if isinstance(error, FileNotFoundError) else grpc.StatusCode.DATA_LOSS,
        ) from None
    if not any(SERVE_TAG in meta_graph.meta_info_def.tags for meta_graph in saved_model.meta_graphs):
        raise VersionLoadError(f"SavedModel at {path} has no MetaGraph tagged {SERVE_TAG!r}")


def _feedable(signature_def: meta_graph_pb2.SignatureDef) -> bool:
    """Predict feeds and fetches tensors by name; sparse or composite tensors have none."""
    infos = list(signature_def.inputs.values()) + list(signature_def.outputs.values())
    return all(info.name for info in infos)


def _signature(
    key: str, signature_def: meta_graph_pb2.SignatureDef, graph: tf.Graph, session: tf.compat.v1.Session
) -> Signature:
    inputs = {}
    for name, info in sorted(signature_def.inputs.items()):
        shape = None if info.tensor_shape.unknown_rank else tuple(dim.size for dim in info.tensor_shape.dim)
        inputs[name] = TensorSpecInfo(name, info.dtype, shape)
    output_names = tuple(sorted(signature_def.outputs))
    call = session.make_callable(
        [graph.get_tensor_by_name(signature_def.outputs[name].name) for name in output_names],
        feed_list=[graph.get_tensor_by_name(signature_def.inputs[name].name) for name in inputs],
    )
    return Signature(key, inputs, output_names, call)


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
