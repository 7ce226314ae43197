"""The object-graph strategy of the restore stage: live values through `tf.train.Checkpoint`, strictly.

The model may hang at the checkpoint's root (`tf.train.Checkpoint(weights=W, biases=b)` with a module that has
`weights` and `biases`) or under a named child (`tf.train.Checkpoint(model=model, optimizer=...)`). The attachment
point is chosen by lining the object graph up with the model before anything is read, then values are restored by
`tf.train.Checkpoint` through the object graph, which must match every object of the model: no variable may silently
keep its initializer.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from ema_export.checkpoint_graph import children_of, iter_variables, match_objects, variable_identity
from ema_export.errors import RestoreError, name_list
from ema_export.fresh_model import FreshModel
from ema_export.locate import CheckpointFiles
from ema_export.read import ROLE_TRAINING, CheckpointIndex, reading
from ema_export.restored import RestoredModel, RestoredVariable, raise_for_shapes


def _untracked_state(model: Any, variables: list[Any]) -> set[int]:
    """Non-trainable variables no `tf.train.Checkpoint` can save, because no trackable object holds them.

    Keras 3's `SeedGenerator` (the random state of Dropout and friends, `keras/src/random/seed_generator.py`) is a
    plain Python object, so its `seed_generator_state` variable is in `model.variables` but never in a TensorFlow
    checkpoint. It does not affect inference; both arms keep the fresh value.
    """
    reachable: set[int] = set()
    seen: set[int] = set()
    stack = [model]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        reachable.add(variable_identity(obj))
        stack.extend(children_of(obj).values())
    return {variable_identity(v) for v in variables if not v.trainable and variable_identity(v) not in reachable}


def _unsaved_variable(variable: Any) -> RestoredVariable:
    path = getattr(variable, "path", None) or variable.name
    return RestoredVariable(variable=variable, path=path, checkpoint_key="", training_name=path, trainable=False,
                            shape=tuple(variable.shape), dtype=tf.dtypes.as_dtype(variable.dtype), keras_path=path)


def restore_live(fresh: FreshModel, checkpoint: CheckpointFiles, index: CheckpointIndex) -> RestoredModel:
    """Restore the live values into `fresh.model`, strictly, from the checkpoint whose `index` the read stage opened.

    Raises:
        RestoreError: The checkpoint is name-based, or some model variable has no entry at any attachment point,
            or a value read back differs from its checkpoint entry.
    """
    reader, graph = index.reader, index.graph
    if graph is None:
        raise RestoreError(
            f"{checkpoint.prefix} is a name-based (TF1 Saver) checkpoint with no object graph",
            hint="Save the training state with tf.train.Checkpoint, or pass --layout for a name-based layout",
        )
    variables = fresh.variables()
    unsaved = _untracked_state(fresh.model, variables)
    wanted = {variable_identity(v): v for v in variables if variable_identity(v) not in unsaved}
    candidates = [(0, "checkpoint root")] + [(c.node_id, c.local_name) for c in graph.nodes[0].children]
    best: tuple[int, str, dict[int, Any], dict] | None = None
    for node_id, label in candidates:
        matched = match_objects(graph, node_id, fresh.model)
        found = {}
        for entry in iter_variables(graph, node_id):
            if entry.node_id in matched:
                identity = variable_identity(matched[entry.node_id][0])
                if identity in wanted and identity not in found:
                    found[identity] = entry
        if best is None or len(found) > len(best[2]):
            best = (node_id, label, found, matched)
    assert best is not None
    node_id, label, found, matched = best
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
    root = tf.train.Checkpoint(root=fresh.model) if node_id == 0 else tf.train.Checkpoint(**{label: fresh.model})
    with reading(checkpoint.prefix, ROLE_TRAINING):
        status = root.read(checkpoint.prefix)
    status.expect_partial()  # optimizer state, step counters and other objects the model does not own: on purpose
    try:
        # Every object of the model found its checkpoint entry, so no variable kept its initializer.
        status.assert_existing_objects_matched()
    except AssertionError as error:
        raise RestoreError(
            f"Restoring {checkpoint.prefix} left part of the model unmatched ({str(error).splitlines()[0]})",
            hint="The model and checkpoint disagree on structure; pass the --model that wrote this checkpoint",
        ) from error
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
