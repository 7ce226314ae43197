"""REST requests at the edges of HTTP and JSON, answered as TF Serving's HTTP server answers them, always as JSON.

What TF Serving does, from its source: libevent refuses a Content-Length that is not a whole number >= 0 with 400
and reads chunked bodies (libevent ``http.c``, ``evhttp_get_body``); GET, POST, HEAD, PUT, DELETE, OPTIONS and PATCH
reach the handler (``evhttp_server.cc`` 114-117), which answers all but GET and POST "Malformed request: <METHOD>
<path>" (``http_rest_api_handler.cc`` 74-75); other methods get 501 from libevent; JSON is parsed iteratively, so any
depth is a 400 about the tensor, never a crash (``json_tensor.cc`` 483). Raw sockets, because ordinary HTTP
clients refuse to send most of these requests.
"""

from __future__ import annotations

import json
import logging
import socket
import time

import numpy as np
import pytest

from serving.server import start_server
from support.rpc import MODEL_NAME, sample_inputs
from support.served import expected_output, publish_version

pytestmark = pytest.mark.slow  # serves exports

PREDICT_PATH = f"/v1/models/{MODEL_NAME}:predict"


@pytest.fixture(scope="module")
def rest_server(seed_library, tmp_path_factory):
    base_path = tmp_path_factory.mktemp("rest_edges") / "models"
    publish_version(seed_library, base_path, 1)
    with start_server(model_base_path=base_path, port=0, rest_api_port=0, file_system_poll_wait_seconds=0,
                      max_request_bytes=1 << 20) as server:
        yield server


def exchange(port: int, raw: bytes, *, half_close: bool = True) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the server closes each connection), parse status and headers."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(raw)
        if half_close:
            connection.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def json_error(port: int, raw: bytes, **kwargs) -> tuple[int, str]:
    status, headers, body = exchange(port, raw, **kwargs)
    assert headers["content-type"] == "application/json", body
    return status, json.loads(body)["error"]


def request_bytes(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_json_nested_ten_thousand_deep_is_a_400_without_a_traceback(rest_server, caplog):
    body = b'{"instances": ' + b"[" * 10_000 + b"1" + b"]" * 10_000 + b"}"
    with caplog.at_level(logging.DEBUG, logger="serving.server"):
        status, error = json_error(rest_server.rest_port, request_bytes(
            "POST", PREDICT_PATH, {"Content-Length": str(len(body))}, body))
    assert status == 400
    assert error.startswith("JSON Parse error") and "nested too deeply" in error
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]


@pytest.mark.parametrize("length", ["abc", "-5", "12abc", "", "1e3"])
def test_content_length_that_is_not_a_whole_number_is_a_400(rest_server, length):
    status, error = json_error(rest_server.rest_port, request_bytes(
        "POST", PREDICT_PATH, {"Content-Length": length}, b'{"instances": [[1, 2, 3, 4]]}'))
    assert status == 400
    assert "Content-Length" in error and "whole number" in error


def test_conflicting_content_lengths_are_a_400(rest_server):
    raw = request_bytes("POST", PREDICT_PATH, {"Content-Length": "2"}, b"{}").replace(
        b"Content-Length: 2", b"Content-Length: 2\r\nContent-Length: 3")
    assert json_error(rest_server.rest_port, raw)[0] == 400


def test_chunked_body_is_read_whole(rest_server):
    inputs = sample_inputs(batch=3)
    document = json.dumps({"instances": inputs.tolist()}).encode()
    pieces = [document[:7], document[7:30], document[30:]]
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\nX-Trailer: 1\r\n\r\n"
    status, _, body = exchange(rest_server.rest_port, request_bytes(
        "POST", PREDICT_PATH, {"Transfer-Encoding": "chunked"}, chunked))
    assert status == 200, body
    np.testing.assert_allclose(json.loads(body)["predictions"], expected_output(inputs), rtol=1e-5)


@pytest.mark.parametrize("chunked", [b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}}}\r\n0\r\n\r\n", b"5\r\n{}"])
def test_malformed_chunked_body_is_a_400(rest_server, chunked):
    status, error = json_error(rest_server.rest_port, request_bytes(
        "POST", PREDICT_PATH, {"Transfer-Encoding": "chunked"}, chunked))
    assert status == 400, error


def test_body_shorter_than_its_content_length_is_a_400(rest_server):
    status, error = json_error(rest_server.rest_port, request_bytes(
        "POST", PREDICT_PATH, {"Content-Length": "100"}, b'{"instances": '))
    assert status == 400 and "ended after 14 of 100 bytes" in error


@pytest.mark.parametrize("encoding", ["identity", "Content-Length"])
def test_body_over_the_request_limit_is_a_413_before_it_is_read(rest_server, encoding):
    limit = 1 << 20
    if encoding == "Content-Length":
        raw = request_bytes("POST", PREDICT_PATH, {"Content-Length": str(limit + 1)}, b"{")
    else:
        raw = request_bytes("POST", PREDICT_PATH, {"Transfer-Encoding": "chunked"}, b"%x\r\n" % (limit + 1))
    status, error = json_error(rest_server.rest_port, raw)
    assert status == 413 and "--max-request-bytes" in error


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_methods_tf_serving_lets_through_are_malformed_requests(rest_server, method):
    status, error = json_error(rest_server.rest_port, request_bytes(method, f"/v1/models/{MODEL_NAME}", {}))
    assert (status, error) == (400, f"Malformed request: {method} /v1/models/{MODEL_NAME}")


def test_head_is_answered_without_a_body(rest_server):
    status, headers, body = exchange(rest_server.rest_port, request_bytes("HEAD", f"/v1/models/{MODEL_NAME}", {}))
    assert status == 400 and body == b"" and headers["content-type"] == "application/json"


@pytest.mark.parametrize("method", ["TRACE", "BREW"])
def test_other_methods_are_a_501_in_json(rest_server, method):
    status, error = json_error(rest_server.rest_port, request_bytes(method, f"/v1/models/{MODEL_NAME}", {}))
    assert status == 501 and method in error


def test_cors_preflight_needs_an_origin_as_in_tf_serving(rest_server):
    path = f"/v1/models/{MODEL_NAME}"
    assert exchange(rest_server.rest_port, request_bytes("OPTIONS", path, {}))[::2] == (400, b"")
    status, _, body = exchange(rest_server.rest_port, request_bytes("OPTIONS", path, {"Origin": "https://a.example"}))
    assert (status, body) == (200, b"")


def test_malformed_request_line_is_a_400_in_json(rest_server):
    status, error = json_error(rest_server.rest_port, b"GARBAGE\r\n\r\n")
    assert status == 400 and error


def test_idle_connection_does_not_hold_stop_past_the_grace_period(seed_library, tmp_path):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    server = start_server(model_base_path=base_path, port=0, rest_api_port=0, file_system_poll_wait_seconds=0)
    idle = socket.create_connection(("127.0.0.1", server.rest_port), timeout=30)  # sends nothing, ever
    half = socket.create_connection(("127.0.0.1", server.rest_port), timeout=30)
    half.sendall(b"POST /v1/models/model:predict HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")  # stalls mid-body
    time.sleep(0.2)
    grace = 1.0
    started = time.monotonic()
    server.stop(grace=grace)
    elapsed = time.monotonic() - started
    assert elapsed < grace + 1.0, f"stop took {elapsed:.1f} s with a grace period of {grace} s"
    assert idle.recv(1) == b""  # the idle connection was closed by the server
    idle.close()
    half.close()
