"""The gRPC front end: TF Serving's PredictionService and ModelService, plus the standard health service.

Each method does TF Serving's request-level checks, asks the manager for a servable and answers; every failure is an
`RpcStatus` turned into the same status code and message TF Serving sends. An unexpected exception becomes INTERNAL
for that one request (and is logged), so no request can take the server down.
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
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from serving.config import ModelConfigError, validate_model_server_config
from serving.server.errors import RpcStatus, invalid_argument
from serving.server.manager import ModelManager, VersionState
from serving.server.servable import LoadedVersion

logger = logging.getLogger("serving.server")

SIGNATURE_DEF_FIELD = "signature_def"
"""The one metadata field TF Serving answers in GetModelMetadata."""

HEALTH_SERVICE_NAMES = (
    "",
    "ModelService",
    "PredictionService",
    "tensorflow.serving.ModelService",
    "tensorflow.serving.PredictionService",
)
"""Service names the health service reports: the server as a whole (""), the two names TF Serving registers with
``--enable_grpc_healthcheck_service``, and the fully qualified names most health probes ask for."""

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
    context.abort(code, message)
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
    """``tensorflow.serving.PredictionService``: Predict and GetModelMetadata; the rest answer UNIMPLEMENTED."""

    def __init__(self, manager: ModelManager, *, as_tensor_content: bool = False) -> None:
        self._manager = manager
        self._as_tensor_content = as_tensor_content

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (gRPC's method name)
        return answer(context, self._predict, request)

    def _predict(self, request: Any) -> Any:
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        servable = self._manager.get_servable(request.model_spec)
        return servable.predict(request, as_tensor_content=self._as_tensor_content)

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return answer(context, get_model_metadata, self._manager, request)

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _unimplemented(context, "Classify")

    def Regress(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _unimplemented(context, "Regress")

    def MultiInference(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _unimplemented(context, "MultiInference")


def _unimplemented(context: grpc.ServicerContext, method: str) -> Any:
    context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        f"{method} is not implemented by the ema-serving local server, which serves Predict signatures; "
        "call Predict with signature_name serve_live, serve_ema or serving_default",
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
    """The standard ``grpc.health.v1.Health`` service, SERVING for the server and both TF Serving services."""
    servicer = health.HealthServicer()
    for name in HEALTH_SERVICE_NAMES:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def add_services(server: grpc.Server, manager: ModelManager, health_servicer: health.HealthServicer, *,
                 as_tensor_content: bool = False) -> None:
    """Register the prediction, model and health services on a gRPC server."""
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(manager, as_tensor_content=as_tensor_content), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
