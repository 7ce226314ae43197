"""Keras's own files as training sources: `.weights.h5` (`save_weights`) and `.keras` (`save`, which zips one).

Both hold an HDF5 tree written by Keras's saving library: each layer's variables at `<path>/vars/<i>` (paths named
after layer classes, `layers/dense_1`, so they do not depend on auto-generated layer names), and a compiled model's
optimizer state at `optimizer/vars/<i>`, positionally, with no variable names. A `.keras` archive also keeps the
model and optimizer configuration in `config.json`.

Which variable sits at which path is learnt from Keras itself, by running its saving walk over the fresh model with
a store that records instead of writing; values are then loaded by Keras's loader and every one is checked against
its entry in the file, as strictly as `restore.restore_live` checks a TensorFlow checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import tensorflow as tf

from ema_export.checkpoint_graph import variable_identity
from ema_export.errors import RestoreError, name_list
from ema_export.fresh_model import FreshModel
from ema_export.locate import CheckpointFiles
from ema_export.private_apis import keras_saving_lib, tf_keras_saving_lib
from ema_export.restored import RestoredModel, RestoredVariable, model_variables, raise_for_shapes

WEIGHTS_MEMBER = "model.weights.h5"
"""The HDF5 file inside a `.keras` archive."""
CONFIG_MEMBER = "config.json"
OPTIMIZER_GROUP = "optimizer/vars"
"""Where Keras stores a compiled model's optimizer variables, in `optimizer.variables` order."""


@dataclass(frozen=True)
class StoredValue:
    """One dataset of a Keras weights file."""

    key: str
    shape: tuple[int, ...]
    dtype: tf.DType


@contextlib.contextmanager
def open_weights(path: str) -> Iterator[h5py.File]:
    """The HDF5 weights of a `.weights.h5` file, or of the `model.weights.h5` inside a `.keras` archive."""
    if not path.endswith(".keras"):
        with h5py.File(path, "r") as weights:
            yield weights
        return
    with zipfile.ZipFile(path) as archive:
        if WEIGHTS_MEMBER not in archive.namelist():
            raise RestoreError(
                f"{path} has no {WEIGHTS_MEMBER}: expected a .keras archive written by Keras 3's model.save()",
                hint=f"Re-save it with model.save('model.keras'). Received members: {', '.join(archive.namelist())}",
            )
        with archive.open(WEIGHTS_MEMBER) as member, h5py.File(member, "r") as weights:
            yield weights


def _dtype(dataset: h5py.Dataset) -> tf.DType:
    if dataset.attrs.get("dtype") == "bfloat16":  # Keras stores bfloat16 as raw 16-bit data with this marker
        return tf.bfloat16
    return tf.dtypes.as_dtype(dataset.dtype)


def _as_array(dataset: h5py.Dataset) -> np.ndarray:
    value = np.asarray(dataset[()])
    if dataset.attrs.get("dtype") == "bfloat16":
        value = value.view(tf.bfloat16.as_numpy_dtype)
    return value


def read_value(path: str, key: str) -> np.ndarray:
    """Read one dataset; opened per call so shadows are only read when folding needs them."""
    with open_weights(path) as weights:
        return _as_array(weights[key])


INNER_OPTIMIZER_GROUP = "optimizer/inner_optimizer/vars"
"""Where a `LossScaleOptimizer` (what `compile()` wraps the optimizer in under `mixed_float16`) keeps the variables of
the optimizer it wraps, averages included; its own `optimizer/vars` add the loss-scale state."""


def optimizer_values(path: str) -> list[StoredValue]:
    """The optimizer's stored variables in their numeric order (`optimizer/vars/0`, `1`, ..., not `1`, `10`, `2`);
    for a loss-scaled (mixed precision) optimizer, those of the optimizer inside it."""
    with open_weights(path) as weights:
        found = [name for name in (INNER_OPTIMIZER_GROUP, OPTIMIZER_GROUP) if name in weights]
        if not found:
            return []
        group = weights[found[0]]
        return [StoredValue(f"{found[0]}/{name}", tuple(group[name].shape), _dtype(group[name]))
                for name in sorted(group, key=int)]


def trained_precision(path: str) -> str | None:
    """The mixed-precision policy (`mixed_float16`, `mixed_bfloat16`) a `.keras` file's layers were built with."""
    if not path.endswith(".keras"):
        return None
    with zipfile.ZipFile(path) as archive:
        try:
            text = archive.read(CONFIG_MEMBER).decode()
        except KeyError:
            return None
    match = re.search(r'"name":\s*"(mixed_\w+)"', text)
    return match.group(1) if match else None


def optimizer_config(path: str) -> dict[str, Any] | None:
    """The serialized optimizer (`{"class_name", "config", ...}`) a `.keras` archive was compiled with, if any."""
    if not path.endswith(".keras"):
        return None
    with zipfile.ZipFile(path) as archive:
        try:
            config = json.loads(archive.read(CONFIG_MEMBER))
        except (KeyError, ValueError):
            return None
    optimizer = (config.get("compile_config") or {}).get("optimizer")
    return optimizer if isinstance(optimizer, dict) else None


def _recording_store() -> Any:
    store_class: Any = keras_saving_lib().H5IOStore

    class RecordingStore(store_class):
        """Keras's own weights store, made to note where each variable would be written instead of writing it."""

        def __init__(self) -> None:
            super().__init__(io.BytesIO(), mode="w")
            self.paths: dict[int, str] = {}
            self._current = ""

        def make(self, path: str, metadata: dict | None = None) -> RecordingStore:
            self._current = path
            return self

        def __setitem__(self, key: str, value: Any) -> None:
            self.paths.setdefault(variable_identity(value), "/".join(filter(None, (self._current, "vars", key))))

    return RecordingStore()


def weight_paths(model: Any) -> dict[int, str]:
    """Where Keras's saving walk stores each of the model's variables (`layers/dense/vars/0`), by identity.

    This is Keras's own traversal (`saving_lib._save_state`, what `save_weights` runs), so the paths are exactly
    those of any file saved from this architecture. Layers that save a transformed value (LoRA kernels merged on
    save) have no path; Keras's loader still restores them. The optimizer is skipped: it is not part of the model.
    """
    saving_lib = keras_saving_lib()

    store = _recording_store()
    skipped = {id(model.optimizer)} if getattr(model, "optimizer", None) is not None else set()
    try:
        saving_lib._save_state(model, store, None, "", skipped)
    finally:
        store.close()
    return store.paths


TF_KERAS_MAJOR = "2"
"""`keras_version` in a `.keras` archive's metadata.json: tf-keras (Keras 2) writes 2.x, Keras 3 writes 3.x."""


def saved_by_tf_keras(path: str) -> bool:
    """Whether a `.keras` archive was written by tf-keras: its layout of values is Keras 3's, its config is not."""
    if not path.endswith(".keras"):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read("metadata.json"))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
        return False
    return str(metadata.get("keras_version", "")).split(".")[0] == TF_KERAS_MAJOR


def _tf_keras_weight_paths(model: Any) -> dict[int, str]:
    """Where tf-keras's saving walk (`tf_keras/src/saving/saving_lib.py` `_save_state`) stores each variable.

    tf-keras layers hand the store values, not variables (`Layer.save_own_variables` stores `v.numpy()`), so each
    variable is first filled with its own number, the walk records which number lands at which path, and the values
    are put back. The restore loads every value from the file right after, and checks it.
    """
    saving_lib = tf_keras_saving_lib()

    variables = model_variables(model)
    originals = [variable.numpy() for variable in variables]
    by_number: dict[int, int] = {}
    paths: dict[int, str] = {}

    class RecordingStore(dict):
        def __init__(self, current: str) -> None:
            super().__init__()
            self.current = current

        def __setitem__(self, key: str, value: Any) -> None:
            array = np.asarray(value)
            if array.size and int(array.flat[0]) in by_number:
                paths.setdefault(by_number[int(array.flat[0])], f"{self.current}/vars/{key}".lstrip("/"))

    class Walk:
        def make(self, path: str) -> RecordingStore:
            return RecordingStore(path)

    try:
        for number, variable in enumerate(variables, start=1):
            if variable.dtype.is_floating or variable.dtype.is_integer:
                variable.assign(tf.fill(tf.shape(variable), tf.cast(number, variable.dtype)))
                by_number[number] = variable_identity(variable)
        skipped = {id(model.optimizer)} if getattr(model, "optimizer", None) is not None else set()
        saving_lib._save_state(model, Walk(), None, "", skipped)
    finally:
        for variable, value in zip(variables, originals):
            variable.assign(value)
    return paths


def _load_tf_keras(model: Any, path: str) -> None:
    """tf-keras's own loader (`saving_lib.load_weights_only`), never into the fresh model's optimizer."""
    saving_lib = tf_keras_saving_lib()

    skipped = {id(model.optimizer)} if getattr(model, "optimizer", None) is not None else set()
    archive = zipfile.ZipFile(path) if path.endswith(".keras") else None
    store = (saving_lib.H5IOStore(WEIGHTS_MEMBER, archive=archive, mode="r") if archive is not None
             else saving_lib.H5IOStore(path, mode="r"))
    try:
        saving_lib._load_state(model, weights_store=store, assets_store=None, inner_path="",
                               visited_trackables=skipped)
    finally:
        store.close()
        if archive is not None:
            archive.close()


def _trackable_paths(model: Any) -> dict[int, str]:
    """The object-graph path of each variable (`layer_with_weights-0/kernel`), by identity: where the EMA copy of a
    tf-keras model hangs the same variable (`assemble` follows these paths)."""
    from ema_export.checkpoint_graph import children_of

    paths: dict[int, str] = {}
    seen = {id(model)}
    queue = [(model, "")]
    while queue:
        obj, prefix = queue.pop(0)
        for name, child in children_of(obj).items():
            path = f"{prefix}/{name}".lstrip("/")
            if isinstance(child, tf.Variable):
                paths.setdefault(id(child), path)
            elif id(child) not in seen:
                seen.add(id(child))
                queue.append((child, path))
    return paths


def _load(model: Any, path: str) -> None:
    """Load the model's weights with Keras's loader, never the fresh model's optimizer (it is not exported)."""
    saving_lib = keras_saving_lib()

    optimizer = getattr(model, "optimizer", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mismatches are errors below; Keras's own warnings would only repeat them
        saving_lib.load_weights_only(model, path, objects_to_skip=[optimizer] if optimizer is not None else None)


def _training_name(weights: h5py.File, key: str, variable: Any) -> str:
    """`dense/kernel`: the layer name Keras recorded beside the values (Keras 3.10+), and the variable's name."""
    recorded = weights[key].parent.attrs.get("name")
    return f"{recorded}/{variable.name}" if recorded else getattr(variable, "path", variable.name)


def _tf_keras_variable(variable: Any, key: str, graph_paths: dict[int, str]) -> RestoredVariable:
    name = variable.name.split(":")[0]
    return RestoredVariable(variable=variable, path=graph_paths.get(id(variable), name), checkpoint_key=key,
                            training_name=name, trainable=bool(variable.trainable), shape=tuple(variable.shape),
                            dtype=tf.dtypes.as_dtype(variable.dtype))


def restore_from_keras_file(fresh: FreshModel, checkpoint: CheckpointFiles) -> RestoredModel:
    """Restore the live values of a Keras model from a `.keras` or `.weights.h5` file, strictly.

    A file saved by tf-keras is loaded into a tf-keras model by tf-keras's own loader: its values sit at the same
    paths as Keras 3's (`layers/dense/vars/0`, `optimizer/vars/<i>`).

    Raises:
        RestoreError: The model is not a Keras model of the kind that saved the file, Keras cannot load the file
            into it, or some variable's value differs from its entry in the file (or the file has layers the model
            lacks).
    """
    path = checkpoint.prefix
    by_tf_keras = saved_by_tf_keras(path)
    if not (fresh.is_tf_keras if by_tf_keras else fresh.is_keras):
        saver, wanted = ("tf-keras (Keras 2)", "a tf-keras model") if by_tf_keras else ("Keras 3", "a Keras 3 model")
        raise RestoreError(
            f"{path} is a Keras file saved by {saver}, but the model from {fresh.source} is a "
            f"{type(fresh.model).__name__}: only {wanted} can load it",
            hint="Omit --model to rebuild the architecture saved in the file, or pass a --model factory that builds "
            f"{wanted} of the architecture that was trained",
        )
    model = fresh.model
    paths = _tf_keras_weight_paths(model) if fresh.is_tf_keras else weight_paths(model)
    graph_paths = _trackable_paths(model) if fresh.is_tf_keras else {}
    with open_weights(path) as weights:
        raise_for_shapes(path, [(key, tuple(variable.shape), tuple(weights[key].shape))
                                for variable in model_variables(model)
                                for key in [paths.get(variable_identity(variable), "")] if key in weights])
    try:
        (_load_tf_keras if fresh.is_tf_keras else _load)(model, path)
    except Exception as error:  # Keras raises ValueError, KeyError, OSError ... for files that do not fit
        raise RestoreError(
            f"Keras could not load {path} into the model from {fresh.source}: {error}",
            hint="Pass the --model that was trained (same layers, same order)",
        ) from error

    restored: list[RestoredVariable] = []
    differing: list[str] = []
    with open_weights(path) as weights:
        stored = set()
        weights.visititems(lambda name, item: stored.add(name) if isinstance(item, h5py.Dataset) else None)
        for variable in model_variables(model):
            key = paths.get(variable_identity(variable), "")
            if key:
                expected = _as_array(weights[key]) if key in weights else None
                if expected is None or not np.array_equal(np.asarray(variable.numpy()), expected,
                                                          equal_nan=expected.dtype.kind == "f"):
                    differing.append(key)
            restored.append(_tf_keras_variable(variable, key, graph_paths) if fresh.is_tf_keras else RestoredVariable(
                variable=variable,
                path=key or variable.path,
                checkpoint_key=key,
                training_name=_training_name(weights, key, variable) if key and key in weights else variable.path,
                trainable=bool(variable.trainable),
                shape=tuple(variable.shape),
                dtype=tf.dtypes.as_dtype(variable.dtype),
                keras_path=variable.path,
            ))
        # Entries nothing loads mean layers the model lacks; unless some layer saves transformed values, which
        # then have entries of their own that no variable maps to.
        unmapped = any(not item.checkpoint_key for item in restored)
        # tf-keras also saves a compiled model's metrics; a rebuilt model has none, and they are not served.
        state = ("optimizer/", "metrics/") if fresh.is_tf_keras else ("optimizer/",)
        extra = [] if unmapped else sorted(k for k in stored - set(paths.values()) if not k.startswith(state))
    if differing or extra:
        problems = ([f"{len(differing)} variables differ from their entries: {name_list(differing)}"] if differing
                    else []) + ([f"{len(extra)} entries belong to no model variable: {name_list(extra)}"] if extra
                                else [])
        raise RestoreError(
            f"After loading {path}, the model from {fresh.source} does not reproduce the file:",
            hint="The model and the file disagree on structure; pass the --model that was trained",
            problems=problems,
        )
    member = f"{WEIGHTS_MEMBER} in the .keras archive" if path.endswith(".keras") else "the .weights.h5 file"
    return RestoredModel(fresh, checkpoint, f"Keras file ({member})", restored, None)
