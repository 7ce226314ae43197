"""ServingClient against a real ema-export SavedModel on the local server, and against a scripted fake server."""

from __future__ import annotations

import socket
import time

import grpc
import numpy as np
import pytest

from ema_export.names import ARM_SIGNATURES, SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE
from serving import ServingClient
from serving.client import RetryPolicy, TensorSpec, TlsOptions, VersionStatus
from serving.protocol import (
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ServerUnavailableError,
    ServingError,
    SignatureNotFoundError,
)
from support.fake_server import FakeBehaviour, serve_fake
from support.rpc import classification_inputs

pytestmark = pytest.mark.slow  # most tests query exports served on loopback (exported once per session)

FAST_RETRY = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def client(classifier) -> ServingClient:
    with ServingClient(classifier.target, timeout=10) as opened:
        yield opened


@pytest.mark.parametrize("signature", [*ARM_SIGNATURES, SIGNATURE_DEFAULT])
def test_each_signature_answers_with_its_own_weights(client, classifier, signature: str) -> None:
    inputs = classification_inputs(7)
    prediction = client.predict(classifier.name, {"inputs": inputs}, signature=signature)
    arm = SIGNATURE_EMA if signature == SIGNATURE_DEFAULT else signature  # serving_default aliases the EMA arm
    np.testing.assert_allclose(prediction.outputs["output_0"], classifier.expected(inputs, arm), rtol=1e-6, atol=1e-6)
    assert prediction.model_version == 1 and prediction.signature == signature
    assert 0 < prediction.latency_s < 10


def test_version_pinning_and_bad_model_specs_raise_named_errors(client, classifier) -> None:
    inputs = {"inputs": classification_inputs(2)}
    assert client.predict(classifier.name, inputs, version=1).model_version == 1
    cases = [
        (dict(model="no-such-model"), ModelNotFoundError),
        (dict(version=7), ModelNotFoundError),
        (dict(version_label="canary"), ModelNotFoundError),
        (dict(signature="serve_nothing"), SignatureNotFoundError),
        (dict(version=1, version_label="stable"), InvalidRequestError),
    ]
    for overrides, expected in cases:
        arguments = {"model": classifier.name, "inputs": inputs, **overrides}
        with pytest.raises(expected, match="Received"):
            client.predict(**arguments)


@pytest.mark.parametrize(
    "inputs",
    [
        {"images": np.zeros((2, 4), np.float32)},  # wrong name
        {"inputs": np.zeros((2, 4), np.float64)},  # wrong dtype: arrays are sent with their own dtype
        {"inputs": np.zeros((2, 5), np.float32)},  # wrong shape
    ],
)
def test_inputs_the_signature_does_not_take_are_invalid_requests(client, classifier, inputs) -> None:
    with pytest.raises(InvalidRequestError, match="ema-serving metadata"):
        client.predict(classifier.name, inputs, signature=SIGNATURE_LIVE)


def test_metadata_describes_every_signature_with_identical_inputs_and_outputs(client, classifier) -> None:
    metadata = client.metadata(classifier.name)
    assert metadata.model_name == classifier.name and metadata.version == 1
    assert {*ARM_SIGNATURES, SIGNATURE_DEFAULT} <= set(metadata.signatures)
    for name in (*ARM_SIGNATURES, SIGNATURE_DEFAULT):
        signature = metadata.signature(name)
        assert signature.method_name == "tensorflow/serving/predict"
        assert signature.inputs["inputs"].dtype == "float32" and signature.inputs["inputs"].shape == (None, 4)
        output = signature.outputs["output_0"]
        assert (output.name, output.dtype, output.shape) == ("output_0", "float32", (None, 3))
        assert isinstance(output, TensorSpec)
    with pytest.raises(SignatureNotFoundError, match="serve_live"):
        metadata.signature("serve_nothing")


def test_status_lists_versions_and_unknown_models_are_not_found(client, classifier) -> None:
    assert client.status(classifier.name) == [VersionStatus(1, "AVAILABLE", "OK", "")]
    assert client.status(classifier.name, version=1)[0].state == "AVAILABLE"
    with pytest.raises(ModelNotFoundError):
        client.status("no-such-model")


def test_messages_larger_than_grpcs_4_mb_default_go_both_ways(client, classifier) -> None:
    inputs = classification_inputs(50).repeat(8000, axis=0)  # 400k rows: 6.4 MB in, 4.8 MB out
    prediction = client.predict(classifier.name, {"inputs": inputs}, signature=SIGNATURE_EMA)
    assert prediction.outputs["output_0"].shape == (400_000, 3)
    np.testing.assert_allclose(prediction.outputs["output_0"][:50], classifier.expected(inputs[:50], SIGNATURE_EMA),
                               rtol=1e-6, atol=1e-6)  # fmt: skip


def test_calls_in_flight_share_one_channel(client, classifier) -> None:
    inputs = classification_inputs(3)
    pending = [client.predict_async(classifier.name, {"inputs": inputs}, signature=arm) for arm in ARM_SIGNATURES]
    for arm, call in zip(ARM_SIGNATURES, pending):
        np.testing.assert_allclose(call.result().outputs["output_0"], classifier.expected(inputs, arm), atol=1e-6)


def test_a_closed_client_refuses_calls(classifier) -> None:
    with ServingClient(classifier.target) as closed:
        pass
    with pytest.raises(ServingError, match="closed"):
        closed.predict(classifier.name, {"inputs": classification_inputs(1)})


def test_unreachable_server_is_unavailable_after_bounded_retries(unused_port: int) -> None:
    started = time.monotonic()
    with ServingClient(f"127.0.0.1:{unused_port}", timeout=5, retry=FAST_RETRY) as client:
        with pytest.raises(ServerUnavailableError, match="--target"):
            client.status("model")
    assert time.monotonic() - started < 5


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as probe:  # bound then closed: nothing listens there now
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unavailable_is_retried_by_the_service_config(fake_server) -> None:
    fake_server.behaviour.fail_first[SIGNATURE_EMA] = (2, grpc.StatusCode.UNAVAILABLE)
    inputs = classification_inputs(2)
    with ServingClient(fake_server.target, retry=FAST_RETRY) as client:
        prediction = client.predict("model", {"inputs": inputs}, signature=SIGNATURE_EMA)
    assert fake_server.behaviour.calls[SIGNATURE_EMA] == 3
    weights, biases = FakeBehaviour().weights[SIGNATURE_EMA]
    np.testing.assert_allclose(prediction.outputs["output_0"], inputs @ weights + biases, atol=1e-6)


def test_without_retries_unavailable_fails_on_the_first_attempt(fake_server) -> None:
    fake_server.behaviour.fail_first[SIGNATURE_EMA] = (2, grpc.StatusCode.UNAVAILABLE)
    with ServingClient(fake_server.target, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(ServerUnavailableError):
            client.predict("model", {"inputs": classification_inputs(2)}, signature=SIGNATURE_EMA)
    assert fake_server.behaviour.calls[SIGNATURE_EMA] == 1


def test_other_failures_are_not_retried(fake_server) -> None:
    fake_server.behaviour.fail_first[SIGNATURE_EMA] = (1, grpc.StatusCode.INTERNAL)
    with ServingClient(fake_server.target, retry=FAST_RETRY) as client:
        with pytest.raises(ServingError, match="INTERNAL") as raised:
            client.predict("model", {"inputs": classification_inputs(2)}, signature=SIGNATURE_EMA)
    assert raised.value.code == "INTERNAL" and fake_server.behaviour.calls[SIGNATURE_EMA] == 1


def test_the_deadline_bounds_each_call(fake_server) -> None:
    fake_server.behaviour.delay_s[SIGNATURE_EMA] = 2.0
    with ServingClient(fake_server.target, timeout=30) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="--timeout"):
            client.predict("model", {"inputs": classification_inputs(1)}, signature=SIGNATURE_EMA, timeout=0.2)
        assert time.monotonic() - started < 1.5


def test_tls_with_a_private_ca(self_signed_certificate) -> None:
    certificate, key = self_signed_certificate
    server, fake = serve_fake(grpc.ssl_server_credentials([(key, certificate)]))
    try:
        tls = TlsOptions(root_certificates=certificate, server_name="localhost")
        with ServingClient(fake.target, tls=tls) as client:
            assert client.predict("model", {"inputs": classification_inputs(1)}).model_version == 1
        with ServingClient(fake.target, timeout=3, retry=RetryPolicy(max_attempts=1)) as plaintext:
            with pytest.raises(ServerUnavailableError):
                plaintext.predict("model", {"inputs": classification_inputs(1)})
    finally:
        server.stop(None)


def test_tls_options_read_pem_files(tmp_path, self_signed_certificate) -> None:
    (tmp_path / "ca.pem").write_bytes(self_signed_certificate[0])
    options = TlsOptions.from_files(tmp_path / "ca.pem", server_name="localhost")
    assert options == TlsOptions(self_signed_certificate[0], None, None, "localhost")


def test_retry_policy_is_a_valid_grpc_service_config() -> None:
    config = RetryPolicy().service_config()["methodConfig"][0]
    assert {"service": "tensorflow.serving.PredictionService"} in config["name"]
    assert config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["retryPolicy"]["maxAttempts"] == 5


def test_predict_messages_framed_by_hand_are_the_official_bytes() -> None:
    # The client writes PredictRequest and reads PredictResponse as bytes; they must mean what the messages mean.
    from serving import client as client_module, codec
    from serving.protocol import PredictRequest, PredictResponse, model_pb2

    inputs = {"inputs": np.arange(8, dtype=np.float32).reshape(2, 4), "ids": np.array([3, -4]), "text": [b"a", b"bc"]}
    spec = model_pb2.ModelSpec(name="model", signature_name=SIGNATURE_LIVE)
    spec.version.value = 3
    request = PredictRequest.FromString(client_module._predict_request_bytes(spec, inputs))
    assert request.model_spec == spec and set(request.inputs) == set(inputs)
    for name, values in inputs.items():
        assert request.inputs[name] == codec.encode(values)

    response = PredictResponse()
    response.model_spec.CopyFrom(spec)
    codec.encode(np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3), out=response.outputs["scores"], form="values")
    codec.encode(np.array([1, 2], np.int64), out=response.outputs["classes"])
    codec.encode([b"x", b"yz"], out=response.outputs["names"])
    outputs, parsed_spec = client_module._parse_predict_response(response.SerializeToString())
    assert parsed_spec == spec and set(outputs) == {"scores", "classes", "names"}
    for name, array in outputs.items():
        expected = codec.decode(response.outputs[name])
        assert array.dtype == expected.dtype and array.tolist() == expected.tolist()
