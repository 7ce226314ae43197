"""ema-export: ship the exponential-moving-average weights of a TensorFlow model safely.

``ema_export.export(...)`` restores a training checkpoint and its EMA shadows, folds the shadows into a fresh copy of
the model and writes one SavedModel with ``serve_live`` and ``serve_ema`` signatures.

The public names are imported lazily so that ``ema_export.contracts`` (used by the TensorFlow-free client) does not load
TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "export": "ema_export.api",
    "dry_run": "ema_export.api",
    "DryRunResult": "ema_export.api",
    "ExportOptions": "ema_export.api",
    "ExportResult": "ema_export.api",
    "EmaExportError": "ema_export.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ema_export' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
