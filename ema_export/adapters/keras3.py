"""Keras 3 models: the EMA arm runs through `Model.stateless_call` on the live instance.

The averaged values sit in new variables and the non-trainable state (BatchNorm statistics) is passed as the live
variables themselves, so the SavedModel stores the live weights once, the averages once and everything else once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from ema_export.adapters.keras_common import KerasAdapter, pack
from ema_export.checkpoint_graph import variable_identity

if TYPE_CHECKING:
    from ema_export.fold import Averages
    from ema_export.restored import RestoredModel


class Keras3Adapter(KerasAdapter):
    name = "keras"

    def owns(self, model: Any) -> bool:
        try:
            import keras
        except ImportError:  # pragma: no cover - keras ships with tensorflow
            return False
        return isinstance(model, keras.Model)

    def track_live(self, root: tf.Module, model: Any) -> None:
        # Track the variables, not the Keras model object: a SavedModel that tracks a Keras 3 model cannot be run by
        # the session-based loader TF Serving uses ("Could not find variable ..."); Keras's own export does the same.
        root.live_variables = [variable.value for variable in model.variables]

    def ema_call(self, restored: RestoredModel, averages: Averages, root: tf.Module,
                 copied: list[str]) -> Callable[..., Any]:
        model = restored.fresh.model
        input_keys = restored.fresh.input_keys
        index_of = {variable_identity(item.variable): index for index, item in enumerate(restored.variables)}
        averaged: list[tf.Variable] = []

        def values_for(variables: Sequence[Any]) -> list[Any]:
            """The averaged copy where folding produced one, else the live variable itself (shared, stored once)."""
            result = []
            for variable in variables:
                index = index_of[variable_identity(variable)]
                if index in averages:
                    average = averages[index]  # created by fold, straight from the checkpoint
                    averaged.append(average)
                    result.append(average)
                else:
                    result.append(variable.value)
            return result

        trainable_values = values_for(model.trainable_variables)
        non_trainable_values = values_for(model.non_trainable_variables)
        root.ema_variables = averaged

        def call(*inputs: tf.Tensor) -> Any:
            outputs, _ = model.stateless_call(trainable_values, non_trainable_values, pack(inputs, input_keys),
                                              training=False)
            return outputs

        return call
