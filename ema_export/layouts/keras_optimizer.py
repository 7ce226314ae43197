"""Keras optimizers' own EMA (`use_ema=True`), saved in a TF2 checkpoint with the optimizer.

Keras 3 and tf-keras (Keras 2) optimizers keep one average per trained variable in the list
`_model_variables_moving_average`, in the order of the variables the optimizer was built on, and the checkpoint
saves that list (its nodes also appear as `optimizer/_variables/<i>`). What tells which variable each belongs to
differs:

- Keras 3 also tracks the trained variables, `_trainable_variables/<k>`: the same object-graph nodes the model
  reaches. The k-th average belongs to the k-th of them, exactly as Keras pairs them itself (`zip` in
  `_overwrite_model_variables_with_average_value`). Its recorded name, `<optimizer>/<variable path, / as _>_average`,
  is only a cross-check: flattening loses the difference between `a_b/c` and `a/b_c`.
- tf-keras tracks no such list, but builds its averages in the order of the variables it was built on, which
  `fit()` and custom loops give as `model.trainable_variables`. When every k-th average's recorded name,
  `<optimizer>/average/<variable name>`, names the k-th trainable variable, they are paired by position: that
  also pairs the variables of two towers built by one function, which tf-keras names alike (by layer only).
  Otherwise they are matched by name, and a name two variables share is reported, never guessed.

Keras `fit()` ends by copying the averages into the weights (`finalize_variable_values`); a checkpoint written
after it holds two equal copies of the averages and no raw weights, which is reported as a warning.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from ema_export.checkpoint_graph import GraphVariable, node_paths, value_attribute
from ema_export.errors import LayoutError, name_list
from ema_export.layouts.base import CheckpointShadows, Layout, Shadow, ShadowMatch, match_by_name, strip_output_index
from ema_export.read import CheckpointIndex, CheckpointIndexes
from ema_export.restored import RestoredModel

AVERAGES = "_model_variables_moving_average"
TRAINED = "_trainable_variables"
ITERATIONS = "_iterations"
TF_KERAS_NAME = re.compile(r"^(?:(?P<optimizer>[^/]+)/)?average/(?P<variable>.+)$")
"""How tf-keras names an average: `Adam/average/dense/kernel`; under a `LossScaleOptimizerV3` (`mixed_float16`), whose
wrapped optimizer creates its variables outside the optimizer's name scope, `average/dense/kernel`."""

FINALIZED_HINT = (
    "Checkpoint during training instead: keras.callbacks.ModelCheckpoint or BackupAndRestore, or your own callback "
    "saving tf.train.Checkpoint(model=..., optimizer=...) in on_epoch_end or on_train_batch_end, all run before fit() "
    "finalizes. Do not place SwapEMAWeights(swap_on_epoch=True) before the checkpoint callback: it saves the two "
    "swapped. ema_overwrite_frequency also copies the averages into the weights every N steps"
)


@dataclass(frozen=True)
class EmaOptimizer:
    """An optimizer in a checkpoint's object graph that keeps averages.

    Attributes:
        path: Object-graph path of the optimizer, e.g. `optimizer` or `model/optimizer`.
        averages: Position k in the optimizer's variable list -> the k-th average.
        trained: Position k -> object-graph node of the k-th trained variable (Keras 3); None when not tracked.
        iterations_key: Checkpoint key of the optimizer's step counter, if saved.
    """

    path: str
    averages: dict[int, GraphVariable]
    trained: dict[int, int] | None
    iterations_key: str | None


def _positions(graph: trackable_object_graph_pb2.TrackableObjectGraph, list_node: int) -> dict[int, int]:
    """A tracked list's items by their index (a None item is not tracked, so indices, not order, give positions)."""
    return {int(child.local_name): child.node_id for child in graph.nodes[list_node].children
            if child.local_name.isdigit()}


def find_ema_optimizers(graph: trackable_object_graph_pb2.TrackableObjectGraph) -> list[EmaOptimizer]:
    """Every object in the graph with a non-empty `_model_variables_moving_average`, wherever it hangs."""
    paths = node_paths(graph)
    found = []
    for node_id, node in enumerate(graph.nodes):
        children = {child.local_name: child.node_id for child in node.children}
        if AVERAGES not in children or node_id not in paths:
            continue
        averages = {}
        for position, item in _positions(graph, children[AVERAGES]).items():
            value = value_attribute(graph, item)
            if value is not None:
                averages[position] = GraphVariable(item, paths[item], value.checkpoint_key, value.full_name)
        if not averages:
            continue
        trained = _positions(graph, children[TRAINED]) if TRAINED in children else None
        iterations = value_attribute(graph, children[ITERATIONS]) if ITERATIONS in children else None
        found.append(EmaOptimizer("/".join(paths[node_id]) or "(root)", averages, trained,
                                  iterations.checkpoint_key if iterations else None))
    return found


def _optimizers(indexes: CheckpointIndexes) -> list[EmaOptimizer]:
    graph = indexes.training.graph if indexes.training is not None else None
    return find_ema_optimizers(graph) if graph is not None else []


def finalized_warning(match: ShadowMatch, restored: RestoredModel, steps: int, where: str) -> str | None:
    """The warning for a checkpoint written after Keras `fit()` copied the averages into the weights.

    Keras's first step sets each average to the weight itself, so equality only means something after two steps.
    Reads stop at the first difference, so a normal checkpoint costs one tensor read.
    """
    if steps < 2 or not match.matched:
        return None
    for index, shadow in match.matched.items():
        live = np.asarray(restored.variables[index].variable.numpy())
        if shadow.shape != live.shape or not np.array_equal(shadow.value(), live):
            return None
    return (f"{where} ran {steps} steps, yet all {len(match.matched)} averages equal their weights exactly: Keras "
            "fit() ends by copying the averages into the weights (optimizer.finalize_variable_values), so this "
            "checkpoint was written after fit() returned; the raw weights are gone and serve_live serves the averages "
            "too. "
            + FINALIZED_HINT)


def _warn_if_finalized(match: ShadowMatch, index: CheckpointIndex, restored: RestoredModel,
                       optimizers: list[EmaOptimizer]) -> None:
    reader = index.reader
    steps = max(int(reader.get_tensor(item.iterations_key)) if item.iterations_key else 0 for item in optimizers)
    warning = finalized_warning(match, restored, steps, f"The optimizer ({', '.join(i.path for i in optimizers)})")
    if warning:
        match.warnings.append(warning)
        match.explains_equality = True


def _flat(name: str) -> str:
    return name.replace("/", "_")


def _require(optimizers: list[EmaOptimizer], layout: str, what: str, indexes: CheckpointIndexes) -> CheckpointIndex:
    """The training checkpoint's index, when it holds the optimizers the layout reads."""
    if indexes.training is None or not optimizers:
        raise LayoutError(
            f"No {what} in {indexes.training_source}: expected an optimizer with a {AVERAGES} list in its object graph",
            hint=f"Compile with use_ema=True and save tf.train.Checkpoint(model=..., optimizer=...), or omit "
            f"--layout {layout} to detect the layout. Received: an optimizer-free or EMA-free checkpoint",
        )
    return indexes.training


class KerasOptimizerEmaLayout(Layout):
    """Keras 3 `use_ema=True`: averages paired by position with the optimizer's tracked trained variables."""

    name = "keras-use-ema"
    description = "Keras 3 optimizer use_ema=True averages in a tf.train.Checkpoint with the optimizer"

    @staticmethod
    def _keras3(indexes: CheckpointIndexes) -> list[EmaOptimizer]:
        return [item for item in _optimizers(indexes) if item.trained is not None]

    def detect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> str | None:
        optimizers = self._keras3(indexes)
        if not optimizers:
            return None
        count = sum(len(item.averages) for item in optimizers)
        example = next(iter(optimizers[0].averages.values())).full_name
        places = ", ".join(item.path for item in optimizers)
        return (f"{indexes.training_source} holds {count} Keras 3 optimizer averages (use_ema=True) under {places}, "
                f"named like {example!r}, paired by position with {TRAINED}")

    def collect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> ShadowMatch:
        optimizers = self._keras3(indexes)
        index = _require(optimizers, self.name, "Keras 3 use_ema averages", indexes)
        variables = _ModelIndex.of(index, restored)
        match = ShadowMatch(self.name, index.prefix, {}, [], [])
        for optimizer in optimizers:
            for position, average in sorted(optimizer.averages.items()):
                _pair(variables, optimizer, position, average, match)
        _warn_if_finalized(match, index, restored, optimizers)
        return match


@dataclass(frozen=True)
class _ModelIndex:
    """The restored model's variables looked up by object-graph node and by flattened name."""

    restored: RestoredModel
    by_node: dict[int, int]
    by_flat_name: dict[str, list[int]]
    shadows: CheckpointShadows

    @classmethod
    def of(cls, checkpoint: CheckpointIndex, restored: RestoredModel) -> _ModelIndex:
        graph = checkpoint.graph
        assert graph is not None
        key_to_node = {}
        for node_id in range(len(graph.nodes)):
            value = value_attribute(graph, node_id)
            if value is not None:
                key_to_node[value.checkpoint_key] = node_id
        by_node = {key_to_node[item.checkpoint_key]: index for index, item in enumerate(restored.variables)
                   if item.checkpoint_key in key_to_node}
        # A variable answers to its recorded name and its Keras path: a subclassed model records its tf.Variable
        # names (`classifier/kernel`, twice), while the averages are named after Keras paths.
        by_flat_name: dict[str, list[int]] = {}
        for index, item in enumerate(restored.variables):
            for alias in dict.fromkeys(_flat(name) for name in item.aliases):
                by_flat_name.setdefault(alias, []).append(index)
        return cls(restored, by_node, by_flat_name, CheckpointShadows(checkpoint))

    def label(self, index: int) -> str:
        """The variable's recorded name, with its checkpoint path when another variable was recorded as well."""
        variable = self.restored.variables[index]
        shared = sum(1 for other in self.restored.variables if other.name == variable.name) > 1
        return f"{variable.name} (at {variable.path})" if shared else variable.name

    def labels(self, indices: Sequence[int]) -> str:
        return name_list([self.label(index) for index in indices])


def _pair(variables: _ModelIndex, optimizer: EmaOptimizer, position: int, average: GraphVariable,
          match: ShadowMatch) -> None:
    """Pair one average by position, cross-checked by its flattened name, and record what does not add up."""
    stem = average.full_name.removesuffix("_average")
    by_name = variables.by_flat_name.get(stem.split("/", 1)[-1], [])
    assert optimizer.trained is not None
    node = optimizer.trained.get(position)
    owner = variables.by_node.get(node) if node is not None else None
    if node is None:  # the k-th trained variable was not tracked: its name is all there is
        if len(by_name) > 1:
            match.problems.append(
                f"ambiguous average: {average.checkpoint_key} ({average.full_name!r}) has no tracked variable at "
                f"{optimizer.path}/{TRAINED}/{position}, and its flattened name fits {len(by_name)} variables: "
                f"{variables.labels(by_name)}")
            return
        owner = by_name[0] if by_name else None
    elif owner is not None and by_name and owner not in by_name:
        match.problems.append(
            f"disagreeing average: {average.checkpoint_key} ({average.full_name!r}) is at position {position}, the "
            f"place of {variables.label(owner)}, but its name fits {variables.labels(by_name)}")
        return
    elif owner is not None and len(by_name) > 1:
        match.warnings.append(
            f"the name {average.full_name!r} flattens the paths of {len(by_name)} variables "
            f"({variables.labels(by_name)}); its position in {optimizer.path} pairs it with {variables.label(owner)}")
    shadow = variables.shadows.shadow(average.checkpoint_key, average.full_name,
                                      [variables.restored.variables[owner].name] if owner is not None else [])
    if owner is None:
        match.unmatched.append(shadow)
    elif owner in match.matched:
        match.problems.append(
            f"two averages for one variable: {variables.label(owner)} is averaged by both "
            f"{match.matched[owner].checkpoint_key} ({match.matched[owner].recorded_name!r}) and "
            f"{average.checkpoint_key} ({average.full_name!r}); keep use_ema=True on one optimizer only")
    else:
        match.matched[owner] = shadow


class TfKerasOptimizerEmaLayout(Layout):
    """tf-keras (Keras 2) `use_ema=True`: averages named `<optimizer>/average/<variable>`, matched by name."""

    name = "tf-keras-use-ema"
    description = "tf-keras (Keras 2) optimizer use_ema=True averages named <optimizer>/average/<variable>"

    @staticmethod
    def _tf_keras(indexes: CheckpointIndexes) -> list[EmaOptimizer]:
        return [item for item in _optimizers(indexes) if item.trained is None
                and all(TF_KERAS_NAME.match(average.full_name) for average in item.averages.values())]

    def detect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> str | None:
        optimizers = self._tf_keras(indexes)
        if not optimizers:
            return None
        count = sum(len(item.averages) for item in optimizers)
        example = next(iter(optimizers[0].averages.values())).full_name
        return (f"{indexes.training_source} holds {count} tf-keras optimizer averages (use_ema=True) under "
                f"{', '.join(item.path for item in optimizers)}, named like {example!r}, matched by variable name")

    def collect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> ShadowMatch:
        optimizers = self._tf_keras(indexes)
        index = _require(optimizers, self.name, "tf-keras use_ema averages", indexes)
        build = CheckpointShadows(index)
        shadows = []
        for optimizer in optimizers:
            for _, average in sorted(optimizer.averages.items()):
                name_match = TF_KERAS_NAME.match(average.full_name)
                assert name_match is not None
                variable = name_match.group("variable")
                shadows.append(build.shadow(average.checkpoint_key, average.full_name,
                                            [variable, strip_output_index(variable)]))
        by_position = _paired_by_position(shadows, restored) if len(optimizers) == 1 else None
        match = (ShadowMatch(self.name, index.prefix, by_position, [], []) if by_position is not None
                 else match_by_name(self.name, index.prefix, shadows, restored))
        _warn_if_finalized(match, index, restored, optimizers)
        return match


def _paired_by_position(shadows: list[Shadow], restored: RestoredModel) -> dict[int, Shadow] | None:
    """The k-th average with the k-th trainable variable, when there is one average per trainable variable and each
    one's recorded name names the variable at its position; None otherwise (then names decide alone)."""
    if not restored.fresh.adapter.trains_in_variable_order:
        return None
    trained = restored.trainable_positions()
    if len(trained) != len(shadows) or None in trained:
        return None
    pairs = {}
    for index, shadow in zip(trained, shadows):
        assert index is not None
        if not set(shadow.claimed_names) & set(restored.variables[index].aliases):
            return None
        pairs[index] = shadow
    return pairs
