"""The local server answers TF Serving's gRPC API the way TF Serving does, driven by the official generated stubs.

One server for the module (`labelled_server`): the seed model's versions 1 and 2, exported by ema-export, under a
config file with the ``all`` policy and labels ``stable`` -> 1, ``canary`` -> 2.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)

from ema_export.names import SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE
from support.fidelity import follows
from support.rpc import (
    INPUT_NAME,
    MODEL_NAME,
    OUTPUT_NAME,
    connect,
    output_of,
    predict_request,
    rpc_error,
    sample_inputs,
)
from support.served import expected_output

pytestmark = pytest.mark.slow  # serves exports of the seed model (exported once per session)

StatusCode = grpc.StatusCode


@pytest.fixture(scope="module")
def stubs(labelled_server):
    connection = connect(labelled_server.port)
    yield connection
    connection.channel.close()


# ------------------------------------------------------------------------------------------------------ Predict


@pytest.mark.parametrize("signature", ["", SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE])
def test_predict_serves_each_signature_of_the_latest_version(stubs, signature):
    inputs = sample_inputs(batch=3)
    response = stubs.prediction.Predict(predict_request(inputs, signature=signature), timeout=30)
    np.testing.assert_allclose(output_of(response), expected_output(inputs, 2, signature), rtol=1e-5, atol=1e-6)
    assert response.model_spec.name == MODEL_NAME
    assert response.model_spec.version.value == 2
    assert response.model_spec.signature_name == (signature or SIGNATURE_DEFAULT)


@pytest.mark.parametrize(("choice", "version"), [({"version": 1}, 1), ({"version": 2}, 2),
                                                 ({"label": "stable"}, 1), ({"label": "canary"}, 2)])
def test_predict_by_version_or_label_serves_that_version(stubs, choice, version):
    inputs = sample_inputs(batch=1, seed=version)
    response = stubs.prediction.Predict(predict_request(inputs, signature=SIGNATURE_LIVE, **choice), timeout=30)
    np.testing.assert_allclose(output_of(response), expected_output(inputs, version, SIGNATURE_LIVE), rtol=1e-5)
    assert response.model_spec.version.value == version


@pytest.mark.parametrize("batch", [1, 5])
def test_predict_accepts_typed_values_and_tensor_content(stubs, batch):
    inputs = sample_inputs(batch=batch, seed=7)
    as_values = predict_request()
    tensor = as_values.inputs[INPUT_NAME]
    tensor.dtype = types_pb2.DT_FLOAT
    tensor.tensor_shape.dim.add().size = batch
    tensor.tensor_shape.dim.add().size = 4
    tensor.float_val.extend(inputs.ravel().tolist())
    as_content = predict_request(inputs)
    assert as_content.inputs[INPUT_NAME].tensor_content  # tf.make_tensor_proto writes raw bytes
    for request in (as_values, as_content):
        response = stubs.prediction.Predict(request, timeout=30)
        np.testing.assert_allclose(output_of(response), expected_output(inputs, 2), rtol=1e-5, atol=1e-6)
        assert response.outputs[OUTPUT_NAME].float_val  # TF Serving answers with typed fields by default


def test_predict_broadcasts_a_single_value_as_tensorflow_does(stubs):
    request = predict_request()
    tensor = request.inputs[INPUT_NAME]
    tensor.dtype = types_pb2.DT_FLOAT
    tensor.tensor_shape.dim.add().size = 2
    tensor.tensor_shape.dim.add().size = 4
    tensor.float_val.append(1.5)
    response = stubs.prediction.Predict(request, timeout=30)
    np.testing.assert_allclose(output_of(response), expected_output(np.full((2, 4), 1.5, np.float32), 2), rtol=1e-5)


def test_output_filter_selects_outputs(stubs):
    request = predict_request(sample_inputs())
    request.output_filter.append(OUTPUT_NAME)
    response = stubs.prediction.Predict(request, timeout=30)
    assert list(response.outputs) == [OUTPUT_NAME]


def test_concurrent_predicts_all_answer_correctly(stubs):
    failures: list[str] = []

    def client(seed: int) -> None:
        for step in range(15):
            inputs = sample_inputs(batch=1 + step % 3, seed=seed * 100 + step)
            signature = (SIGNATURE_LIVE, SIGNATURE_EMA)[step % 2]
            try:
                response = stubs.prediction.Predict(predict_request(inputs, signature=signature), timeout=30)
                np.testing.assert_allclose(output_of(response), expected_output(inputs, 2, signature), rtol=1e-5,
                                           atol=1e-6)
            except Exception as error:  # collected, so the assertion below lists them all
                failures.append(repr(error))

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures


# ----------------------------------------------------------------------------------------------- error codes


def _set_content(request, dtype, shape, content):
    tensor = request.inputs[INPUT_NAME]
    tensor.Clear()
    tensor.dtype = dtype
    for size in shape:
        tensor.tensor_shape.dim.add().size = size
    tensor.tensor_content = content


PREDICT_ERRORS: dict[str, tuple[Callable[[predict_pb2.PredictRequest], None], StatusCode, list[str]]] = {
    "unknown model": (lambda r: setattr(r.model_spec, "name", "nope"), StatusCode.NOT_FOUND,
                      ["Servable not found for request: Latest(nope)"]),
    "unknown version": (lambda r: r.model_spec.version.__setattr__("value", 9), StatusCode.NOT_FOUND,
                        ["Servable not found for request: Specific(model, 9)"]),
    "unknown label": (lambda r: setattr(r.model_spec, "version_label", "nope"), StatusCode.INVALID_ARGUMENT,
                      ["Unrecognized servable version label: nope"]),
    "empty model name": (lambda r: setattr(r.model_spec, "name", ""), StatusCode.INVALID_ARGUMENT,
                         ["ModelSpec has no name specified"]),
    "missing model_spec": (lambda r: r.ClearField("model_spec"), StatusCode.INVALID_ARGUMENT, ["Missing ModelSpec"]),
    "unknown signature": (lambda r: setattr(r.model_spec, "signature_name", "nope"), StatusCode.FAILED_PRECONDITION,
                          ['Serving signature key "nope" not found']),
    "missing input": (lambda r: r.inputs.clear(), StatusCode.INVALID_ARGUMENT,
                      ["Missing but required: {inputs}"]),
    "extra input": (lambda r: r.inputs["extra"].CopyFrom(r.inputs[INPUT_NAME]), StatusCode.INVALID_ARGUMENT,
                    ["Sent extra: {extra}", "inputs"]),
    "misnamed input": (lambda r: (r.inputs["pixels"].CopyFrom(r.inputs[INPUT_NAME]), r.inputs.pop(INPUT_NAME)),
                       StatusCode.INVALID_ARGUMENT,
                       ["Signature input alias: inputs(feed name: ", "not found in request", "{pixels}"]),
    # dtype and shape are judged by the graph when it runs, as in TF Serving: TensorFlow's own messages
    "wrong dtype": (lambda r: r.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(np.ones((2, 4), np.int64))),
                    StatusCode.INVALID_ARGUMENT, ["Type mismatch: actual int64 vs. expect float"]),
    "wrong rank": (lambda r: r.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(np.ones(4, np.float32))),
                   StatusCode.INVALID_ARGUMENT, ["is not a matrix"]),
    "wrong shape": (lambda r: r.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(np.ones((2, 5), np.float32))),
                    StatusCode.INVALID_ARGUMENT, ["Matrix size-incompatible: In[0]: [2,5]"]),
    "undecodable content": (lambda r: _set_content(r, types_pb2.DT_FLOAT, (2, 4), b"\x00\x01\x02"),
                            StatusCode.INVALID_ARGUMENT, ["tensor parsing error: inputs"]),
    "unknown rank": (lambda r: setattr(r.inputs[INPUT_NAME].tensor_shape, "unknown_rank", True),
                     StatusCode.INVALID_ARGUMENT, ["tensor parsing error: inputs"]),
    "absurd shape": (lambda r: (_set_content(r, types_pb2.DT_FLOAT, (10**12, 4), b""),
                                r.inputs[INPUT_NAME].float_val.append(1.0)),
                     StatusCode.INVALID_ARGUMENT, ["tensor parsing error: inputs"]),
    "unknown output": (lambda r: r.output_filter.append("nope"), StatusCode.INVALID_ARGUMENT,
                       ["output tensor alias not found in signature: nope"]),
    "repeated output": (lambda r: r.output_filter.extend([OUTPUT_NAME, OUTPUT_NAME]), StatusCode.INVALID_ARGUMENT,
                        ["duplicate output tensor alias: output_0"]),
}


@follows("Unknown model, version or label, and bad inputs or output filters get TF Serving's code and message",
         "servables/tensorflow/predict_util.cc:51-154")
@pytest.mark.parametrize("case", sorted(PREDICT_ERRORS))
def test_predict_errors_have_tf_serving_codes_and_name_the_culprit(stubs, case):
    mutate, code, fragments = PREDICT_ERRORS[case]
    request = predict_request(sample_inputs())
    mutate(request)
    error = rpc_error(stubs.prediction.Predict, request)
    assert error.code() == code, error.details()
    for fragment in fragments:
        assert fragment in error.details()


def test_garbage_bytes_do_not_hurt_the_server(stubs):
    raw = stubs.channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    with pytest.raises(grpc.RpcError):
        raw(b"\xff\xff\xff\xff", timeout=30)
    response = stubs.prediction.Predict(predict_request(sample_inputs()), timeout=30)
    assert response.model_spec.version.value == 2


@follows("Classify/Regress without a ModelSpec, MultiInference without tasks: TF Serving's INVALID_ARGUMENT",
         "servables/tensorflow/classification_service.cc:34-39")
@pytest.mark.parametrize(
    ("method", "request_message", "fragment"),
    [("Classify", classification_pb2.ClassificationRequest(), "Missing ModelSpec"),
     ("Regress", regression_pb2.RegressionRequest(), "Missing ModelSpec"),
     ("MultiInference", inference_pb2.MultiInferenceRequest(), "ModelSpec has no name specified.")],
)
def test_classify_regress_multi_inference_check_the_request_as_tf_serving_does(stubs, method, request_message,
                                                                              fragment):
    error = rpc_error(getattr(stubs.prediction, method), request_message)
    assert error.code() == StatusCode.INVALID_ARGUMENT
    assert error.details() == fragment


# ---------------------------------------------------------------------------------------------------- metadata


def test_get_model_metadata_returns_every_signature_def(stubs):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL_NAME
    request.model_spec.version.value = 1
    response = stubs.prediction.GetModelMetadata(request, timeout=30)
    assert response.model_spec.name == MODEL_NAME
    assert response.model_spec.version.value == 1
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    assert {SIGNATURE_LIVE, SIGNATURE_EMA, SIGNATURE_DEFAULT} <= set(signature_map.signature_def)
    for name in (SIGNATURE_LIVE, SIGNATURE_EMA, SIGNATURE_DEFAULT):
        signature = signature_map.signature_def[name]
        assert signature.inputs[INPUT_NAME].dtype == types_pb2.DT_FLOAT
        assert [dim.size for dim in signature.inputs[INPUT_NAME].tensor_shape.dim] == [-1, 4]
        assert list(signature.outputs) == [OUTPUT_NAME]


@follows("GetModelMetadata checks its fields and answers signature_def only",
         "servables/tensorflow/get_model_metadata_impl.cc:34-45")
@pytest.mark.parametrize(
    ("fields", "name", "code", "fragment"),
    [([], MODEL_NAME, StatusCode.INVALID_ARGUMENT, "must specify at least one metadata_field"),
     (["signature_def", "graph"], MODEL_NAME, StatusCode.INVALID_ARGUMENT, "Metadata field graph is not supported"),
     (["signature_def"], "nope", StatusCode.NOT_FOUND, "Servable not found for request: Latest(nope)")],
)
def test_get_model_metadata_errors(stubs, fields, name, code, fragment):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
    request.model_spec.name = name
    error = rpc_error(stubs.prediction.GetModelMetadata, request)
    assert error.code() == code
    assert fragment in error.details()


# ------------------------------------------------------------------------------------------ status and health


def test_get_model_status_lists_versions_newest_first(stubs):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL_NAME
    response = stubs.model.GetModelStatus(request, timeout=30)
    states = [(status.version, get_model_status_pb2.ModelVersionStatus.State.Name(status.state),
               status.status.error_code) for status in response.model_version_status]
    assert states == [(2, "AVAILABLE", 0), (1, "AVAILABLE", 0)]
    request.model_spec.version.value = 1
    response = stubs.model.GetModelStatus(request, timeout=30)
    assert [status.version for status in response.model_version_status] == [1]


@follows("GetModelStatus of an unknown model or version is NOT_FOUND with TF Serving's message",
         "model_servers/get_model_status_impl.cc:86-101")
@pytest.mark.parametrize(("name", "version", "fragment"),
                         [("nope", None, "Could not find any versions of model nope"),
                          (MODEL_NAME, 9, "Could not find version 9 of model model")])
def test_get_model_status_not_found(stubs, name, version, fragment):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    error = rpc_error(stubs.model.GetModelStatus, request)
    assert error.code() == StatusCode.NOT_FOUND
    assert fragment in error.details()


@follows("With `--enable_grpc_healthcheck_service`, `\"\"`, `ModelService` and `PredictionService` are SERVING",
         "model_servers/server.cc:415-424")
@pytest.mark.parametrize("service", ["", "PredictionService", "ModelService"])
def test_health_service_reports_serving(stubs, service):
    health = health_pb2_grpc.HealthStub(stubs.channel)
    response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
