"""Optimizer slots named `average`: the shadows a moving-average optimizer wrapper keeps in the training checkpoint.

TF Addons' `MovingAverage` (inner optimizer tracked as `awg_optimizer`) and Model Garden's `ExponentialMovingAverage`
(`ema_base_optimizer` in its 2.20 release) wrap another optimizer and give every variable a slot `average`, saved
beside the live value as `<variable path>/.OPTIMIZER_SLOT/<optimizer path>/average/.ATTRIBUTES/VARIABLE_VALUE`
(Model Garden: `shadow_copy` adds them, zero-initialised, `official/modeling/optimization/ema_optimizer.py:114-126`
of tf-models-official 2.20). The object graph records each slot on its optimizer's node as (original variable node,
slot name, slot node), so a slot is paired with its variable by node, exactly and without reading any name. Two
`average` slots for one variable (nested or parallel averaging wrappers, e.g. TF Addons SWA over MovingAverage) are
reported with both candidates, never chosen between. Slots of variables the model does not own (a head trained
beside it) are skipped with a warning, as restoring skips their values; slots of non-trainable variables (Model
Garden's `trainable_weights_only=False`, `ema_optimizer.py:117-120`) pair, and folding keeps those variables live in
both arms unless `--bn-stats ema`.

Model Garden's `EMACheckpointing` (`official/core/actions.py:76-123`) also writes *inverted* checkpoints,
`<model_dir>/ema_checkpoints/average_weights-N`: weights and averages are swapped before saving, so the model holds
the averages and the slots the raw weights. Their keys and object graph are those of a regular checkpoint; only
Model Garden's names for them, and a comparison with the regular checkpoint of the same step (also for a renamed copy,
through a regular checkpoint that the named one mirrors), tell them apart. They are refused rather than exported with
the arms swapped back: the swap is arithmetic (`a += b; b = a - b; a -= b`, `ema_optimizer.py:181-197`), so neither
value survives it exactly, while the regular checkpoint Model Garden writes beside it holds both exactly.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from ema_export.checkpoint_graph import node_paths, value_attribute
from ema_export.errors import CheckpointNotFoundError, LayoutError, name_list
from ema_export.layouts.base import CheckpointShadows, Layout, ShadowMatch
from ema_export.locate import resolve_checkpoint
from ema_export.read import CheckpointIndex, CheckpointIndexes
from ema_export.restored import RestoredModel

AVERAGE_SLOT = "average"
"""The slot name every moving-average optimizer wrapper uses for its shadows."""

INNER_OPTIMIZERS = {
    "awg_optimizer": "TF Addons MovingAverage",
    "ema_base_optimizer": "Model Garden ExponentialMovingAverage",
    "base_optimizer": "Model Garden ExponentialMovingAverage",
}
"""How each known wrapper tracks the optimizer it wraps, which names the producer. Model Garden 2.20 tracks it as
`ema_base_optimizer` (tf-models-official 2.20, `official/modeling/optimization/ema_optimizer.py:110`); its main branch
on GitHub as `base_optimizer`."""

INVERTED_DIRECTORY = "ema_checkpoints"
INVERTED_NAME = re.compile(r"^average_weights-(\d+)$")
"""Where Model Garden's `EMACheckpointing` writes: `<model_dir>/ema_checkpoints/average_weights-<step>`."""

_MIRROR_CHECKS = 4  # variables compared against the regular checkpoint to confirm an inversion (smallest first)

GraphProto = trackable_object_graph_pb2.TrackableObjectGraph
SerializedTensor = GraphProto.TrackableObject.SerializedTensor


@dataclass(frozen=True)
class AverageSlot:
    """One `average` slot: the variable it belongs to, and the optimizer that keeps it."""

    optimizer_node: int
    owner_key: str
    owner_name: str
    optimizer_path: str
    checkpoint_key: str
    full_name: str


def find_average_slots(graph: GraphProto) -> list[AverageSlot]:
    """Every `average` slot of the checkpoint, paired with its variable through the optimizer's slot records."""
    paths = {node: "/".join(path) for node, path in node_paths(graph).items()}
    slots = []
    for optimizer_node, node in enumerate(graph.nodes):
        for record in node.slot_variables:
            if record.slot_name != AVERAGE_SLOT:
                continue
            slot_value = value_attribute(graph, record.slot_variable_node_id)
            owner_value = value_attribute(graph, record.original_variable_node_id)
            if slot_value is None or owner_value is None:
                continue
            slots.append(AverageSlot(optimizer_node, owner_value.checkpoint_key,
                                     owner_value.full_name, paths.get(optimizer_node, f"node {optimizer_node}"),
                                     slot_value.checkpoint_key, slot_value.full_name))
    return slots


def slot_names(graph: GraphProto) -> list[str]:
    """The names of every optimizer slot in the checkpoint, for messages when none is `average`."""
    return sorted({record.slot_name for node in graph.nodes for record in node.slot_variables})


def describe_wrappers(graph: GraphProto, slots: list[AverageSlot]) -> str:
    """`the optimizer at 'optimizer' (TF Addons MovingAverage: inner optimizer tracked as awg_optimizer)`."""
    described = []
    for slot in {slot.optimizer_node: slot for slot in slots}.values():
        children = {child.local_name for child in graph.nodes[slot.optimizer_node].children}
        known = [f"{producer}: inner optimizer tracked as {inner}" for inner, producer in INNER_OPTIMIZERS.items()
                 if inner in children]
        described.append(f"{slot.optimizer_path!r} ({known[0] if known else 'a moving-average optimizer wrapper'})")
    return "the optimizer at " + ", ".join(described)


@dataclass(frozen=True)
class InvertedCheckpoint:
    """Why a checkpoint is taken for an inverted EMA checkpoint, and the regular checkpoint to pass instead."""

    prefix: str
    signs: tuple[str, ...]
    regular: str | None
    regular_is_same_step: bool = False
    certain: bool = True
    """False for a renamed copy that mirrors another unnamed checkpoint of its step: one of the two is inverted."""


def find_inversion(prefix: str, indexes: CheckpointIndexes) -> InvertedCheckpoint | None:
    """Recognise Model Garden's inverted EMA checkpoint by where it lives, and confirm it by value when the regular
    checkpoint of the same step is beside it.

    Args:
        prefix: The checkpoint to judge: the export's training or EMA checkpoint.
        indexes: What the read stage opened; the checkpoints around `prefix` are read through it.

    Returns:
        The evidence, or None when nothing marks `prefix` as inverted.
    """
    path = Path(prefix)
    signs = []
    if path.parent.name == INVERTED_DIRECTORY:
        signs.append(f"it lies in an {INVERTED_DIRECTORY}/ directory")
    name = INVERTED_NAME.match(path.name)
    if name:
        signs.append("its name is average_weights-<step>")
    if not signs:
        return _mirrored_without_name(prefix, indexes)
    model_dir = path.parent.parent if path.parent.name == INVERTED_DIRECTORY else path.parent
    same_step = model_dir / f"ckpt-{name.group(1)}" if name else None
    if same_step is not None and same_step.with_name(same_step.name + ".index").is_file():
        if _mirrors(indexes.nearby(prefix), indexes.nearby(same_step)):
            signs.append(f"its model values are the 'average' slots of {same_step.name}, the regular checkpoint "
                         "of the same step")
        return InvertedCheckpoint(prefix, tuple(signs), str(same_step), regular_is_same_step=True)
    try:
        regular: str | None = resolve_checkpoint(model_dir, "training", "CKPT_DIR").prefix
    except CheckpointNotFoundError:
        regular = None
    if regular is not None and Path(regular).resolve() == path.resolve():
        regular = None  # the latest checkpoint beside it is itself
    return InvertedCheckpoint(prefix, tuple(signs), regular)


def _is_named_inverted(prefix: str) -> bool:
    return Path(prefix).parent.name == INVERTED_DIRECTORY or INVERTED_NAME.match(Path(prefix).name) is not None


def _nearby_prefixes(prefix: str) -> list[str]:
    """Checkpoint prefixes in the same directory, its subdirectories and its parent: where a copy of a Model Garden
    checkpoint, or the checkpoint it was copied from, usually sits."""
    folder = Path(prefix).parent
    places = [folder, folder.parent, *(child for child in folder.iterdir() if child.is_dir())]
    found = {str(index)[: -len(".index")] for place in places for index in place.glob("*.index")}
    found.discard(str(Path(prefix)))
    return sorted(found)


def _global_step(index: CheckpointIndex) -> int | None:
    reader = index.reader
    for key in ("global_step/.ATTRIBUTES/VARIABLE_VALUE", "step/.ATTRIBUTES/VARIABLE_VALUE"):
        if reader.has_tensor(key):
            return int(reader.get_tensor(key))
    return None


def _mirror_partners(prefix: str, step: int, indexes: CheckpointIndexes) -> list[str]:
    """Checkpoints nearby of the same step whose values are this one's, swapped."""
    partners = []
    for other in _nearby_prefixes(prefix):
        try:
            nearby = indexes.nearby(other)
            if _global_step(nearby) == step and _mirrors(indexes.nearby(prefix), nearby):
                partners.append(other)
        except (tf.errors.OpError, ValueError):
            continue
    return partners


def _mirrored_without_name(prefix: str, indexes: CheckpointIndexes) -> InvertedCheckpoint | None:
    """A checkpoint without Model Garden's names that holds, swapped, the values of a checkpoint of the same step
    nearby: a renamed copy of an inverted checkpoint, or the regular checkpoint such a copy was made from.

    Named partners decide: beside `ema_checkpoints/average_weights-N`, this one is the regular checkpoint; and when
    its unnamed partner has such a named partner itself, that partner is the regular one and this is a renamed copy
    of the inverted one. Two unnamed ones alone cannot be told apart, and the export is refused until the user says
    which this is.
    """
    step = _global_step(indexes.nearby(prefix))
    if step is None:
        return None
    partners = _mirror_partners(prefix, step, indexes)
    if not partners or any(_is_named_inverted(other) for other in partners):
        return None
    for other in partners:
        named = [third for third in _mirror_partners(other, step, indexes) if _is_named_inverted(third)]
        if named:
            return InvertedCheckpoint(
                prefix, (f"its model values are the 'average' slots of {other}, a checkpoint of the same step "
                         f"({step}) that Model Garden's {named[0]} mirrors too: this is a renamed copy of that "
                         "inverted checkpoint",), other, regular_is_same_step=True)
    other = partners[0]
    return InvertedCheckpoint(
        prefix, (f"its model values are the 'average' slots of {other}, a checkpoint of the same step "
                 f"({step}) that is not named as Model Garden names its inverted checkpoints either, so one of "
                 "the two is a renamed copy of ema_checkpoints/average_weights-N",), other, True, certain=False)


def _mirrors(inverted: CheckpointIndex, regular: CheckpointIndex) -> bool:
    """Whether the inverted checkpoint's weights equal the regular one's averages (to within the swap's rounding)."""
    if regular.graph is None:
        return False
    shapes = inverted.shapes
    slots = [slot for slot in find_average_slots(regular.graph)
             if slot.owner_key in shapes and slot.checkpoint_key in regular.shapes]
    slots.sort(key=lambda slot: int(np.prod(shapes[slot.owner_key])))
    return bool(slots) and all(
        np.allclose(inverted.reader.get_tensor(slot.owner_key), regular.reader.get_tensor(slot.checkpoint_key),
                    rtol=1e-5, atol=1e-6) for slot in slots[:_MIRROR_CHECKS])


def refuse_inverted(inversion: InvertedCheckpoint, given_as_ema: bool = False) -> LayoutError:
    """The error for an inverted checkpoint: what it is, why it is not exported, which checkpoint to pass."""
    from ema_export.layouts.inversion import INVERTED_FLAGS

    if not inversion.certain:
        return LayoutError(
            f"Cannot tell whether {inversion.prefix} is an inverted EMA checkpoint ({'; '.join(inversion.signs)})",
            hint=f"Say which it is: {INVERTED_FLAGS}. Received: {inversion.prefix}",
        )
    if inversion.regular is None:
        instead = "the regular checkpoint in the training's model directory (the parent of ema_checkpoints/)"
    else:
        which = ("the regular checkpoint of the same step" if inversion.regular_is_same_step
                 else "the latest regular checkpoint in the model directory, from another step")
        instead = f"{inversion.regular} ({which})"
    return LayoutError(
        f"{inversion.prefix} is an inverted EMA checkpoint, as Model Garden's EMACheckpointing writes them "
        f"({'; '.join(inversion.signs)}): weights and averages were swapped before saving, so its model holds the "
        "moving averages and its 'average' slots the raw weights, both rounded by the swap. Expected a training "
        "checkpoint whose model holds the raw weights",
        hint=(("Drop --ema-checkpoint (the regular checkpoint holds the averages itself) and pass " if given_as_ema
               else "Pass ") + f"{instead} as CKPT_DIR instead; it holds both exactly, or pass --inverted to export "
              f"this one with the arms swapped back. Received: {inversion.prefix}"),
    )


def _average_slots(indexes: CheckpointIndexes) -> tuple[GraphProto | None, list[AverageSlot]]:
    """The training checkpoint's object graph and `average` slots (None, [] for a Keras file)."""
    graph = indexes.training.graph if indexes.training is not None else None
    return graph, find_average_slots(graph) if graph is not None else []


class OptimizerSlotLayout(Layout):
    """Shadows in the `average` slots of a moving-average optimizer wrapper, inside the training checkpoint."""

    name = "optimizer-slot"
    description = ("optimizer slots named 'average' in the training checkpoint (TF Addons MovingAverage, "
                   "Model Garden ExponentialMovingAverage)")

    def detect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> str | None:
        graph, slots = _average_slots(indexes)
        if graph is None or not slots:
            return None
        prefix = indexes.training_source
        inversion = find_inversion(prefix, indexes) if self.settings.inverted is None else None
        if inversion is not None:
            return f"{prefix} is an inverted EMA checkpoint ({'; '.join(inversion.signs)})"
        owned = {v.checkpoint_key for v in restored.variables}
        num_owned = sum(1 for slot in slots if slot.owner_key in owned)
        return (f"{len(slots)} optimizer slots named 'average' in {prefix}, {num_owned} of them "
                f"for model variables, kept by {describe_wrappers(graph, slots)}")

    def collect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> ShadowMatch:
        """Pair each model variable with its `average` slot.

        Raises:
            LayoutError: The checkpoint is an inverted EMA checkpoint, has no `average` slot at all, or has two for
                one variable.
        """
        prefix = indexes.training_source
        graph, slots = _average_slots(indexes)
        if indexes.training is None or graph is None or not slots:
            names = slot_names(graph) if graph is not None else []
            present = (f"optimizer slots {', '.join(names)}" if names else "no optimizer slots" if graph is not None
                       else "a checkpoint without an object graph")
            raise LayoutError(
                f"No optimizer slot named 'average' in {prefix}: expected the slots a moving-average optimizer "
                "wrapper keeps (TF Addons MovingAverage, Model Garden ExponentialMovingAverage)",
                hint=f"Omit --layout to detect where the shadows are. Received: {present}",
            )
        inversion = find_inversion(prefix, indexes) if self.settings.inverted is None else None
        if inversion is not None:
            raise refuse_inverted(inversion)
        build = CheckpointShadows(indexes.training)
        by_key = {variable.checkpoint_key: index for index, variable in enumerate(restored.variables)}
        candidates: dict[int, list[AverageSlot]] = defaultdict(list)
        outside: list[AverageSlot] = []
        for slot in slots:
            if slot.owner_key in by_key:
                candidates[by_key[slot.owner_key]].append(slot)
            else:
                outside.append(slot)  # like the optimizer's other state, it belongs to something the model is not

        ambiguous = {index: found for index, found in candidates.items() if len(found) > 1}
        if ambiguous:
            raise self._ambiguity(prefix, restored, ambiguous)
        matched = {index: build.shadow(found[0].checkpoint_key, found[0].full_name, [found[0].owner_name])
                   for index, found in candidates.items()}
        return ShadowMatch(self.name, prefix, matched, [], [],
                           self._warnings(outside))

    @staticmethod
    def _ambiguity(prefix: str, restored: RestoredModel, ambiguous: dict[int, list[AverageSlot]]) -> LayoutError:
        """Two averages for one variable (nested or parallel averaging wrappers): list them, never pick one."""
        optimizers = list(dict.fromkeys(slot.optimizer_path for found in ambiguous.values() for slot in found))
        candidates = [f"{restored.variables[index].name}: " + " or ".join(slot.checkpoint_key for slot in found)
                      for index, found in sorted(ambiguous.items())]
        return LayoutError(
            f"{len(ambiguous)} model variables have more than one 'average' slot in {prefix}, kept by the averaging "
            f"optimizers at {', '.join(repr(path) for path in optimizers)}: expected one per variable, and the "
            "exporter does not guess which average serve_ema should serve",
            hint="Save the averages of the optimizer to serve as a separate EMA checkpoint, e.g. "
            "tf.train.Checkpoint(ema_weights={v.name: optimizer.get_slot(v, 'average') for v in variables}), and "
            f"pass it with --ema-checkpoint. Received: {name_list(candidates)}",
        )

    @staticmethod
    def _warnings(outside: list[AverageSlot]) -> list[str]:
        warnings = []
        if outside:
            warnings.append(
                f"skipped {len(outside)} 'average' slots of variables outside the model: "
                + name_list([slot.checkpoint_key for slot in outside])
            )
        return warnings
