"""Restore live values from a name-based checkpoint (TF1 `tf.compat.v1.train.Saver`), strictly.

A Saver checkpoint has no object graph: entries are keyed by variable names (`dense/kernel`,
`weights`). Each model variable is looked up by its own name (`v.name` without `:0`, or its Keras path); when the
model wraps the trained variables in an extra scope (`classifier/dense/kernel` for a saved `dense/kernel`), a unique
match on whole trailing name components is accepted. A name that fits several entries is an error listing them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from ema_export.checkpoint_graph import children_of, variable_identity
from ema_export.errors import RestoreError, name_list
from ema_export.fresh_model import FreshModel
from ema_export.locate import CheckpointFiles
from ema_export.read import CheckpointIndex
from ema_export.restored import RestoredModel, RestoredVariable


def variable_names(variable: Any) -> list[str]:
    """Names a variable may have been saved under, most specific first."""
    names = []
    path = getattr(variable, "path", None) if not isinstance(variable, tf.Variable) else None
    if path:
        names.append(path)
    inner = getattr(variable, "value", variable)
    name = getattr(inner if isinstance(inner, tf.Variable) else variable, "name", "")
    if name:
        names.append(name.rsplit(":", 1)[0])
    return list(dict.fromkeys(names))


def _trailing_match(name: str, keys: list[str]) -> list[str]:
    """Keys equal to `name` with leading scopes removed, or that extend `name` by leading scopes."""
    return [key for key in keys if name.endswith("/" + key) or key.endswith("/" + name)]


def find_entry(variable: Any, keys: list[str]) -> tuple[str | None, list[str]]:
    """The checkpoint key holding `variable`, or (None, candidates) when there is none or several."""
    names = variable_names(variable)
    for name in names:
        if name in keys:
            return name, []
    for name in names:
        candidates = _trailing_match(name, keys)
        if len(candidates) == 1:
            return candidates[0], []
        if candidates:
            return None, candidates
    return None, []


def attribute_paths(model: Any) -> dict[int, str]:
    """Where each variable hangs in the model, by attribute and container names (`linear/kernel` for
    `self.linear.kernel`), breadth first: the path the manifest names a variable by, whatever the variable's own
    `name=` says (a `tf.Variable(name="linear/kernel")` held by the attribute `kernel` hangs at `kernel`)."""
    paths: dict[int, str] = {}
    seen = {id(model)}
    queue: list[tuple[Any, str]] = [(model, "")]
    while queue:
        obj, path = queue.pop(0)
        for name, child in children_of(obj).items():
            child_path = f"{path}/{name}".lstrip("/")
            if isinstance(child, tf.Variable) or hasattr(child, "value") and isinstance(child.value, tf.Variable):
                paths.setdefault(variable_identity(child), child_path)
            if id(child) not in seen:
                seen.add(id(child))
                queue.append((child, child_path))
    return paths


def restore_by_name(fresh: FreshModel, checkpoint: CheckpointFiles, index: CheckpointIndex) -> RestoredModel:
    """Assign every model variable the value saved under its name, from the checkpoint whose `index` the read stage
    opened.

    Raises:
        RestoreError: Listing every variable with no entry, several candidate entries, or a different shape.
    """
    reader, shapes = index.reader, index.shapes
    keys = sorted(shapes)
    problems: list[str] = []
    restored: list[RestoredVariable] = []
    claimed: dict[str, str] = {}
    attributes = attribute_paths(fresh.model)
    for variable in fresh.variables():
        label = variable_names(variable)[0]
        key, candidates = find_entry(variable, keys)
        if key is None:
            problems.append(f"{label}: " + (f"several entries fit ({name_list(candidates)})" if candidates
                                            else "no entry of that name"))
            continue
        if key in claimed:
            problems.append(f"{label} and {claimed[key]} both map to entry {key!r}")
            continue
        claimed[key] = label
        if tuple(shapes[key]) != tuple(variable.shape):
            problems.append(f"{label}: model shape {list(variable.shape)}, entry {key!r} has {shapes[key]}")
            continue
        variable.assign(reader.get_tensor(key))
        restored.append(RestoredVariable(
            variable=variable, path=attributes.get(variable_identity(variable), key), checkpoint_key=key,
            training_name=key, trainable=bool(variable.trainable),
            shape=tuple(variable.shape), dtype=tf.dtypes.as_dtype(variable.dtype),
            keras_path=getattr(variable, "path", "") if not isinstance(variable, tf.Variable) else "",
        ))
    if problems:
        raise RestoreError(
            f"{checkpoint.prefix} is a name-based (TF1 Saver) checkpoint, and {len(problems)} model variables "
            "cannot be restored by name:",
            hint="Name the model's variables as in training (tf.Variable(name=...), layer names), or pass the "
            "--model that wrote this checkpoint",
            problems=problems,
        )
    for item in restored:
        if not np.array_equal(np.asarray(item.variable.numpy()), reader.get_tensor(item.checkpoint_key)):
            raise RestoreError(f"Variable {item.name} differs from its checkpoint entry after restoring",
                               hint="This is a bug; please report it")
    identities = {variable_identity(item.variable) for item in restored}
    assert len(identities) == len(restored)
    return RestoredModel(fresh, checkpoint, "variable names (name-based checkpoint)", restored, reader)
