"""The REST API (``--rest-api-port``) answers as TF Serving's does: routes, JSON shapes, HTTP codes."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest

from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from support.rpc import MODEL_NAME, OUTPUT_NAME, sample_inputs
from support.served import expected_output

pytestmark = pytest.mark.slow  # serves exports of the seed model (exported once per session)


@pytest.fixture(scope="module")
def rest(labelled_server):
    """Call the REST API: rest(path, body=None) -> (HTTP status, decoded JSON)."""
    root = f"http://127.0.0.1:{labelled_server.rest_port}"

    def call(path: str, body: object = None, raw: bytes | None = None) -> tuple[int, object]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(root + path, data=data, method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    return call


@pytest.mark.parametrize(("path", "versions"), [(f"/v1/models/{MODEL_NAME}", ["2", "1"]),
                                                (f"/v1/models/{MODEL_NAME}/versions/1", ["1"])])
def test_status(rest, path, versions):
    status, body = rest(path)
    assert status == 200
    assert [entry["version"] for entry in body["model_version_status"]] == versions
    assert body["model_version_status"][0]["state"] == "AVAILABLE"
    assert body["model_version_status"][0]["status"] == {"error_code": "OK", "error_message": ""}


@pytest.mark.parametrize("suffix", ["/metadata", "/versions/1/metadata", "/labels/canary/metadata"])
def test_metadata(rest, suffix):
    status, body = rest(f"/v1/models/{MODEL_NAME}{suffix}")
    assert status == 200
    assert body["model_spec"]["name"] == MODEL_NAME
    assert body["model_spec"]["version"] == ("1" if "versions/1" in suffix else "2")
    signature = body["metadata"]["signature_def"]["signature_def"][SIGNATURE_EMA]
    assert signature["inputs"]["inputs"]["dtype"] == "DT_FLOAT"
    assert [dim["size"] for dim in signature["inputs"]["inputs"]["tensor_shape"]["dim"]] == ["-1", "4"]


@pytest.mark.parametrize(("suffix", "version"), [("", 2), ("/versions/1", 1), ("/labels/stable", 1)])
def test_predict_row_and_column_forms(rest, suffix, version):
    inputs = sample_inputs(batch=2, seed=3)
    status, body = rest(f"/v1/models/{MODEL_NAME}{suffix}:predict",
                        {"signature_name": SIGNATURE_LIVE, "instances": inputs.tolist()})
    assert status == 200, body
    np.testing.assert_allclose(body["predictions"], expected_output(inputs, version, SIGNATURE_LIVE), rtol=1e-5)
    status, body = rest(f"/v1/models/{MODEL_NAME}{suffix}:predict", {"inputs": {"inputs": inputs.tolist()}})
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"], expected_output(inputs, version), rtol=1e-5)


def test_predict_writes_shortest_float_decimals(rest):
    _, body = rest(f"/v1/models/{MODEL_NAME}:predict", {"instances": [[0.0, 0.0, 0.0, 0.0]]})
    assert body["predictions"] == [[-0.1, 0.2, 0.3]]  # the EMA biases, written as TF Serving writes float32


@pytest.mark.parametrize(
    ("path", "body", "code", "fragment"),
    [("/v1/models/nope:predict", {"instances": [[1, 2, 3, 4]]}, 404, "Servable not found for request: Latest(nope)"),
     (f"/v1/models/{MODEL_NAME}/versions/9:predict", {"instances": [[1, 2, 3, 4]]}, 404, "Specific(model, 9)"),
     (f"/v1/models/{MODEL_NAME}/labels/nope:predict", {"instances": [[1, 2, 3, 4]]}, 400,
      "Unrecognized servable version label: nope"),
     (f"/v1/models/{MODEL_NAME}:predict", {"signature_name": "nope", "instances": [[1, 2, 3, 4]]}, 400,
      'Serving signature name: "nope" not found'),
     (f"/v1/models/{MODEL_NAME}:predict", {"instances": [[1, 2, 3]]}, 400, "Matrix size-incompatible: In[0]: [1,3]"),
     (f"/v1/models/{MODEL_NAME}:predict", {"instances": [["a", "b", "c", "d"]]}, 400, "not of expected type: float"),
     (f"/v1/models/{MODEL_NAME}:predict", {"instances": [[1, 2], [3]]}, 400,
      "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: Expecting tensor size: 2 but got: 1"),
     (f"/v1/models/{MODEL_NAME}:predict", {"inputs": {"pixels": [[1, 2, 3, 4]]}}, 400, "Missing named input: inputs"),
     (f"/v1/models/{MODEL_NAME}:predict", {"rows": []}, 400, "Missing 'inputs' or 'instances' key"),
     (f"/v1/models/{MODEL_NAME}:predict", {"instances": [], "inputs": []}, 400, "only one of 'inputs' or 'instances'"),
     (f"/v1/models/{MODEL_NAME}:classify", {"examples": []}, 400, "'examples' value is an empty array"),
     ("/v1/models/nope", None, 404, "Could not find any versions of model nope"),
     ("/v1/nothing", None, 400, "Malformed request: GET /v1/nothing")],
)
def test_errors(rest, path, body, code, fragment):
    status, answer = rest(path, body)
    assert status == code
    assert fragment in answer["error"]


def test_invalid_json_is_a_bad_request(rest):
    status, answer = rest(f"/v1/models/{MODEL_NAME}:predict", raw=b"{not json")
    assert status == 400
    assert "JSON Parse error" in answer["error"]


def test_bad_requests_leave_the_server_answering(rest):
    rest(f"/v1/models/{MODEL_NAME}:predict", raw=b"\xff" * 100)
    status, body = rest(f"/v1/models/{MODEL_NAME}:predict", {"instances": [[1, 2, 3, 4]]})
    assert status == 200 and OUTPUT_NAME not in body and len(body["predictions"]) == 1


def test_a_stalled_client_does_not_block_others(rest, labelled_server):
    with socket.create_connection(("127.0.0.1", labelled_server.rest_port), timeout=30) as stalled:
        stalled.sendall(b"POST /v1/models/model:predict HTTP/1.0\r\nContent-Length: 1000\r\n\r\n{")  # and no more
        status, body = rest(f"/v1/models/{MODEL_NAME}:predict", {"instances": [[1, 2, 3, 4]]})
        assert status == 200 and len(body["predictions"]) == 1
