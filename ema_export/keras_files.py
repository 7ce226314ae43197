"""Keras's own files as training sources: `.weights.h5` (`save_weights`) and `.keras` (`save`, which zips one).

Both hold an HDF5 tree written by Keras's saving library: each layer's variables at `<path>/vars/<i>` (paths named
after layer classes, `layers/dense_1`, so they do not depend on auto-generated layer names), and a compiled model's
optimizer state at `optimizer/vars/<i>`, positionally, with no variable names. A `.keras` archive also keeps the
model and optimizer configuration in `config.json`, and the version of the Keras that wrote it in `metadata.json`.

This module reads the files and knows no model family; restoring a model from one is
`ema_export.restore_by_keras_file`, through the family's `KerasWriter`.
"""

from __future__ import annotations

import contextlib
import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import tensorflow as tf

from ema_export.errors import RestoreError

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


def as_array(dataset: h5py.Dataset) -> np.ndarray:
    value = np.asarray(dataset[()])
    if dataset.attrs.get("dtype") == "bfloat16":
        value = value.view(tf.bfloat16.as_numpy_dtype)
    return value


def read_value(path: str, key: str) -> np.ndarray:
    """Read one dataset; opened per call so shadows are only read when folding needs them."""
    with open_weights(path) as weights:
        return as_array(weights[key])


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


DEFAULT_KERAS_MAJOR = "3"
"""The Keras taken to have written a file that records no version, when no model says otherwise."""


def saved_keras_major(path: str) -> str | None:
    """The major of the Keras that wrote a file ("2" for tf-keras, "3"), from a `.keras` archive's metadata.json:
    the layout of values is the same for both, the config (class names) and the saving library are not. None when
    the file records none: every `.weights.h5`, or an archive whose metadata.json is missing or unreadable."""
    if not path.endswith(".keras"):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read("metadata.json"))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
        return None
    return str(metadata.get("keras_version", "")).split(".")[0] or None
