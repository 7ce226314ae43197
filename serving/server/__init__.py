"""A local model server that speaks TF Serving's gRPC (and REST) API, for machines where TF Serving cannot run.

Same protocol, same model layout (numeric version directories under a base path), same config file format and
same status codes as ``tensorflow_model_server``, so a client that works against it works against TF Serving.

Layout, one job per module:

* `serving.server.app`: `start_server` / `LocalServer` (start-up, ports, pollers, graceful stop).
* `serving.server.manager`: which versions are loaded (polling, version policy, labels, states, load retries).
* `serving.server.servable`: one loaded version (signatures, TF Serving's input checks, Predict, warmup replay).
* `serving.server.tensors`: TensorProto <-> numpy with TensorFlow's decoding rules.
* `serving.server.grpc_service` and `serving.server.rest`: the two front ends.

The public names load lazily, so that ``serving.server.errors`` can be imported without TensorFlow.

Example::

    from serving.server import start_server

    with start_server(model_base_path="/tmp/models", port=0) as server:
        print(server.port)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.server.app import LocalServer, ServerOptions, start_server
    from serving.server.errors import ModelLoadError, ModelPathError, ServableLoadError, ServerError, ServerStartError

_LAZY = {
    "start_server": "serving.server.app",
    "LocalServer": "serving.server.app",
    "ServerOptions": "serving.server.app",
    "ServerError": "serving.server.errors",
    "ModelPathError": "serving.server.errors",
    "ServableLoadError": "serving.server.errors",
    "ModelLoadError": "serving.server.errors",  # the former name of ServableLoadError
    "ServerStartError": "serving.server.errors",
}

__all__ = [
    "LocalServer",
    "ModelLoadError",
    "ModelPathError",
    "ServerError",
    "ServerOptions",
    "ServableLoadError",
    "ServerStartError",
    "start_server",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'serving.server' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
