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


def _refuse_unheld(path: str, writer: KerasWriter, unheld: list[str], computed: list[str]) -> RestoreError:
    """The file does not hold the values of some trainable variables: their averages cannot be folded."""
    cause = (f"{writer.label} saved {name_list(computed, 2)} as values computed on save" if computed
             else "no entry of the file holds them")
    if computed and any("lora_" in name.rsplit("/", 1)[-1] for name in unheld):
        cause = f"{writer.label} saves LoRA layers with the adapters merged into the weights they adapt"
    return RestoreError(
        f"{path} does not hold {len(unheld)} trainable variables ({name_list(unheld, 2)}): {cause}, "
        "so their averages cannot be folded",
        hint="Export a tf.train.Checkpoint(model=..., optimizer=...) saved during training instead",
    )


def restore_from_keras_file(fresh: FreshModel, checkpoint: CheckpointFiles) -> RestoredModel:
    """Restore the live values of a Keras model from a `.keras` or `.weights.h5` file, strictly.

    Every trainable variable must have an entry of its own holding its value: a layer that saves something computed
    in its place (Keras's LoRA layers merge the adapters into the kernel, `Dense.save_own_variables`) leaves a file
    whose averaged variables have no live value in it, and folding their averages would serve a wrong `serve_ema`.

    Raises:
        RestoreError: The model is not a Keras model of the kind that saved the file, Keras cannot load the file
            into it, some trainable variable has no entry of its own, or some variable's value differs from its
            entry in the file (or the file has layers the model lacks).
    """
    path = checkpoint.prefix
    writer = _writer_for(fresh, path)
    model, variables = fresh.model, fresh.variables()
    saved = writer.weight_paths(model, variables)
    paths = saved.paths
    computed = [entry for entry in saved.computed if not entry.startswith(writer.skipped_state)]
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
        extra = sorted(key for key in stored - set(paths.values()) - set(computed)
                       if not key.startswith(writer.skipped_state))
    unheld = [item.name for item in restored if item.trainable and not item.checkpoint_key]
    if unheld:
        raise _refuse_unheld(path, writer, unheld, computed)
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
