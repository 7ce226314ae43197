"""Stage 3, restore: give every variable of the fresh model its live value from the training checkpoint.

This module only chooses the strategy the checkpoint supports: its object graph (`restore_by_graph`), its names
(`restore_by_name`, for TF1 `Saver` checkpoints), or Keras's own `.keras` / `.weights.h5` file
(`restore_by_keras_file`). What they return is defined in `restored`.
"""

from __future__ import annotations

from ema_export.fresh_model import FreshModel
from ema_export.locate import CheckpointFiles
from ema_export.read import CheckpointIndex
from ema_export.restore_by_graph import restore_live
from ema_export.restore_by_keras_file import restore_from_keras_file
from ema_export.restore_by_name import restore_by_name
from ema_export.restored import RestoredModel, RestoredVariable

__all__ = ["RestoredModel", "RestoredVariable", "restore", "restore_live"]


def restore(fresh: FreshModel, checkpoint: CheckpointFiles, index: CheckpointIndex | None) -> RestoredModel:
    """Restore live values by whatever the checkpoint supports: its object graph, its names (`restore_by_name`), or
    Keras's own `.keras` / `.weights.h5` file (`restore_by_keras_file`).

    `index` is the training checkpoint's, as the read stage opened it (`CheckpointIndexes.training`); None for a Keras
    file, which is not a TensorFlow checkpoint.
    """
    if index is None:
        return restore_from_keras_file(fresh, checkpoint)
    if index.graph is None:
        return restore_by_name(fresh, checkpoint, index)
    return restore_live(fresh, checkpoint, index)
