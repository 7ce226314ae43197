"""The gRPC front end: TF Serving's PredictionService and ModelService, plus the standard health service.

Each method does TF Serving's request-level checks, asks the manager for a servable and answers; every failure is an
`RpcStatus` turned into the same status code and message TF Serving sends, cut at 1024 characters as TF Serving's
``ToGRPCStatus`` cuts it (grpc_status_util.cc:24-35), so no status can outgrow gRPC's metadata limit. An unexpected
exception becomes INTERNAL for that one request (and is logged), so no request can take the server down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from ema_export.contracts import SIGNATURE_DEFAULT
from serving.config import ModelConfigError, validate_model_server_config
from serving.server.errors import RpcStatus, invalid_argument, truncate_status_message
from serving.server.manager import ModelManager, VersionState
from serving.server.servable import (
    CLASSIFY_METHOD,
    REGRESS_METHOD,
    LoadedVersion,
    check_classification_signature,
    check_regression_signature,
)
from serving.server.tensors import DEFAULT_LIMITS, RequestLimits, check_request_cost

logger = logging.getLogger("serving.server")

SIGNATURE_DEF_FIELD = "signature_def"
"""The one metadata field TF Serving answers in GetModelMetadata."""

HEALTH_SERVICE_NAMES = ("", "ModelService", "PredictionService")
"""Exactly what TF Serving's health service knows with ``--enable_grpc_healthcheck_service``: the server as a whole
(``""``, which gRPC's default health service registers) and the two short names server.cc:419-424 sets, once,
after start-up. Any other name, ``tensorflow.serving.PredictionService`` included, is NOT_FOUND there and here."""

Response = TypeVar("Response")


def answer(context: grpc.ServicerContext, handler: Callable[..., Response], *args: Any) -> Response:
    """Run one RPC's handler; turn its RpcStatus (or any unexpected error) into the gRPC status."""
    try:
        return handler(*args)
    except RpcStatus as status:
        code, message = status.code, status.message
    except Exception as error:  # the last line of defence: one bad request must never take the server down
        logger.exception("Unexpected error while answering a request")
        code, message = grpc.StatusCode.INTERNAL, f"Internal error in ema-serving: {type(error).__name__}: {error}"
    context.abort(code, truncate_status_message(message))
    raise AssertionError("context.abort always raises")  # pragma: no cover


def signature_def_map(servable: LoadedVersion) -> get_model_metadata_pb2.SignatureDefMap:
    """Every SignatureDef of a version (``__saved_model_init_op`` included, as TF Serving lists it)."""
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature_def in servable.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature_def)
    return signature_map


def get_model_metadata(
    manager: ModelManager, request: get_model_metadata_pb2.GetModelMetadataRequest
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """GetModelMetadata as TF Serving answers it (``get_model_metadata_impl.cc``)."""
    if not request.HasField("model_spec"):
        raise invalid_argument("Missing ModelSpec")
    if not request.metadata_field:
        raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
    for field in request.metadata_field:
        if field != SIGNATURE_DEF_FIELD:
            raise invalid_argument(f"Metadata field {field} is not supported")
    servable = manager.get_servable(request.model_spec)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.model_name
    response.model_spec.version.value = servable.version
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_def_map(servable))
    return response


def get_model_status(
    manager: ModelManager, request: get_model_status_pb2.GetModelStatusRequest
) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatus as TF Serving answers it: every known version, newest first, or the one asked for."""
    if not request.HasField("model_spec"):
        raise invalid_argument("Missing ModelSpec")
    spec = request.model_spec
    version = spec.version.value if spec.HasField("version") else None
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, state in manager.version_states(spec.name, version):
        _add_version_status(response, number, state)
    return response


def _add_version_status(response: Any, version: int, state: VersionState) -> None:
    status = response.model_version_status.add()
    status.version = version
    status.state = state.state
    status.status.error_code = state.code.value[0]
    status.status.error_message = state.message


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService``: Predict and GetModelMetadata; Classify, Regress and MultiInference
    make TF Serving's checks, then answer UNIMPLEMENTED (this server does not run tf.Example signatures)."""

    def __init__(
        self, manager: ModelManager, *, as_tensor_content: bool = False, limits: RequestLimits = DEFAULT_LIMITS
    ) -> None:
        self._manager = manager
        self._as_tensor_content = as_tensor_content
        self._limits = limits

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (gRPC's method name)
        return answer(context, self._predict, request, context)

    def _predict(self, request: Any, context: grpc.ServicerContext | None = None) -> Any:
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        check_request_cost(request.inputs, self._limits)
        servable = self._manager.get_servable(request.model_spec)
        check_deadline(context)
        response = servable.predict(
            request, as_tensor_content=self._as_tensor_content, check_alive=lambda: check_deadline(context)
        )
        check_deadline(context)  # nobody waits for the answer: do not serialize it
        return response

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return answer(context, get_model_metadata, self._manager, request)

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return answer(context, self._example_method, request, "Classify", check_classification_signature)

    def Regress(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return answer(context, self._example_method, request, "Regress", check_regression_signature)

    def MultiInference(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return answer(context, self._multi_inference, request)

    def _example_method(self, request: Any, method: str, check: Callable[[LoadedVersion, str], Any]) -> Any:
        """Classify/Regress: TF Serving's checks (classification_service.cc:36-41, classifier.cc:151-221), then
        this server's one limit: it does not run tf.Example signatures."""
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        servable = self._manager.get_servable(request.model_spec)
        check(servable, request.model_spec.signature_name)
        raise _examples_unimplemented(method)

    def _multi_inference(self, request: Any) -> Any:
        """MultiInference: TF Serving's per-task checks (multi_inference.cc:43-83), then this server's one limit."""
        tasks = request.tasks
        # The servable is looked up with the first task's spec, or an empty one (multi_inference_helper.cc:28-33).
        spec = tasks[0].model_spec if tasks and tasks[0].HasField("model_spec") else model_pb2.ModelSpec()
        servable = self._manager.get_servable(spec)
        model_name = ""
        signature_names: set[str] = set()
        for task in tasks:
            if not task.model_spec.name:
                raise invalid_argument("Found ModelSpec with an empty model name.")
            if model_name and model_name != task.model_spec.name:
                raise invalid_argument("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
            model_name = task.model_spec.name
            signature_name = task.model_spec.signature_name or SIGNATURE_DEFAULT
            if signature_name in signature_names:
                raise invalid_argument(f"Duplicate evaluation of signature: {signature_name}")
            signature_names.add(signature_name)
            if signature_name not in servable.signature_defs:
                raise invalid_argument(f"Requested signature not found in model graph: {signature_name}")
            if task.method_name == CLASSIFY_METHOD:
                check_classification_signature(servable, signature_name)
            elif task.method_name == REGRESS_METHOD:
                check_regression_signature(servable, signature_name)
            else:
                raise RpcStatus(
                    grpc.StatusCode.UNIMPLEMENTED, f"Unsupported signature method_name: {task.method_name}"
                )
        raise _examples_unimplemented("MultiInference")


def check_deadline(context: grpc.ServicerContext | None) -> None:
    """Stop work nobody waits for: the client cancelled, or its deadline passed (TF Serving hands the deadline
    to ``Session::Run`` as its timeout, ``model_servers/prediction_service_impl.cc`` 42-45)."""
    if context is None:
        return
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise RpcStatus(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    if not context.is_active():
        raise RpcStatus(grpc.StatusCode.CANCELLED, "The client cancelled the request")


def _examples_unimplemented(method: str) -> RpcStatus:
    """Where TF Serving would now parse tf.Examples and run the signature, which this server does not do."""
    return RpcStatus(
        grpc.StatusCode.UNIMPLEMENTED,
        f"{method} passed TF Serving's signature checks, but the ema-serving local server does not run tf.Example "
        "signatures; call Predict (ema-export writes predict signatures serve_live, serve_ema, serving_default)",
    )


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``: GetModelStatus and HandleReloadConfigRequest."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return answer(context, get_model_status, self._manager, request)

    def HandleReloadConfigRequest(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return answer(context, self._reload, request)

    def _reload(self, request: Any) -> Any:
        config = request.config
        if config.WhichOneof("config") != "model_config_list":
            raise invalid_argument(
                "ServerModelConfig type not supported by HandleReloadConfigRequest. Only ModelConfigList is "
                "currently supported"
            )
        try:
            validate_model_server_config(config, allow_empty=True)
        except ModelConfigError as error:
            raise invalid_argument(str(error)) from None
        self._manager.apply_config(config)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_code = grpc.StatusCode.OK.value[0]
        return response


def make_health_servicer() -> health.HealthServicer:
    """The standard ``grpc.health.v1.Health`` service, SERVING for exactly the names TF Serving sets."""
    servicer = health.HealthServicer()
    for name in HEALTH_SERVICE_NAMES:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def add_services(server: grpc.Server, manager: ModelManager, health_servicer: health.HealthServicer | None, *,
                 as_tensor_content: bool = False, limits: RequestLimits = DEFAULT_LIMITS) -> None:
    """Register the prediction and model services, and the health service when one is given.

    TF Serving registers health only with ``--enable_grpc_healthcheck_service`` (server.cc:415-416); without it a
    health check is UNIMPLEMENTED there, and here.
    """
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(manager, as_tensor_content=as_tensor_content, limits=limits), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), server)
    if health_servicer is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
