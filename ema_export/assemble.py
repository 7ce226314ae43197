"""Stage 5, assemble: one exportable object with the live and the averaged arm, sharing what is not averaged.

Keras models run the EMA arm through `Model.stateless_call`, with the averaged values in new variables and the
non-trainable state (BatchNorm statistics) passed as the live variables themselves, so the SavedModel stores the live
weights once, the averages once and everything else once. A `tf.Module` has no such call, so a second instance from
the factory carries the averages; its non-averaged variables are replaced by the live ones where the module exposes
them as attributes or container items, and copied (and reported) otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from ema_export.checkpoint_graph import children_of, variable_identity
from ema_export.contracts import DEFAULT_ARMS, SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE, output_name
from ema_export.fold import Averages
from ema_export.restored import RestoredModel


@dataclass
class Assembly:
    """What gets saved: the object to track, its signatures, and the in-memory functions to verify against."""

    root: tf.Module
    signatures: dict[str, Any]
    functions: dict[str, Callable[..., dict[str, tf.Tensor]]]
    input_signature: list[tf.TensorSpec]
    default_arm: str
    copied_non_averaged: list[str] = field(default_factory=list)


def output_dict(outputs: Any) -> dict[str, tf.Tensor]:
    """Name a model's outputs for a signature: dict keys as given, otherwise `output_0`, `output_1`, ..."""
    if isinstance(outputs, dict):
        return {str(key): value for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return {output_name(index): value for index, value in enumerate(outputs)}
    return {output_name(0): outputs}


def _serving_function(call: Callable[..., Any], specs: Sequence[tf.TensorSpec]) -> Any:
    @tf.function(input_signature=list(specs), autograph=False)
    def serve(*inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return output_dict(call(*inputs))

    return serve


def _keras_ema_call(restored: RestoredModel, averages: Averages, root: tf.Module) -> Callable[..., Any]:
    model = restored.fresh.model
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
        outputs, _ = model.stateless_call(trainable_values, non_trainable_values, restored.fresh.pack(inputs),
                                          training=False)
        return outputs

    return call


def _follow(root: Any, path: str) -> tuple[Any, Any, str]:
    obj, parent, name = root, None, ""
    for name in filter(None, path.split("/")):
        parent, obj = obj, children_of(obj)[name]
    return obj, parent, name


def _share(parent: Any, name: str, old: Any, new: Any) -> bool:
    """Put `new` where `old` hangs in `parent`, so both instances use one variable. False if it cannot be done."""
    if parent is None:
        return False
    if getattr(parent, name, None) is old:
        setattr(parent, name, new)
        return True
    try:
        key: Any = int(name) if isinstance(parent, Sequence) else name
        if parent[key] is old:
            parent[key] = new
            return True
    except (TypeError, KeyError, IndexError, ValueError):
        pass
    return False


def _module_ema_call(restored: RestoredModel, averages: Averages, root: tf.Module, copied: list[str]) -> Any:
    fresh = restored.fresh
    copy = fresh.factory()
    fresh.build(copy)
    own: list[Any] = []  # variables of the copy that its EMA arm really reads (not replaced by a live one)
    for index, item in enumerate(restored.variables):
        target, parent, name = _follow(copy, item.path)
        if index in averages:
            target.assign(averages[index])
            own.append(target)
        elif not _share(parent, name, target, item.variable):
            target.assign(item.variable)
            copied.append(item.name)
            own.append(target)
    if fresh.is_tf_keras:
        # As for Keras 3: track variables, not the model object (Keras 2 would also save every layer's traced
        # functions). A replaced variable stays in its layer's weight list but is read by nothing, so not saved.
        root.ema_variables = own
    else:
        root.ema_model = copy
    return lambda *inputs: fresh.call(copy, inputs)


def assemble(restored: RestoredModel, averages: Averages, default_arm: str = "ema") -> Assembly:
    """Build the export root and the `serve_live`, `serve_ema` and `serving_default` signatures."""
    fresh = restored.fresh
    root = tf.Module()
    copied: list[str] = []
    if fresh.is_keras:
        # Track the variables, not the Keras model object: a SavedModel that tracks a Keras 3 model cannot be run by
        # the session-based loader TF Serving uses ("Could not find variable ..."); Keras's own export does the same.
        root.live_variables = [variable.value for variable in fresh.model.variables]
        ema_call = _keras_ema_call(restored, averages, root)
    elif fresh.is_tf_keras:
        root.live_variables = list(fresh.model.variables)
        ema_call = _module_ema_call(restored, averages, root, copied)
    else:
        root.live_model = fresh.model
        ema_call = _module_ema_call(restored, averages, root, copied)
    functions = {
        SIGNATURE_LIVE: _serving_function(lambda *inputs: fresh.call(fresh.model, inputs), fresh.input_signature),
        SIGNATURE_EMA: _serving_function(ema_call, fresh.input_signature),
    }
    concrete = {name: function.get_concrete_function() for name, function in functions.items()}
    concrete[SIGNATURE_DEFAULT] = concrete[DEFAULT_ARMS[default_arm]]
    functions[SIGNATURE_DEFAULT] = functions[DEFAULT_ARMS[default_arm]]
    return Assembly(root, concrete, functions, fresh.input_signature, default_arm, copied)
