"""Stage 5, assemble: one exportable object with the live and the averaged arm, sharing what is not averaged.

How each arm is tracked and how the EMA arm runs is the model family's business (`ema_export.adapters`): Keras 3
through `Model.stateless_call` on the live instance, tf-keras and `tf.Module` through a second instance that shares
the live instance's non-averaged variables. Either way the SavedModel stores the live weights once, the averages once
and everything else once (or reports what had to be copied).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

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


def assemble(restored: RestoredModel, averages: Averages, default_arm: str = "ema") -> Assembly:
    """Build the export root and the `serve_live`, `serve_ema` and `serving_default` signatures."""
    fresh = restored.fresh
    root = tf.Module()
    copied: list[str] = []
    fresh.adapter.track_live(root, fresh.model)
    ema_call = fresh.adapter.ema_call(restored, averages, root, copied)
    functions = {
        SIGNATURE_LIVE: _serving_function(lambda *inputs: fresh.call(fresh.model, inputs), fresh.input_signature),
        SIGNATURE_EMA: _serving_function(ema_call, fresh.input_signature),
    }
    concrete = {name: function.get_concrete_function() for name, function in functions.items()}
    concrete[SIGNATURE_DEFAULT] = concrete[DEFAULT_ARMS[default_arm]]
    functions[SIGNATURE_DEFAULT] = functions[DEFAULT_ARMS[default_arm]]
    return Assembly(root, concrete, functions, fresh.input_signature, default_arm, copied)
