"""Keras 3 `use_ema=True` averages inside Keras's own files: `.keras` (`model.save`, `ModelCheckpoint`) and
`.weights.h5` (`save_weights`, `ModelCheckpoint(save_weights_only=True)`).

A compiled model's file stores `optimizer.variables` positionally at `optimizer/vars/<i>`, with no names: the step
counter, the learning rate when it is a number, the averages in the order of `model.trainable_variables` (what
`compile`/`fit` build the optimizer on), then the optimizer's slots. Where the optimizer's configuration is known
(`config.json` of a `.keras` archive, or a compiled model from the factory), Keras itself rebuilds the optimizer
on the fresh model and says where each average sits; a `.weights.h5` file alone is read by counting and shapes,
and what cannot be told apart that way (the averages of a slot-free SGD against SGD momentums) is an error that
names both readings, never a guess.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from ema_export.errors import LayoutError
from ema_export.keras_files import (OPTIMIZER_GROUP, StoredValue, optimizer_config, optimizer_values, read_value,
                                   trained_precision)
from ema_export.layouts.base import Layout, Shadow, ShadowMatch
from ema_export.layouts.inversion import judge_keras_file, refuse
from ema_export.layouts.keras_optimizer import finalized_warning
from ema_export.private_apis import PrivateApiError, built_averages
from ema_export.read import CheckpointIndexes
from ema_export.restored import RestoredModel

_FIX_AMBIGUITY = ("Save a .keras file instead (model.save or ModelCheckpoint without save_weights_only), which "
                  "records the optimizer's configuration, or make --model return the model compiled with the training "
                  "optimizer")


@dataclass
class _Plan:
    """Where the averages of one file are, and how that is known."""

    path: str
    stored: list[StoredValue]
    trained: list[int]
    """Indices into `RestoredModel.variables` of the model's trainable variables, in `trainable_variables` order."""
    positions: list[int]
    """Index into `stored` of the k-th trainable variable's average."""
    evidence: str
    expected_count: int | None = None
    readings: list[str] = field(default_factory=list)
    """When the file alone cannot say where the averages are: every reading that fits it."""


def _span(positions: list[int]) -> str:
    if positions and positions == list(range(positions[0], positions[-1] + 1)):
        return f"{OPTIMIZER_GROUP}/{positions[0]}-{positions[-1]}"
    return ", ".join(f"{OPTIMIZER_GROUP}/{p}" for p in positions)


def _is_tf_keras(model: Any) -> bool:
    return type(model).__module__.startswith("tf_keras.")


def _known_config(path: str, model: Any) -> tuple[dict[str, Any], str] | None:
    config = optimizer_config(path)
    if config is not None:
        return config, "its config.json"
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "get_config"):
        if _is_tf_keras(model):
            import tf_keras as keras
        else:
            import keras

        return keras.optimizers.serialize(optimizer), "the compiled model from --model"
    return None


def _keras_positions(config: dict[str, Any], model: Any) -> tuple[list[int], int] | None:
    """Rebuild the optimizer on the fresh model and read where Keras puts each average, and how many values in all.

    None when Keras cannot rebuild it (a custom optimizer class that is not registered).
    """
    if _is_tf_keras(model):
        import tf_keras as keras  # its optimizers keep averages the same way, and serialize with the same keys
    else:
        import keras

    try:
        optimizer = keras.optimizers.deserialize(config)
        optimizer.build(list(model.trainable_variables))
    except Exception:  # unknown class, incompatible arguments: fall back to the documented order
        return None
    index = {id(variable): position for position, variable in enumerate(optimizer.variables)}
    try:
        averages = built_averages(optimizer)
    except PrivateApiError:  # a Keras release that keeps them elsewhere: the documented order still holds
        return None
    if len(averages) != len(model.trainable_variables) or any(id(a) not in index for a in averages):
        return None
    return [index[id(average)] for average in averages], len(optimizer.variables)


def _fits(stored: list[StoredValue], first: int, shapes: list[tuple[int, ...]]) -> bool:
    """Whether the averages can start at `first`: a step counter, a numeric learning rate if `first` is 2, then
    one value shaped like each trainable variable, in order."""
    if len(stored) < first + len(shapes) or stored[0].shape != () or not stored[0].dtype.is_integer:
        return False
    if first == 2 and (stored[1].shape != () or not stored[1].dtype.is_floating):
        return False
    return [value.shape for value in stored[first:first + len(shapes)]] == shapes


def _plan(indexes: CheckpointIndexes, restored: RestoredModel) -> _Plan | None:
    """Where the averages are, from the optimizer's config when known, else from the file's counts and shapes;
    None when the source is not a Keras file of a model whose optimizer kept averages."""
    path = indexes.keras_file
    if path is None or not (restored.fresh.is_keras or restored.fresh.is_tf_keras):
        return None
    stored = optimizer_values(path)
    if not stored:
        return None
    model = restored.fresh.model
    found = restored.trainable_positions()
    trained = [index for index in found if index is not None]
    assert len(trained) == len(found), "a Keras-file restore lists every model variable"
    if not trained:
        return None
    known = _known_config(path, model)
    if known is not None:
        config, origin = known
        inner = (config.get("config") or {}).get("inner_optimizer")
        if isinstance(inner, dict):  # a LossScaleOptimizer: the averages are the wrapped optimizer's
            config = inner
        if not (config.get("config") or {}).get("use_ema"):
            return None
        evidence = f"{config.get('class_name', 'the optimizer')} use_ema=True in {origin}"
        rebuilt = _keras_positions(config, model)
        if rebuilt is not None:
            return _Plan(path, stored, trained, rebuilt[0], evidence + ", positions from Keras", rebuilt[1])
        first = 2 if isinstance((config.get("config") or {}).get("learning_rate"), (int, float)) else 1
        return _Plan(path, stored, trained, list(range(first, first + len(trained))), evidence)

    shapes = [restored.variables[index].shape for index in trained]
    starts = [first for first in (1, 2) if _fits(stored, first, shapes)]
    if not starts:
        return None
    positions = list(range(starts[0], starts[0] + len(trained)))
    plan = _Plan(path, stored, trained, positions, "no optimizer config is recorded, so they were found by shape")
    if len(starts) > 1:
        plan.readings = [f"averages at {_span(list(range(first, first + len(trained))))}" for first in starts]
    elif len(stored) == starts[0] + len(trained):
        plan.readings = [f"use_ema averages of a slot-free optimizer (SGD without momentum) at {_span(positions)}",
                         f"the momentums of SGD(momentum>0) without use_ema at {_span(positions)}"]
    return plan


class KerasFileEmaLayout(Layout):
    """Keras 3 `use_ema=True` averages stored positionally in a `.keras` or `.weights.h5` file."""

    name = "keras-file-use-ema"
    description = "Keras 3 optimizer use_ema=True averages in a .keras or .weights.h5 file (optimizer/vars/<i>)"

    def _plan(self, indexes: CheckpointIndexes, restored: RestoredModel) -> _Plan | None:
        """The plan, made once per export: making it can rebuild the optimizer, slots and all, on the model."""
        key = (id(indexes), id(restored))
        cached = getattr(self, "_cached", None)
        if cached is None or cached[0] != key:
            cached = self._cached = (key, _plan(indexes, restored))
        return cached[1]

    def detect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> str | None:
        plan = self._plan(indexes, restored)
        if plan is None:
            return None
        if plan.readings:
            return (f"{plan.path} is a Keras file with {len(plan.stored)} optimizer values that may hold use_ema "
                    f"averages, but {plan.evidence} and they can be read {len(plan.readings)} ways")
        return (f"{plan.path} is a Keras file whose optimizer stores {len(plan.trained)} use_ema averages at "
                f"{_span(plan.positions)} ({plan.evidence}), paired by position with the model's trainable variables")

    def collect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> ShadowMatch:
        plan = self._plan(indexes, restored)
        if plan is None:
            raise LayoutError(
                f"No use_ema averages in {indexes.training_source}: expected a .keras or .weights.h5 file of a Keras "
                f"model compiled with an optimizer with use_ema=True ({OPTIMIZER_GROUP} holding a step counter, "
                "then one average per trainable variable)",
                hint=f"Omit --layout {self.name} to detect the layout. Received: "
                + ("not a Keras file" if indexes.keras_file is None
                   else "a file without such optimizer values, or an optimizer config without use_ema"),
            )
        if plan.readings:
            raise LayoutError(
                f"Cannot tell where the use_ema averages are in {plan.path}: {plan.evidence}, and "
                f"{len(plan.readings)} readings fit its {len(plan.stored)} optimizer values:",
                hint=_FIX_AMBIGUITY, problems=plan.readings,
            )
        match = ShadowMatch(self.name, plan.path, {}, [], [])
        if plan.expected_count is not None and plan.expected_count != len(plan.stored):
            match.problems.append(
                f"optimizer value count: the optimizer ({plan.evidence}) has {plan.expected_count} variables for "
                f"this model, {plan.path} stores {len(plan.stored)}")
            return match
        for k, (index, position) in enumerate(zip(plan.trained, plan.positions)):
            stored = plan.stored[position]
            variable = restored.variables[index]
            match.matched[index] = Shadow(
                checkpoint_key=stored.key,
                recorded_name=f"average {k} (of {variable.name})",
                claimed_names=(variable.name,),
                shape=stored.shape,
                dtype=stored.dtype,
                read=functools.partial(read_value, plan.path, stored.key),
            )
        if self.settings.inverted is None:
            pairs = [(restored.variables[index].checkpoint_key, shadow.checkpoint_key)
                     for index, shadow in match.matched.items()]
            finding = judge_keras_file(plan.path, pairs, plan.stored[0].key)
            if finding is not None:
                raise refuse(finding)
        precision = trained_precision(plan.path)
        policies = {getattr(getattr(layer, "dtype_policy", None), "name", "") for layer in restored.fresh.model.layers}
        if precision and not any(name.startswith("mixed_") for name in policies):
            match.warnings.append(
                f"{plan.path} was trained in mixed precision ({precision}), but the model from "
                f"{restored.fresh.source} computes in {', '.join(sorted(filter(None, policies)))}: both arms serve "
                "the trained values in that precision, so outputs differ slightly from training's; build the model "
                f"under keras.mixed_precision.set_global_policy({precision!r}) to serve it as trained")
        steps = int(read_value(plan.path, plan.stored[0].key)) if plan.stored[0].dtype.is_integer else 0
        warning = finalized_warning(match, restored, steps, f"The optimizer saved in {plan.path}")
        if warning:
            match.warnings.append(warning)
            match.explains_equality = True
        return match
