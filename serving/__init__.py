"""Serving side of ema-export: a TensorFlow-free TF Serving client with A/B comparison, and a local model server.

``from serving import ServingClient`` loads only the generated protocol modules, never the TensorFlow runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ServingClient": "serving.client",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'serving' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
