"""Plain `tf.Module`s: served through the tf.function that declares an input signature."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from ema_export.adapters.base import ModelAdapter
from ema_export.errors import ModelLoadError


def serving_function(module: Any) -> Any:
    """The tf.function of a tf.Module that defines an input signature (`__call__` first)."""
    for name in ["__call__"] + sorted(dir(type(module))):
        function = getattr(module, name, None)
        if getattr(function, "input_signature", None) is not None:
            return function
    return None


class ModuleAdapter(ModelAdapter):
    name = "module"

    def owns(self, model: Any) -> bool:
        return isinstance(model, tf.Module)

    def declared_signature(self, model: Any, source: str) -> list[tf.TensorSpec] | None:
        function = serving_function(model)
        if function is None:
            raise ModelLoadError(
                f"The tf.Module from {source} has no tf.function with an input_signature to serve",
                hint="Decorate __call__ with @tf.function(input_signature=[tf.TensorSpec(...)])",
            )
        return list(function.input_signature)

    def call(self, model: Any, inputs: Sequence[tf.Tensor], input_keys: tuple[str, ...] | None) -> Any:
        return serving_function(model)(*inputs)

    def track_live(self, root: tf.Module, model: Any) -> None:
        root.live_model = model

