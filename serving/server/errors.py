"""Errors of the local model server: start-up failures the CLI reports, and RPC outcomes TF Serving would return.

Two kinds, kept apart on purpose:

* `ServerError` and its subclasses stop the server from starting (missing base path, no loadable version, port in
  use). They carry a hint; ``ema-serving serve`` prints them as one line.
* `RpcStatus` is a request's non-OK answer: a gRPC status code plus the message TF Serving would send. The gRPC
  servicers abort with it and the REST handler maps it to an HTTP status, so both front ends agree.

This module imports neither TensorFlow nor anything heavy.
"""

from __future__ import annotations

import grpc

from ema_export.contracts import HintedError


class ServerError(HintedError):
    """Base class of every error that prevents the local server from starting (message, hint, problems)."""


class ModelPathError(ServerError):
    """A model's base path is missing, is not a directory, or holds no numeric version directory."""


class ServableLoadError(ServerError):
    """A configured model has no version that loaded (every version failed to load or to warm up).

    Not the exporter's `ema_export.errors.ModelLoadError` (a fresh model that cannot be built): the two share no base
    below `HintedError`, so catching one never catches the other.
    """


ModelLoadError = ServableLoadError
"""The former name of `ServableLoadError`, kept so that ``except serving.server.ModelLoadError`` keeps working."""


class ServerStartError(ServerError):
    """A port could not be bound, or the options contradict each other."""


class RpcStatus(Exception):  # noqa: N818 (an RPC's outcome, raised to unwind to the servicer)
    """A non-OK answer to one request: the gRPC status code and the message TF Serving would send.

    Args:
        code: The gRPC status code (NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION, ...).
        message: The status details, which the client sees as ``RpcError.details()``.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"RpcStatus({self.code.name}, {self.message!r})"


MAX_STATUS_MESSAGE_CHARS = 1024
"""TF Serving's ``kErrorMessageLimit``: a gRPC status message longer than this is cut (grpc_status_util.cc:25)."""

TRUNCATION_MARK = "...TRUNCATED"
"""What TF Serving appends to a cut status message (grpc_status_util.cc:28)."""


def truncate_status_message(message: str) -> str:
    """Cut a gRPC status message the way TF Serving's ``ToGRPCStatus`` does (grpc_status_util.cc:24-35).

    Why: a message that echoes every input alias a client sent can exceed gRPC's metadata limit, and the client
    would then see RESOURCE_EXHAUSTED "Stream removed" instead of the real status. TF Serving counts bytes (a C++
    ``substr``); so does this, dropping a character the cut would split.
    """
    encoded = message.encode("utf-8")
    if len(encoded) <= MAX_STATUS_MESSAGE_CHARS:
        return message
    return encoded[:MAX_STATUS_MESSAGE_CHARS].decode("utf-8", "ignore") + TRUNCATION_MARK


def not_found(message: str) -> RpcStatus:
    """NOT_FOUND: unknown model or version (TF Serving's 'Servable not found for request: ...')."""
    return RpcStatus(grpc.StatusCode.NOT_FOUND, message)


def invalid_argument(message: str) -> RpcStatus:
    """INVALID_ARGUMENT: the request itself is wrong (inputs, labels, fields)."""
    return RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, message)


def failed_precondition(message: str) -> RpcStatus:
    """FAILED_PRECONDITION: valid request the served model cannot take (unknown signature, unavailable label target)."""
    return RpcStatus(grpc.StatusCode.FAILED_PRECONDITION, message)
