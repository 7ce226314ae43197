"""One loaded SavedModel version: its signatures, Predict as TF Serving runs it, and warmup replay.

Versions run the way TF Serving runs them: the SavedModel's ``serve`` MetaGraph is loaded into its own graph and
session (``tf.compat.v1.saved_model.loader``, the Python face of TF Serving's ``SavedModelBundle``), and a request
feeds and fetches the SignatureDef's tensor names through a C++ session callable (``Session::MakeCallable``).
Why the C++ callable and not ``Session.run``/``make_callable``: those check dtype and shape in Python first, with
messages TF Serving never sends, and cast an int64 feed to float where TF Serving's session refuses it. The callable
hands the arrays to the same C++ executor TF Serving uses, so a wrong dtype or shape fails exactly where and how it
fails there (``Type mismatch: actual int64 vs. expect float``, ``Matrix size-incompatible: ...``), or succeeds where
it succeeds there. It is TensorFlow's private ``Session._make_callable_from_options``; this module is the one place
that uses it, and ``tests/test_server_fidelity.py`` fails loudly if it changes.

A `LoadedVersion` is safe to call from many threads at once (C++ callables are thread-safe; each signature keeps a
small cache of them, one per set of fetched outputs). The manager swaps versions by replacing references, so a
request that already holds a version finishes on it even after that version is unloaded: Python keeps the session
alive until the last request lets go, which is how a hot swap never fails an in-flight request.

Request checks are TF Serving's and no stricter (``predict_util.cc`` ``PreProcessPrediction`` and TensorFlow's
``saved_model::GetInputValues``): input count, aliases, SignatureDef ``defaults`` for inputs the request leaves out,
tensor parsing, output filter. Dtype and shape are not pre-checked: the graph checks them when it runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from ema_export.contracts import ASSETS_EXTRA_DIR, SIGNATURE_DEFAULT, WARMUP_FILENAME
from serving import codec
from serving.server import tensors
from serving.server.errors import RpcStatus, failed_precondition, invalid_argument

SERVE_TAG = "serve"
"""The MetaGraph tag TF Serving loads by default (``--saved_model_tags=serve``)."""

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
_SERVING_METHODS = (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD)
"""Signature methods Predict accepts under ``--enable_signature_method_name_check`` (predict_util.cc:38-49)."""

CLASSIFY_INPUTS = "inputs"
CLASSIFY_OUTPUT_CLASSES = "classes"
CLASSIFY_OUTPUT_SCORES = "scores"
REGRESS_INPUTS = "inputs"
REGRESS_OUTPUTS = "outputs"
"""TensorFlow's signature_constants keys that Classify and Regress look for (classifier.cc:194-211,
regressor.cc:186-200)."""

MAX_WARMUP_RECORDS = 1000
"""TF Serving's limit on warmup records (``WarmupConsts::kMaxNumRecords``)."""

_MAX_CACHED_CALLABLES = 64
"""Callables kept per signature (one per distinct output filter); beyond this each odd filter builds its own."""


class VersionLoadError(Exception):
    """A version could not be loaded or warmed up; the message becomes its END status in GetModelStatus."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TensorSpecInfo:
    """One input of a signature as its SignatureDef declares it (the REST API converts JSON to ``datatype``)."""

    name: str
    datatype: int
    feed_name: str


@dataclass(frozen=True)
class Signature:
    """One SignatureDef of a loaded version, runnable through the version's session.

    Attributes:
        name: The signature key.
        signature_def: The SignatureDef itself (method name, defaults, Classify/Regress checks).
        inputs: Input specs by alias, sorted by alias.
        output_names: Output aliases, sorted.
        session: The version's session.
    """

    name: str
    signature_def: meta_graph_pb2.SignatureDef
    inputs: Mapping[str, TensorSpecInfo]
    output_names: tuple[str, ...]
    session: tf.compat.v1.Session
    _callables: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def call(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Run with every input (in ``inputs`` order); return every output (in ``output_names`` order)."""
        outputs = self.run(dict(zip(self.inputs, arrays, strict=True)))
        return [outputs[name] for name in self.output_names]

    def run(self, arrays: Mapping[str, np.ndarray], output_filter: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Feed the arrays by alias, fetch the filtered outputs (all when no filter), as TF Serving's session run.

        Raises:
            RpcStatus: TensorFlow's own code and message when the graph refuses the inputs or fails.
        """
        feeds = tuple(arrays)
        fetches = output_filter or self.output_names
        try:
            values = self._callable(feeds, fetches)(*(arrays[alias] for alias in feeds))
        except tf.errors.OpError as error:
            raise RpcStatus(_grpc_code(error.error_code), error.message) from None
        except (TypeError, ValueError) as error:  # numpy -> TF_Tensor conversion (e.g. a ragged object array)
            raise invalid_argument(f"Could not feed the inputs of signature {self.name}: {error}") from None
        return dict(zip(fetches, values, strict=True))

    def _callable(self, feeds: tuple[str, ...], fetches: tuple[str, ...]) -> Any:
        key = (feeds, fetches)
        cached = self._callables.get(key)
        if cached is not None:
            return cached
        options = config_pb2.CallableOptions(
            feed=[self.signature_def.inputs[alias].name for alias in feeds],
            fetch=[self.signature_def.outputs[alias].name for alias in fetches],
        )
        # The one private TensorFlow API here (see the module docstring for why).
        made = self.session._make_callable_from_options(options)
        with self._lock:
            if len(self._callables) < _MAX_CACHED_CALLABLES:
                self._callables.setdefault(key, made)
        return made


class LoadedVersion:
    """A SavedModel version loaded for serving.

    Args:
        model_name: The model it serves under.
        version: Its version number (the directory name).
        path: The version directory.
        signature_defs: Every SignatureDef of the ``serve`` MetaGraph, for GetModelMetadata.
        session: The session the version's graph runs in; held so it lives as long as the version.
        method_name_check: TF Serving's ``--enable_signature_method_name_check``.
    """

    def __init__(
        self,
        model_name: str,
        version: int,
        path: Path,
        signature_defs: Mapping[str, meta_graph_pb2.SignatureDef],
        session: tf.compat.v1.Session,
        *,
        method_name_check: bool = False,
    ) -> None:
        self.model_name = model_name
        self.version = version
        self.path = path
        self.signature_defs = signature_defs
        self.signatures = {key: _signature(key, definition, session) for key, definition in signature_defs.items()}
        self.method_name_check = method_name_check
        self.num_warmup_records = 0
        self._session = session

    def signature(self, signature_name: str) -> Signature:
        """The signature a Predict request names (empty = ``serving_default``), or TF Serving's error for it.

        Raises:
            RpcStatus: FAILED_PRECONDITION ``Serving signature key "X" not found.`` (predict_util.cc:88-94); with
                the method-name check on, INTERNAL for a signature whose method is not a serving one
                (predict_util.cc:38-49).
        """
        key = signature_name or SIGNATURE_DEFAULT
        signature = self.signatures.get(key)
        if signature is None:
            raise failed_precondition(f'Serving signature key "{key}" not found.')
        method = signature.signature_def.method_name
        if self.method_name_check and method not in _SERVING_METHODS:
            raise RpcStatus(
                grpc.StatusCode.INTERNAL,
                f"Expected prediction signature method_name to be one of {{{', '.join(_SERVING_METHODS)}}}. "
                f"Was: {method}",
            )
        return signature

    def predict(
        self,
        request: predict_pb2.PredictRequest,
        *,
        as_tensor_content: bool = False,
        check_alive: Callable[[], None] = lambda: None,
    ) -> predict_pb2.PredictResponse:
        """Answer a PredictRequest as TF Serving's ``RunPredict`` does (predict_util.cc:79-119).

        ``check_alive`` runs between the heavy steps (decode, run, encode) and raises to stop a request nobody
        waits for any more (deadline passed, client gone).

        Raises:
            RpcStatus: FAILED_PRECONDITION for an unknown signature, INVALID_ARGUMENT for a wrong input set,
                an undecodable tensor or a bad output filter, and TensorFlow's own code when the graph fails.
        """
        signature = self.signature(request.model_spec.signature_name)
        arrays = input_values(signature, request.inputs)
        check_alive()
        outputs = signature.run(arrays, check_output_filter(signature, request.output_filter))
        check_alive()
        response = predict_pb2.PredictResponse()
        spec = response.model_spec
        spec.name = request.model_spec.name
        spec.signature_name = signature.name
        spec.version.value = self.version
        for name, array in outputs.items():
            # Tensor::AsProtoTensorContent when asked, else AsProtoField (typed values), as TF Serving answers.
            codec.encode(array, form="content" if as_tensor_content else "values", out=response.outputs[name])
        return response


def input_values(signature: Signature, request_inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays to feed: TF Serving's input-count check, then TensorFlow's ``GetInputValues``.

    The count check is ``VerifyRequestInputsSize`` (predict_util.cc:51-76): more inputs than the signature has, or
    fewer when it has no ``defaults``, is refused listing both sets. Then every signature input, in alias order,
    comes from the request or from the SignatureDef's ``defaults`` (tensorflow/cc/saved_model/util.cc
    ``GetInputValues``), and a request alias the signature does not have is refused after that.

    Raises:
        RpcStatus: INVALID_ARGUMENT with TF Serving's messages.
    """
    definition = signature.signature_def
    sent, expected = set(request_inputs), set(signature.inputs)
    if len(sent) > len(expected) or (len(sent) < len(expected) and not definition.defaults):
        raise invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(expected)} len({{{_join(sent)}}}) != "
            f"len({{{_join(expected)}}}). Sent extra: {{{_join(sent - expected)}}}. Missing but required: "
            f"{{{_join(expected - sent)}}}."
        )
    arrays: dict[str, np.ndarray] = {}
    for alias, spec in signature.inputs.items():
        proto = request_inputs.get(alias) if alias in sent else definition.defaults.get(alias)
        if proto is None:
            raise invalid_argument(
                f"Signature input alias: {alias}(feed name: {spec.feed_name}) not found in request and no default "
                f"value provided. Inputs expected to be in the request {{{_join(sent)}}}, or default input alias "
                f"set: {_join(definition.defaults)}"
            )
        arrays[alias] = tensors.decode(proto, alias)
    used = sent & expected
    if sent and len(used) != len(sent):
        raise invalid_argument(
            f"Inputs contains invalid name. Used request inputs: {_join(used)}, request input: {_join(sent)}"
        )
    return arrays


def check_output_filter(signature: Signature, output_filter: Any) -> tuple[str, ...]:
    """Validate ``output_filter`` as TF Serving does: every alias known, none repeated (predict_util.cc:131-154)."""
    seen: list[str] = []
    for alias in output_filter:
        if alias not in signature.output_names:
            raise invalid_argument(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                f"{{{_join(signature.output_names)}}}."
            )
        if alias in seen:
            raise invalid_argument(f"duplicate output tensor alias: {alias}")
        seen.append(alias)
    return tuple(seen)


def check_classification_signature(servable: LoadedVersion, signature_name: str) -> meta_graph_pb2.SignatureDef:
    """The signature a Classify request may run, or TF Serving's refusal (classifier.cc:151-221).

    Raises:
        RpcStatus: INVALID_ARGUMENT with ``GetClassificationSignatureDef``/``PreProcessClassification``'s messages.
    """
    definition = _example_signature(servable, signature_name)
    if servable.method_name_check:
        _check_method(definition, CLASSIFY_METHOD, "classification")
        return definition
    _check_example_io(definition, CLASSIFY_INPUTS, "classification", max_outputs=2)
    if not {CLASSIFY_OUTPUT_CLASSES, CLASSIFY_OUTPUT_SCORES} & set(definition.outputs):
        raise invalid_argument(
            f'Expected classification signature outputs to contain at least one of "{CLASSIFY_OUTPUT_CLASSES}" or '
            f'"{CLASSIFY_OUTPUT_SCORES}". Signature was: {_debug_string(definition)}'
        )
    return definition


def check_regression_signature(servable: LoadedVersion, signature_name: str) -> meta_graph_pb2.SignatureDef:
    """The signature a Regress request may run, or TF Serving's refusal (regressor.cc:146-205).

    Raises:
        RpcStatus: INVALID_ARGUMENT with ``GetRegressionSignatureDef``/``PreProcessRegression``'s messages.
    """
    definition = _example_signature(servable, signature_name)
    if servable.method_name_check:
        _check_method(definition, REGRESS_METHOD, "regression")
        return definition
    _check_example_io(definition, REGRESS_INPUTS, "regression", max_outputs=1)
    if REGRESS_OUTPUTS not in definition.outputs:
        raise invalid_argument(f"No regression outputs found in SignatureDef: {_debug_string(definition)}")
    return definition


def _example_signature(servable: LoadedVersion, signature_name: str) -> meta_graph_pb2.SignatureDef:
    key = signature_name or SIGNATURE_DEFAULT
    definition = servable.signature_defs.get(key)
    if definition is None:
        raise invalid_argument(f"No signature was found with the name: {key}")
    return definition


def _check_method(definition: meta_graph_pb2.SignatureDef, method: str, kind: str) -> None:
    if definition.method_name != method:
        raise invalid_argument(f"Expected {kind} signature method_name to be {method}. Was: {definition.method_name}")


def _check_example_io(definition: meta_graph_pb2.SignatureDef, input_key: str, kind: str, max_outputs: int) -> None:
    if len(definition.inputs) != 1:
        raise invalid_argument("Expected one input Tensor.")
    if max_outputs == 2 and len(definition.outputs) not in (1, 2):
        raise invalid_argument(f"Expected one or two output Tensors, found {len(definition.outputs)}")
    if max_outputs == 1 and len(definition.outputs) != 1:
        raise invalid_argument("Expected one output Tensor.")
    if input_key not in definition.inputs:
        raise invalid_argument(f"No {kind} inputs found in SignatureDef: {_debug_string(definition)}")


def _debug_string(message: Any) -> str:
    """A proto as C++ ``DebugString`` writes it (text format), which TF Serving puts in some messages."""
    return text_format.MessageToString(message)


def _join(names: Any) -> str:
    """A set of names as ``absl::StrJoin(std::set, ",")`` writes it: sorted, comma-separated."""
    return ",".join(sorted(names))


def load_version(
    model_name: str, version: int, path: Path, *, warmup: bool = True, method_name_check: bool = False
) -> LoadedVersion:
    """Load one version directory into its own session, then replay its warmup requests if it has any.

    Args:
        model_name: The model it serves under.
        version: Its version number.
        path: The version directory.
        warmup: Replay ``assets.extra/tf_serving_warmup_requests`` (``--enable_model_warmup``).
        method_name_check: ``--enable_signature_method_name_check``.

    Raises:
        VersionLoadError: the SavedModel cannot be read or loaded, has no ``serve`` MetaGraph, or a warmup
            request fails (TF Serving fails the load in each of these cases).
    """
    _check_saved_model(path)
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    try:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, [SERVE_TAG], os.fspath(path))
        servable = LoadedVersion(
            model_name, version, path, dict(meta_graph.signature_def), session, method_name_check=method_name_check
        )
    except Exception as error:  # TensorFlow raises many types for a broken SavedModel; each fails only this load.
        session.close()
        raise VersionLoadError(f"Failed to load SavedModel at {path}: {type(error).__name__}: {error}") from None
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


def _signature(key: str, definition: meta_graph_pb2.SignatureDef, session: tf.compat.v1.Session) -> Signature:
    inputs = {
        alias: TensorSpecInfo(alias, info.dtype, info.name) for alias, info in sorted(definition.inputs.items())
    }
    return Signature(key, definition, inputs, tuple(sorted(definition.outputs)), session)


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
