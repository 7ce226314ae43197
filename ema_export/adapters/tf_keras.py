"""tf-keras (Keras 2) models: no `stateless_call`, so the EMA arm is a second instance, as for a tf.Module."""

from __future__ import annotations

import sys
from typing import Any

import tensorflow as tf

from ema_export.adapters.base import SecondInstanceAdapter
from ema_export.adapters.keras_common import KerasAdapter


class TfKerasAdapter(KerasAdapter, SecondInstanceAdapter):
    name = "tf_keras"

    def owns(self, model: Any) -> bool:
        tf_keras = sys.modules.get("tf_keras")  # imported by the factory if it built a tf-keras model
        return tf_keras is not None and isinstance(model, tf_keras.Model)

    def track_live(self, root: tf.Module, model: Any) -> None:
        root.live_variables = list(model.variables)

    def track_ema(self, root: tf.Module, copy: Any, own: list[Any]) -> None:
        # As for Keras 3: track variables, not the model object (Keras 2 would also save every layer's traced
        # functions). A replaced variable stays in its layer's weight list but is read by nothing, so not saved.
        root.ema_variables = own
