"""Stage 5, assemble: one exportable object with the live and the averaged arm, sharing what is not averaged.

The model is traced once, as the live arm. The EMA arm calls that same traced function with the averaged variables
bound in place of the live ones it reads, and every other variable bound as itself. So whatever the model family
(Keras 3, tf-keras, `tf.Module`), the SavedModel holds the model's graph once, the live weights once, the averages once
and everything else once, and both arms run exactly the same operations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from ema_export.contracts import DEFAULT_ARMS, SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE, output_name
from ema_export.fold import Averages
from ema_export.memory import tensor_bytes
from ema_export.restored import RestoredModel


@dataclass(frozen=True)
class Assembly:
    """What gets saved: the object to track, its signatures, and the in-memory functions to verify against."""

    root: tf.Module
    signatures: Mapping[str, Any]
    functions: Mapping[str, Callable[..., dict[str, tf.Tensor]]]
    input_signature: list[tf.TensorSpec]
    default_arm: str
    unread_averages: tuple[str, ...] = ()
    """Averaged variables the serving function never reads: their averages are saved but change no answer."""
    variable_bytes: tuple[int, ...] = ()
    """The size of every variable the export saves (the model's, then the averages), for planning the write."""


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


def rebound(traced: Any, substitutes: Mapping[int, tf.Variable], specs: Sequence[tf.TensorSpec]) -> Any:
    """`traced` (a concrete function) run on other variables.

    `substitutes` maps `id(handle)` of a variable `traced` reads to the variable to read instead; every other captured
    value is passed as it was traced.

    A traced function takes what it captured as extra arguments (`captured_inputs`, in the order of its trailing
    inputs), so calling the same function with other resource handles runs the same graph on other weights. The call
    is TensorFlow's public `StatefulPartitionedCall` op, the one a traced call compiles to; a SavedModel then stores the
    function body once and each arm's variables as that arm's bound inputs.
    """
    captured = [substitutes[id(value)].handle if id(value) in substitutes else value
                for value in traced.captured_inputs]
    output_types = [tensor.dtype for tensor in traced.outputs]

    @tf.function(input_signature=list(specs), autograph=False)
    def serve(*inputs: tf.Tensor) -> Any:
        flat = tf.raw_ops.StatefulPartitionedCall(args=[*inputs, *captured], Tout=output_types, f=traced)
        return tf.nest.pack_sequence_as(traced.structured_outputs, flat, expand_composites=True)

    return serve


def assemble(restored: RestoredModel, averages: Averages, default_arm: str = "ema") -> Assembly:
    """Build the export root and the `serve_live`, `serve_ema` and `serving_default` signatures."""
    fresh = restored.fresh
    root = tf.Module()
    fresh.adapter.track_live(root, fresh.model)
    root.ema_variables = [averages[index] for index in sorted(averages)]
    live = _serving_function(lambda *inputs: fresh.call(fresh.model, inputs), fresh.input_signature)
    traced = live.get_concrete_function()
    handles = {index: id(restored.variables[index].variable.handle) for index in sorted(averages)}
    substitutes = {handles[index]: average for index, average in averages.items()}
    read = {id(value) for value in traced.captured_inputs}
    unread = tuple(restored.variables[index].name for index, handle in handles.items() if handle not in read)
    ema = rebound(traced, substitutes, fresh.input_signature)
    functions = {SIGNATURE_LIVE: live, SIGNATURE_EMA: ema}
    concrete = {SIGNATURE_LIVE: traced, SIGNATURE_EMA: ema.get_concrete_function()}
    concrete[SIGNATURE_DEFAULT] = concrete[DEFAULT_ARMS[default_arm]]
    functions[SIGNATURE_DEFAULT] = functions[DEFAULT_ARMS[default_arm]]
    saved = [item.variable for item in restored.variables] + [averages[index] for index in sorted(averages)]
    sizes = tuple(tensor_bytes(variable.shape, variable.dtype) for variable in saved)
    return Assembly(root, concrete, functions, fresh.input_signature, default_arm, unread, sizes)
