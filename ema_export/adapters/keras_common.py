"""What both Keras families (Keras 3 and tf-keras) share: declared inputs, dict inputs, calling and building."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from ema_export.adapters.base import ModelAdapter
from ema_export.errors import ModelLoadError

_AUTOMATIC_INPUT_NAME = re.compile(r"^(keras_tensor|input_layer|input)(_\d+)?$")
"""Names Keras gives unnamed inputs (`keras.Input(shape)`): a session counter, so `input_layer_3` in the process
that saved `model.keras` and `keras_tensor_7` in a factory. Such inputs serve under `inputs` / `input_N` instead, the
same names whichever way the model was rebuilt."""


def _declared_name(tensor: Any) -> str | None:
    name = getattr(tensor, "name", None)
    return None if not name or _AUTOMATIC_INPUT_NAME.match(name) else name


def _keras_input_dict(model: Any) -> dict[str, Any] | None:
    """The inputs of a functional model built on a dict of `keras.Input`s, in the order it declares them."""
    try:
        structure = model.input
    except (AttributeError, ValueError):
        return None
    return dict(structure) if isinstance(structure, dict) else None


def pack(inputs: Sequence[tf.Tensor], input_keys: tuple[str, ...] | None) -> Any:
    """Serving inputs in the structure a Keras model declares: a dict by key, one tensor, or a list."""
    if input_keys is not None:
        return dict(zip(input_keys, inputs))
    return inputs[0] if len(inputs) == 1 else list(inputs)


class KerasAdapter(ModelAdapter):
    """Keras models declare their inputs (functional and sequential ones) and create variables on the first call."""

    trains_in_variable_order = True

    def declared_signature(self, model: Any, source: str) -> list[tf.TensorSpec] | None:
        declared = _keras_input_dict(model)
        if declared is not None:
            return [tf.TensorSpec(tuple(t.shape), t.dtype, name=key) for key, t in declared.items()]
        try:
            inputs = model.inputs
        except (AttributeError, ValueError):
            return None
        if not inputs:
            return None
        return [tf.TensorSpec(tuple(t.shape), t.dtype, name=_declared_name(t)) for t in inputs]

    def input_keys(self, model: Any, specs: Sequence[tf.TensorSpec], source: str) -> tuple[str, ...] | None:
        """Checked against the keys the model declares."""
        declared = _keras_input_dict(model)
        if declared is None:
            return None
        names = tuple(spec.name for spec in specs)
        if sorted(names) != sorted(declared):
            raise ModelLoadError(
                f"The model from {source} takes a dict of inputs keyed {', '.join(declared)}; the serving inputs are "
                f"named {', '.join(map(str, names))}",
                hint="Name each --input-signature after one of the model's input keys, once per key. Received: "
                + ", ".join(map(str, names)),
            )
        return names

    def call(self, model: Any, inputs: Sequence[tf.Tensor], input_keys: tuple[str, ...] | None) -> Any:
        return model(pack(inputs, input_keys), training=False)

    def build(self, model: Any, specs: Sequence[tf.TensorSpec], input_keys: tuple[str, ...] | None) -> None:
        """Keras creates variables on the first call: call once on zeros if they do not exist yet."""
        if not model.built or not model.variables:
            self.call(model, [tf.zeros([1] + [d or 1 for d in spec.shape.as_list()[1:]], spec.dtype)
                              for spec in specs], input_keys)
