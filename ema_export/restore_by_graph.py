"""The object-graph strategy of the restore stage: live values through `tf.train.Checkpoint`, strictly.

The model may hang at the checkpoint's root (`tf.train.Checkpoint(weights=W, biases=b)` with a module that has
`weights` and `biases`) or under a named child (`tf.train.Checkpoint(model=model, optimizer=...)`). The attachment
point is chosen by lining the object graph up with the model before anything is read, then values are restored by
`tf.train.Checkpoint` through the object graph, which must match every object of the model: no variable may silently
keep its initializer. A large model made of variables only is read in parts, several at once (`restore_in_parts`).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from ema_export.checkpoint_graph import GraphVariable, children_of, iter_variables, match_objects, variable_identity
from ema_export.errors import RestoreError, name_list
from ema_export.fresh_model import FreshModel
from ema_export.locate import CheckpointFiles
from ema_export.memory import large_enough, read_ahead, tensor_bytes, usable_cpus
from ema_export.private_apis import saves_state_of_its_own
from ema_export.read import ROLE_TRAINING, CheckpointIndex, reading
from ema_export.restored import RestoredModel, RestoredVariable, raise_for_shapes

IN_PARTS_MIN_BYTES = 256 * 2**20
"""Below this many bytes of variables, `tf.train.Checkpoint` restores them, in one `RestoreV2`."""

IN_PARTS_MIN_MEAN_BYTES = 4 * 2**20
"""Nor when they average less than this: an op per part costs more than reading 100 MB at once saves."""

PART_BYTES = 128 * 2**20
"""Large variables are restored in parts of about this many bytes, one `RestoreV2` each."""


def _objects(root: Any) -> list[Any]:
    """Every trackable object below `root` (itself included), each once."""
    seen: set[int] = set()
    found = []
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        stack.extend(children_of(obj).values())
    return found


def in_parts(objects: list[Any], entries: dict[int, tuple[Any, GraphVariable]],
             shapes: dict[str, Any]) -> list[tuple[Any, str]] | None:
    """What `restore_in_parts` should restore, or None when `tf.train.Checkpoint` must restore the model.

    `objects` are the model's (`_objects`); `entries` maps each model object the object graph matched to a variable
    entry (by `variable_identity`) to (object, entry); `shapes` is the checkpoint's shape map. The model is read in
    parts when everything it saves is a variable (no lookup table or other object whose state only
    `tf.train.Checkpoint` restores), every such variable (the model's own, and those of an optimizer it tracks, as a
    compiled KerasHub task does) has an entry of its shape, and the variables are large and few enough. That is the
    check `assert_existing_objects_matched` makes after `tf.train.Checkpoint` restores: every object with saved state
    was given a value.
    """
    targets = []
    for obj in objects:
        if not saves_state_of_its_own(obj):
            continue
        matched = entries.get(variable_identity(obj))
        if matched is None or not hasattr(obj, "assign"):
            return None
        key = matched[1].checkpoint_key
        if tuple(shapes.get(key, ())) != tuple(obj.shape):
            return None
        targets.append((obj, key))
    if not large_enough([tensor_bytes(variable.shape, variable.dtype) for variable, _ in targets],
                        IN_PARTS_MIN_BYTES, IN_PARTS_MIN_MEAN_BYTES):
        return None
    return targets


def restore_in_parts(prefix: str, targets: list[tuple[Any, str]], workers: int | None = None,
                     part_bytes: int = PART_BYTES) -> None:
    """Assign each variable of `targets` (variable, checkpoint key) its value at `prefix`, as `tf.train.Checkpoint`
    would, but in parts of about `part_bytes`, one `RestoreV2` each, `workers` parts at a time.

    TensorFlow's restore reads all the model's tensors in one `RestoreV2`, one after another except for tensors above
    16M elements (tensorflow/core/kernels/save_restore_tensor.cc, `kLargeShapeThreshold`); a 2 GiB model of 4096 x
    4096 kernels is read in 0.7-1.6 s that way, in 0.4 s in parts on two cores (README, "Benchmarks"). Each part's
    values are copied into the variables' buffers and dropped, so the memory in flight is a few parts, not a second
    model. `RestoreV2` is given each variable's dtype, so an entry of another dtype fails as it does in TensorFlow's
    restore.
    """
    parts: list[list[tuple[Any, str]]] = []
    size = part_bytes
    for variable, key in targets:
        if size >= part_bytes:
            parts.append([])
            size = 0
        parts[-1].append((variable, key))
        size += tensor_bytes(variable.shape, variable.dtype)

    def restore(part: list[tuple[Any, str]]) -> None:
        with tf.device("/device:CPU:0"):
            values = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[key for _, key in part],
                                          shape_and_slices=[""] * len(part),
                                          dtypes=[tf.as_dtype(variable.dtype) for variable, _ in part])
        for (variable, _), value in zip(part, values):
            variable.assign(value)

    for _ in read_ahead(restore, parts, ahead=workers or usable_cpus()):
        pass


def _untracked_state(objects: list[Any], variables: list[Any]) -> set[int]:
    """Non-trainable variables no `tf.train.Checkpoint` can save, because no trackable object holds them.

    Keras 3's `SeedGenerator` (the random state of Dropout and friends, `keras/src/random/seed_generator.py`) is a
    plain Python object, so its `seed_generator_state` variable is in `model.variables` but never in a TensorFlow
    checkpoint. It does not affect inference; both arms keep the fresh value.
    """
    reachable = {variable_identity(obj) for obj in objects}
    return {variable_identity(v) for v in variables if not v.trainable and variable_identity(v) not in reachable}


def _unsaved_variable(variable: Any) -> RestoredVariable:
    path = getattr(variable, "path", None) or variable.name
    return RestoredVariable(variable=variable, path=path, checkpoint_key="", training_name=path, trainable=False,
                            shape=tuple(variable.shape), dtype=tf.dtypes.as_dtype(variable.dtype), keras_path=path)


def restore_live(fresh: FreshModel, checkpoint: CheckpointFiles, index: CheckpointIndex) -> RestoredModel:
    """Restore the live values into `fresh.model`, strictly, from the checkpoint whose `index` the read stage opened.

    Raises:
        RestoreError: The checkpoint is name-based, or some model variable has no entry at any attachment point,
            or an entry's shape differs from its variable's, or (restoring through `tf.train.Checkpoint`) part of
            the model matched nothing in the checkpoint.
        CheckpointReadError: TensorFlow could not read an entry (a truncated or corrupt file, another dtype).
    """
    reader, graph = index.reader, index.graph
    if graph is None:
        raise RestoreError(
            f"{checkpoint.prefix} is a name-based (TF1 Saver) checkpoint with no object graph",
            hint="Save the training state with tf.train.Checkpoint, or pass --layout for a name-based layout",
        )
    variables = fresh.variables()
    objects = _objects(fresh.model)
    unsaved = _untracked_state(objects, variables)
    wanted = {variable_identity(v): v for v in variables if variable_identity(v) not in unsaved}
    candidates = [(0, "checkpoint root")] + [(c.node_id, c.local_name) for c in graph.nodes[0].children]
    best: tuple[int, str, dict[int, Any], dict, dict[int, tuple[Any, GraphVariable]]] | None = None
    for node_id, label in candidates:
        matched = match_objects(graph, node_id, fresh.model)
        entries: dict[int, tuple[Any, GraphVariable]] = {}  # every matched object with a variable entry: its first
        for entry in iter_variables(graph, node_id):
            if entry.node_id in matched:
                entries.setdefault(variable_identity(matched[entry.node_id][0]), (matched[entry.node_id][0], entry))
        found = {identity: entry for identity, (_, entry) in entries.items() if identity in wanted}
        if best is None or len(found) > len(best[2]):
            best = (node_id, label, found, matched, entries)
    assert best is not None
    node_id, label, found, matched, entries = best
    missing = [getattr(v, "path", None) or v.name for identity, v in wanted.items() if identity not in found]
    if missing:
        roots = ", ".join(c.local_name for c in graph.nodes[0].children) or "(nothing)"
        raise RestoreError(
            f"{len(missing)} of {len(variables)} model variables have no value in {checkpoint.prefix} at any "
            f"attachment point (best: {label}, where the checkpoint root holds {roots}): {name_list(missing)}",
            hint="Check that --model builds the architecture that was trained, and that training checkpointed it "
            "with tf.train.Checkpoint(model=...) or as the checkpoint's root",
        )

    shapes = reader.get_variable_to_shape_map()
    raise_for_shapes(checkpoint.prefix, [(entry.full_name or "/".join(entry.path), tuple(wanted[identity].shape),
                                          tuple(shapes.get(entry.checkpoint_key, ())))
                                         for identity, entry in found.items()])
    targets = in_parts(objects, entries, shapes)
    if targets is not None:
        with reading(checkpoint.prefix, ROLE_TRAINING):
            restore_in_parts(checkpoint.prefix, targets)
    else:
        _restore_by_checkpoint(fresh.model, checkpoint.prefix, node_id, label)
    restored = [
        _unsaved_variable(variable) if variable_identity(variable) in unsaved else RestoredVariable(
            variable=variable,
            path="/".join(found[variable_identity(variable)].path),
            checkpoint_key=found[variable_identity(variable)].checkpoint_key,
            training_name=found[variable_identity(variable)].full_name,
            trainable=bool(variable.trainable),
            shape=tuple(variable.shape),
            dtype=tf.dtypes.as_dtype(variable.dtype),
            keras_path=getattr(variable, "path", "") if not isinstance(variable, tf.Variable) else "",
        )
        for variable in variables
    ]
    return RestoredModel(fresh, checkpoint, label, restored, reader, matched, node_id)


def _restore_by_checkpoint(model: Any, prefix: str, node_id: int, label: str) -> None:
    """Restore `model`, attached at node `node_id` (named `label`), through `tf.train.Checkpoint`, strictly."""
    root = tf.train.Checkpoint(root=model) if node_id == 0 else tf.train.Checkpoint(**{label: model})
    with reading(prefix, ROLE_TRAINING):
        status = root.read(prefix)
    status.expect_partial()  # optimizer state, step counters and other objects the model does not own: on purpose
    try:
        # Every object of the model found its checkpoint entry, so no variable kept its initializer.
        status.assert_existing_objects_matched()
    except AssertionError as error:
        raise RestoreError(
            f"Restoring {prefix} left part of the model unmatched ({str(error).splitlines()[0]})",
            hint="The model and checkpoint disagree on structure; pass the --model that wrote this checkpoint",
        ) from error
