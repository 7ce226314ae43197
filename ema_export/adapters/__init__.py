"""One adapter per model family; the registry below is the only place that lists them.

Order matters: the first adapter that owns a model wins, so the Keras families (whose models are also `tf.Module`s
in tf-keras's case) come before the plain `tf.Module`. A new family is one module here and one line in `ADAPTERS`.
"""

from __future__ import annotations

from typing import Any

from ema_export.adapters.base import ModelAdapter
from ema_export.adapters.keras3 import Keras3Adapter
from ema_export.adapters.module import ModuleAdapter
from ema_export.adapters.tf_keras import TfKerasAdapter

ADAPTERS: tuple[ModelAdapter, ...] = (Keras3Adapter(), TfKerasAdapter(), ModuleAdapter())


def adapter_for(model: Any) -> ModelAdapter | None:
    """The adapter of the first family that owns `model`; None for an object no family serves."""
    return next((adapter for adapter in ADAPTERS if adapter.owns(model)), None)


__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for"]
