"""The REST API answers as TF Serving's HTTP server does: paths, OPTIONS, JSON number conversion, and messages.

Requests go over real HTTP on loopback to the seed model (`labelled_server`) and to the TF1 graph model of
`support.graph_model`, whose int8 and defaulted inputs show rapidjson's conversions.
"""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from ema_export.names import SIGNATURE_EMA
from serving.server.rest import json_debug_string
from support.fidelity import follows
from support.graph_model import GRAPH_MODEL
from support.rpc import MODEL_NAME

pytestmark = pytest.mark.slow  # serves exports of the seed model (exported once per session)


def request(port: int, method: str, path: str, body: object = None, raw: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, str | None, bytes]:
    """One HTTP request: (status, Content-Type, body bytes)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def seed_rest(labelled_server):
    return lambda *args, **kwargs: request(labelled_server.rest_port, *args, **kwargs)


@pytest.fixture(scope="module")
def graph_rest(graph_server):
    return lambda *args, **kwargs: request(graph_server.rest_port, *args, **kwargs)


def error_of(answer: tuple[int, str | None, bytes]) -> tuple[int, str]:
    status, _, body = answer
    return status, json.loads(body)["error"]


def predict_path(model: str = GRAPH_MODEL) -> str:
    return f"/v1/models/{model}:predict"


# ------------------------------------------------------------------------------------------------------ routing


@follows("Paths outside `/v1/` get libevent's plain HTML 404, not a JSON error",
         "util/net_http/server/internal/evhttp_server.cc:175-178")
@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("GET", "/v2/models/model"), ("POST", "/metrics")])
def test_paths_outside_v1_are_a_plain_404(seed_rest, method, path):
    status, content_type, body = seed_rest(method, path)
    assert status == 404
    assert content_type.startswith("text/html")
    assert body == b"<HTML><HEAD>\n<TITLE>404 Not Found</TITLE>\n</HEAD><BODY>\n<H1>Not Found</H1>\n</BODY></HTML>\n"


@follows("Anything under `/v1/` that is not an API route is 400 `Malformed request: METHOD PATH`",
         "model_servers/http_rest_api_handler.cc:74-75")
def test_unknown_v1_route_is_malformed(seed_rest):
    assert error_of(seed_rest("GET", "/v1/nothing")) == (400, "Malformed request: GET /v1/nothing")


@follows("OPTIONS (CORS preflight): 200 with an http(s) `Origin`, else 400; empty body either way",
         "model_servers/http_server.cc:170-178")
def test_options_preflight(seed_rest):
    path = f"/v1/models/{MODEL_NAME}:predict"
    assert seed_rest("OPTIONS", path, headers={"Origin": "https://example.org"})[0::2] == (200, b"")
    assert seed_rest("OPTIONS", path)[0::2] == (400, b"")
    assert seed_rest("OPTIONS", path, headers={"Origin": "example.org"})[0::2] == (400, b"")


# ---------------------------------------------------------------------------------------------- JSON messages


@follows("Parsing stops after the first JSON value (what follows is ignored); errors in rapidjson's words, with offset",
         "util/json_tensor.cc:478-490")
def test_json_parsing_is_rapidjsons(graph_rest):
    status, _, body = graph_rest("POST", predict_path(), raw=b'{"inputs": {"x": [[1.0, 2.0]], "scale": 1.0}} trailing')
    assert status == 200, body
    assert error_of(graph_rest("POST", predict_path(), raw=b'{"inputs" [1]}')) == (
        400, "JSON Parse error: Missing a colon after a name of object member. at offset: 10"
    )


@follows("A body that is not a JSON object: `JSON Value: <document> Is not object`", "util/json_tensor.cc:498-500")
def test_not_an_object(graph_rest):
    assert error_of(graph_rest("POST", predict_path(), [1, 2.5])) == (400, "JSON Value: [1, 2.5] Is not object")


@follows("A non-string `signature_name` quotes the whole document, as rapidjson's pretty writer writes it",
         "util/json_tensor.cc:280-284")
def test_signature_name_must_be_a_string(graph_rest):
    status, message = error_of(graph_rest("POST", predict_path(), {"signature_name": 5, "instances": [[1.0, 2]]}))
    assert status == 400
    assert message == (
        'JSON Value: {\n    "signature_name": 5,\n    "instances": [[1.0, 2]]\n} not formatted correctly. '
        "'signature_name' key must be a string value."
    )


@follows("`Expecting 'instances' to be an list/array` (TF Serving's spelling), with the document quoted",
         "util/json_tensor.cc:683-690")
def test_instances_must_be_a_list(graph_rest):
    assert error_of(graph_rest("POST", predict_path(), {"instances": 5})) == (
        400, 'JSON Value: {\n    "instances": 5\n} Expecting \'instances\' to be an list/array'
    )
    assert error_of(graph_rest("POST", predict_path(), {"instances": []})) == (
        400, 'JSON Value: {\n    "instances": []\n} No values in \'instances\' array'
    )


@follows("Quoted JSON is cut once 256 bytes are written", "util/json_tensor.cc:226-236")
def test_quoted_json_is_cut_at_256_bytes():
    text = json_debug_string(list(range(1000)))
    assert text.startswith("[0, 1, 2") and not text.endswith("]")
    assert 256 <= len(text) < 262
    assert json_debug_string({"a": [1.0, 1e30, 1.5e-7, 123456.0], "b": None}) == (
        '{\n    "a": [1.0, 1e30, 1.5e-7, 123456.0],\n    "b": null\n}'
    )


# -------------------------------------------------------------------------------------- JSON number conversion


@follows("REST floats are cast, never range-checked (1e39 becomes inf in a float input)",
         "util/json_tensor.cc:292-296")
def test_floats_are_cast(graph_rest):
    status, _, body = graph_rest("POST", predict_path(), {"inputs": {"x": [[1e39, -2]], "scale": 1.0}})
    assert status == 200, body
    assert json.loads(body)["outputs"] == [[float("inf"), -2.0]]


@follows("Narrow integer inputs take any int32 and wrap as C++ casts do (300 -> 44 in int8)",
         "util/json_tensor.cc:303-309")
def test_narrow_integers_wrap(graph_rest):
    status, _, body = graph_rest("POST", predict_path(), {"signature_name": "narrow", "instances": [300, -129, 5]})
    assert status == 200, body
    assert json.loads(body)["predictions"] == [44, 127, 5]


@follows("A JSON value of the wrong type: `JSON Value: v Type: T is not of expected type: dtype`",
         "util/json_tensor.cc:262-267")
@pytest.mark.parametrize(
    ("body", "message"),
    [({"signature_name": "narrow", "instances": [1, 2147483648]},
      "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: JSON Value: 2147483648 Type: "
      "Number is not of expected type: int8"),
     ({"signature_name": "narrow", "instances": [1.5]},
      "Failed to process element: 0 of 'instances' list. Error: INVALID_ARGUMENT: JSON Value: 1.5 Type: Number is "
      "not of expected type: int8"),
     ({"inputs": {"x": [[True, 1]], "scale": 1.0}}, "JSON Value: true Type: True is not of expected type: float")],
)
def test_wrong_json_types(graph_rest, body, message):
    assert error_of(graph_rest("POST", predict_path(), body)) == (400, message)


@follows("Column form needs every input: SignatureDef defaults do not apply over REST", "util/json_tensor.cc:629-640")
def test_column_form_does_not_use_defaults(graph_rest):
    assert error_of(graph_rest("POST", predict_path(), {"inputs": {"x": [[1.0, 2.0]]}})) == (
        400, "Missing named input: scale in 'inputs' object."
    )


@follows("A shape the signature does not declare is run, and the graph decides", "util/json_tensor.cc:655-705")
def test_rest_shape_is_judged_by_the_graph(graph_rest, seed_rest):
    status, _, body = graph_rest("POST", predict_path(), {"inputs": {"x": [[[1.0, 2.0]]], "scale": 2.0}})
    assert status == 200 and json.loads(body)["outputs"] == [[[2.0, 4.0]]]
    status, message = error_of(seed_rest("POST", predict_path(MODEL_NAME), {"instances": [[1, 2, 3]]}))
    assert status == 400 and message.startswith("Matrix size-incompatible: In[0]: [1,3], In[1]: [4,3]")


# ------------------------------------------------------------------------------------------- classify, regress


@follows("`:classify`/`:regress` on a predict signature: 400 from TF Serving's signature checks",
         "servables/tensorflow/classifier.cc:179-212")
def test_rest_classify_checks_the_signature(seed_rest, graph_rest):
    body = {"signature_name": SIGNATURE_EMA, "examples": [{"x": 1}]}
    status, message = error_of(seed_rest("POST", f"/v1/models/{MODEL_NAME}:classify", body))
    assert status == 400 and message.startswith("Expected classification signature outputs to contain")
    status, message = error_of(seed_rest("POST", f"/v1/models/{MODEL_NAME}:regress", body))
    assert status == 400 and message.startswith("No regression outputs found in SignatureDef: ")
    assert error_of(seed_rest("POST", f"/v1/models/{MODEL_NAME}:classify", {"instances": []})) == (
        400, 'JSON Value: {\n    "instances": []\n} When method is classify, key \'examples\' is expected and was not '
        "found"
    )
    status, _ = error_of(graph_rest("POST", f"/v1/models/{GRAPH_MODEL}:classify",
                                    {"signature_name": "classify_like", "examples": [{"x": 1}]}))
    assert status == 501  # passed every check; the local server does not run tf.Example signatures


def test_row_objects_batch_each_named_input(graph_rest):
    status, _, body = graph_rest("POST", predict_path(), {"instances": [{"x": [1.0, 2.0], "scale": 2.0}]})
    assert status == 200, body
    np.testing.assert_allclose(json.loads(body)["predictions"], [[2.0, 4.0]])
