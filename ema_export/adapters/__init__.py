"""One adapter per model family; the registry below is the only place that lists them.

Order matters: the first adapter that owns a model wins, so the Keras families (whose models are also `tf.Module`s
in tf-keras's case) come before the plain `tf.Module`. A new family is one module here and one line in `ADAPTERS`;
a Keras family's module also defines the `KerasWriter` that reads the files its Keras writes.
"""

from __future__ import annotations

from typing import Any

from ema_export.adapters.base import ModelAdapter
from ema_export.adapters.keras3 import Keras3Adapter
from ema_export.adapters.keras_writer import KerasWriter
from ema_export.adapters.module import ModuleAdapter
from ema_export.adapters.tf_keras import TfKerasAdapter
from ema_export.keras_files import DEFAULT_KERAS_MAJOR, saved_keras_major

ADAPTERS: tuple[ModelAdapter, ...] = (Keras3Adapter(), TfKerasAdapter(), ModuleAdapter())


def adapter_for(model: Any) -> ModelAdapter | None:
    """The adapter of the first family that owns `model`; None for an object no family serves."""
    return next((adapter for adapter in ADAPTERS if adapter.owns(model)), None)


def keras_writer_of(path: str, unrecorded: KerasWriter | None = None) -> KerasWriter:
    """The Keras that wrote a `.keras` / `.weights.h5` file, by the version its metadata.json records.

    A file that records none (every `.weights.h5`: both Keras 3's and tf-keras's `save_weights` write the same HDF5
    tree and no version) is taken as `unrecorded`'s, the writer of the model it is loaded into, when given; otherwise,
    and for a version no family writes, as Keras 3's.
    """
    writers = {writer.keras_major: writer for writer in (adapter.keras_writer for adapter in ADAPTERS) if writer}
    recorded = saved_keras_major(path)
    if recorded is None and unrecorded is not None:
        return unrecorded
    return writers.get(recorded or DEFAULT_KERAS_MAJOR, writers[DEFAULT_KERAS_MAJOR])


__all__ = ["ADAPTERS", "KerasWriter", "ModelAdapter", "adapter_for", "keras_writer_of"]
