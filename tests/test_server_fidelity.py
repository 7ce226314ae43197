"""The local server refuses nothing TF Serving accepts, and refuses the rest with TF Serving's code and message.

Two kinds of model are served: the seed model exported by ema-export (`labelled_server`), and a small graph written
here with TensorFlow's own SavedModel builder whose signatures exercise what ema-export never writes: an input with a
SignatureDef default, a custom method name, an int8 input, a classify-shaped signature. Each test names the TF
Serving source it follows (`fidelity.follows`), which README's fidelity table lists.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)

from ema_export.names import SIGNATURE_EMA
from serving.server import start_server
from serving.server.errors import MAX_STATUS_MESSAGE_CHARS, TRUNCATION_MARK
from serving.server.manager import ModelManager
from serving.server.servable import CLASSIFY_METHOD, PREDICT_METHOD
from support.fidelity import follows
from support.graph_model import DEFAULT_SCALE, GRAPH_MODEL
from support.rpc import INPUT_NAME, MODEL_NAME, connect, output_of, predict_request, rpc_error, sample_inputs

pytestmark = pytest.mark.slow  # serves exports of the seed model (exported once per session)

StatusCode = grpc.StatusCode


@pytest.fixture(scope="module")
def graph_stubs(graph_server):
    stubs = connect(graph_server.port)
    yield stubs
    stubs.channel.close()


@pytest.fixture(scope="module")
def stubs(labelled_server):
    connection = connect(labelled_server.port)
    yield connection
    connection.channel.close()


def graph_request(signature: str = "", **arrays: np.ndarray) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = GRAPH_MODEL
    request.model_spec.signature_name = signature
    for name, array in arrays.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    return request


# ------------------------------------------------------------------------------------------------ health


@follows("Health answers exactly `\"\"`, `ModelService`, `PredictionService`; any other name is NOT_FOUND",
         "model_servers/server.cc:415-424")
@pytest.mark.parametrize("service", ["tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
                                     "Predict", "unknown"])
def test_health_knows_only_the_names_tf_serving_sets(stubs, service):
    health = health_pb2_grpc.HealthStub(stubs.channel)
    error = rpc_error(health.Check, health_pb2.HealthCheckRequest(service=service))
    assert error.code() == StatusCode.NOT_FOUND


@follows("No health service unless `--enable_grpc_healthcheck_service` (off by default)",
         "model_servers/server.h:107")
def test_health_service_is_off_without_its_flag(graph_stubs):
    health = health_pb2_grpc.HealthStub(graph_stubs.channel)
    error = rpc_error(health.Check, health_pb2.HealthCheckRequest(service=""))
    assert error.code() == StatusCode.UNIMPLEMENTED


# ------------------------------------------------------------------------------------- no stricter than TF Serving


@follows("SignatureDef `defaults` fill inputs the request leaves out", "tensorflow/cc/saved_model/util.cc:45-87")
def test_signature_defaults_fill_missing_inputs(graph_stubs):
    x = np.array([[1.0, 2.0]], np.float32)
    response = graph_stubs.prediction.Predict(graph_request(x=x), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["y"]), x * DEFAULT_SCALE)
    response = graph_stubs.prediction.Predict(graph_request(x=x, scale=np.float32(5.0)), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["y"]), x * 5.0)


@follows("A request alias the signature lacks is refused after the defaults are applied, listing both sets",
         "tensorflow/cc/saved_model/util.cc:45-87")
def test_unknown_alias_beside_a_defaulted_input(graph_stubs):
    x = np.array([[1.0, 2.0]], np.float32)
    error = rpc_error(graph_stubs.prediction.Predict, graph_request(x=x, bogus=x))
    assert error.code() == StatusCode.INVALID_ARGUMENT
    assert error.details() == "Inputs contains invalid name. Used request inputs: x, request input: bogus,x"


@follows("Method name not checked unless `--enable_signature_method_name_check`; with it, INTERNAL",
         "servables/tensorflow/predict_util.cc:38-49")
def test_method_name_is_checked_only_with_the_flag(graph_stubs, graph_base_path):
    request = graph_request("custom_method", x=np.ones((1, 2), np.float32))
    response = graph_stubs.prediction.Predict(request, timeout=30)
    assert tf.make_ndarray(response.outputs["y"]).shape == (1, 2)
    with start_server(model_name=GRAPH_MODEL, model_base_path=graph_base_path, port=0,
                      file_system_poll_wait_seconds=0, enable_signature_method_name_check=True) as server:
        checked = connect(server.port)
        error = rpc_error(checked.prediction.Predict, request)
        checked.channel.close()
    assert error.code() == StatusCode.INTERNAL
    assert error.details() == (
        "Expected prediction signature method_name to be one of {tensorflow/serving/predict, "
        "tensorflow/serving/classify, tensorflow/serving/regress}. Was: custom/method"
    )


@follows("Dtype is not pre-checked: the graph refuses a wrong dtype with TensorFlow's message",
         "servables/tensorflow/predict_util.cc:109-111")
def test_wrong_dtype_fails_in_the_graph(stubs):
    request = predict_request()
    request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(np.ones((2, 4), np.int32)))
    error = rpc_error(stubs.prediction.Predict, request)
    assert error.code() == StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("Type mismatch: actual int32 vs. expect float")


@follows("Shape is not pre-checked: a shape the graph can run succeeds", "servables/tensorflow/predict_util.cc:109-111")
def test_shape_the_graph_accepts_succeeds(graph_stubs):
    # The SignatureDef says [-1, 2]; Mul broadcasts a [2, 3, 2] input, and TF Serving runs it.
    x = np.ones((2, 3, 2), np.float32)
    response = graph_stubs.prediction.Predict(graph_request(x=x), timeout=30)
    assert tf.make_ndarray(response.outputs["y"]).shape == (2, 3, 2)


# --------------------------------------------------------------------------------------------- messages, codes


@follows("Unknown signature: FAILED_PRECONDITION `Serving signature key \"X\" not found.`",
         "servables/tensorflow/predict_util.cc:88-94")
def test_unknown_signature_message_is_tf_servings(stubs):
    error = rpc_error(stubs.prediction.Predict, predict_request(sample_inputs(), signature="nope"))
    assert error.code() == StatusCode.FAILED_PRECONDITION
    assert error.details() == 'Serving signature key "nope" not found.'


@follows("Status messages over 1024 bytes are cut and end in `...TRUNCATED`", "model_servers/grpc_status_util.cc:24-35")
def test_long_messages_are_truncated_not_dropped(stubs):
    request = predict_request(sample_inputs())
    for index in range(300):  # every alias is echoed back: ~20 KB of message
        request.inputs[f"extra_input_with_a_long_name_{index:04d}"].CopyFrom(request.inputs[INPUT_NAME])
    error = rpc_error(stubs.prediction.Predict, request)
    assert error.code() == StatusCode.INVALID_ARGUMENT  # not RESOURCE_EXHAUSTED from an oversized trailer
    assert error.details().startswith("input size does not match signature: 301!=1")
    assert error.details().endswith(TRUNCATION_MARK)
    assert len(error.details()) == MAX_STATUS_MESSAGE_CHARS + len(TRUNCATION_MARK)


@follows("Classify on a predict signature: INVALID_ARGUMENT from the signature checks, not UNIMPLEMENTED",
         "servables/tensorflow/classifier.cc:179-212")
def test_classify_on_a_predict_signature(stubs):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = SIGNATURE_EMA
    error = rpc_error(stubs.prediction.Classify, request)
    assert error.code() == StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(
        'Expected classification signature outputs to contain at least one of "classes" or "scores". Signature was: '
    )


@follows("Regress on a predict signature: INVALID_ARGUMENT `No regression outputs found in SignatureDef: ...`",
         "servables/tensorflow/regressor.cc:168-205")
def test_regress_on_a_predict_signature(stubs):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = MODEL_NAME
    error = rpc_error(stubs.prediction.Regress, request)
    assert error.code() == StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("No regression outputs found in SignatureDef: ")
    assert "tensorflow/serving/predict" in error.details()


@follows("Classify on a classify signature that passes every check: UNIMPLEMENTED (the local server's one limit)",
         "servables/tensorflow/classifier.cc:151-173")
def test_classify_signature_passes_the_checks_then_is_unimplemented(graph_stubs):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = GRAPH_MODEL
    request.model_spec.signature_name = "classify_like"
    error = rpc_error(graph_stubs.prediction.Classify, request)
    assert error.code() == StatusCode.UNIMPLEMENTED
    request.model_spec.signature_name = "nope"
    error = rpc_error(graph_stubs.prediction.Classify, request)
    assert (error.code(), error.details()) == (StatusCode.INVALID_ARGUMENT, "No signature was found with the name: nope")


@follows("MultiInference checks each task: same model, no duplicate, known signature, classify/regress method",
         "servables/tensorflow/multi_inference.cc:43-83")
def test_multi_inference_task_checks(stubs, graph_stubs):
    request = inference_pb2.MultiInferenceRequest()
    task = request.tasks.add()
    task.model_spec.name = MODEL_NAME
    task.method_name = PREDICT_METHOD
    error = rpc_error(stubs.prediction.MultiInference, request)
    assert (error.code(), error.details()) == (
        StatusCode.UNIMPLEMENTED, "Unsupported signature method_name: tensorflow/serving/predict"
    )
    task.model_spec.name = GRAPH_MODEL
    task.model_spec.signature_name = "classify_like"
    task.method_name = CLASSIFY_METHOD
    request.tasks.add().CopyFrom(task)
    error = rpc_error(graph_stubs.prediction.MultiInference, request)
    assert (error.code(), error.details()) == (
        StatusCode.INVALID_ARGUMENT, "Duplicate evaluation of signature: classify_like"
    )
    request.tasks[1].model_spec.name = MODEL_NAME
    error = rpc_error(graph_stubs.prediction.MultiInference, request)
    assert error.details() == "All ModelSpecs in a MultiInferenceRequest must access the same model name."


# ------------------------------------------------------------------------------------------- version states


@follows("A version the policy wants is START until its load begins; loads go newest first",
         "model_servers/get_model_status_impl.cc:32-51")
def test_versions_pass_through_start(seed_library, tmp_path):
    from serving.config import load_model_server_config
    from support.served import publish_version, write_config

    base_path = tmp_path / "models"
    for version in (1, 2):
        publish_version(seed_library, base_path, version)
    config = write_config(tmp_path / "models.config", [{"name": MODEL_NAME, "base_path": base_path,
                                                        "policy": "all {}"}])
    manager = ModelManager()
    seen: list[tuple[int, str]] = []
    manager.add_state_listener(
        lambda name, version, state: seen.append(
            (version, get_model_status_pb2.ModelVersionStatus.State.Name(state.state))
        )
    )
    try:
        manager.apply_config(load_model_server_config(config))
    finally:
        manager.close()
    assert seen[:6] == [(2, "START"), (1, "START"), (2, "LOADING"), (2, "AVAILABLE"), (1, "LOADING"),
                        (1, "AVAILABLE")]


@follows("Predict uses TensorFlow's C++ session (private `_make_callable_from_options`; fails loudly if it goes)",
         "servables/tensorflow/predict_util.cc:109-111")
def test_the_private_session_api_the_server_relies_on_exists():
    assert callable(getattr(tf.compat.v1.Session, "_make_callable_from_options", None))


def test_seed_model_still_answers(stubs):
    response = stubs.prediction.Predict(predict_request(sample_inputs()), timeout=30)
    assert output_of(response).shape == (2, 3)
