"""The Keras-file strategy of the restore stage: live values from a `.keras` or `.weights.h5` file, strictly.

The Keras that wrote the file (its `KerasWriter`, from the file's metadata) is chosen once; only a model of that
Keras's family can load it. Which variable sits at which path is learnt from that Keras itself, by running its saving
walk over the fresh model with a store that records instead of writing; values are then loaded by its loader and
every one is checked against its entry in the file, as strictly as `restore_by_graph` checks a TensorFlow checkpoint.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from ema_export.adapters import KerasWriter, keras_writer_of
from ema_export.checkpoint_graph import variable_identity
from ema_export.errors import RestoreError, name_list
from ema_export.fresh_model import FreshModel
from ema_export.keras_files import WEIGHTS_MEMBER, as_array, open_weights
from ema_export.locate import CheckpointFiles
from ema_export.restored import RestoredModel, RestoredVariable, raise_for_shapes


def _writer_for(fresh: FreshModel, path: str) -> KerasWriter:
    """The writer of the file, refused unless it is the one of the model's family."""
    writer = keras_writer_of(path, fresh.adapter.keras_writer)
    if fresh.adapter.keras_writer is not writer:
        raise RestoreError(
            f"{path} is a Keras file saved by {writer.label}, but the model from {fresh.source} is a "
            f"{type(fresh.model).__name__}: only {writer.models} can load it",
            hint="Omit --model to rebuild the architecture saved in the file, or pass a --model factory that builds "
            f"{writer.models} of the architecture that was trained",
        )
    return writer


def _load(writer: KerasWriter, fresh: FreshModel, path: str) -> None:
    try:
        writer.load(fresh.model, path)
    except Exception as error:  # Keras raises ValueError, KeyError, OSError ... for files that do not fit
        raise RestoreError(
            f"Keras could not load {path} into the model from {fresh.source}: {error}",
            hint="Pass the --model that was trained (same layers, same order)",
        ) from error


def _differs(variable: Any, weights: h5py.File, key: str) -> bool:
    expected = as_array(weights[key]) if key in weights else None
    return expected is None or not np.array_equal(np.asarray(variable.numpy()), expected,
                                                  equal_nan=expected.dtype.kind == "f")


def restore_from_keras_file(fresh: FreshModel, checkpoint: CheckpointFiles) -> RestoredModel:
    """Restore the live values of a Keras model from a `.keras` or `.weights.h5` file, strictly.

    Raises:
        RestoreError: The model is not a Keras model of the kind that saved the file, Keras cannot load the file
            into it, or some variable's value differs from its entry in the file (or the file has layers the model
            lacks).
    """
    path = checkpoint.prefix
    writer = _writer_for(fresh, path)
    model, variables = fresh.model, fresh.variables()
    paths = writer.weight_paths(model, variables)
    with open_weights(path) as weights:
        raise_for_shapes(path, [(key, tuple(variable.shape), tuple(weights[key].shape))
                                for variable in variables
                                for key in [paths.get(variable_identity(variable), "")] if key in weights])
    _load(writer, fresh, path)

    name = writer.namer(model)
    restored: list[RestoredVariable] = []
    differing: list[str] = []
    with open_weights(path) as weights:
        stored: set[str] = set()
        weights.visititems(lambda key, item: stored.add(key) if isinstance(item, h5py.Dataset) else None)
        for variable in fresh.variables():
            key = paths.get(variable_identity(variable), "")
            if key and _differs(variable, weights, key):
                differing.append(key)
            restored.append(name(variable, key, weights))
        # Entries nothing loads mean layers the model lacks; unless some layer saves transformed values, which
        # then have entries of their own that no variable maps to.
        unmapped = any(not item.checkpoint_key for item in restored)
        extra = [] if unmapped else sorted(key for key in stored - set(paths.values())
                                           if not key.startswith(writer.skipped_state))
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
