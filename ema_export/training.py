"""Training side: save live weights and their EMA shadows in lockstep, in the layout the exporter reads.

The classic way to lose a run is to save the live and the EMA checkpoint with separate calls, at different
frequencies or with a crash in between, so that "latest" of one is not "latest" of the other. Here both halves of a
step are saved by one call under one number, `CKPT_DIR/ckpt-N` and `CKPT_DIR/ema/ckpt-N`, each also recording the
step, and the exporter pairs them by that number. The EMA half is written first: a crash between the two saves
leaves at most an EMA half without its training half, which the exporter never pairs, while the newest complete
pair stays what CKPT_DIR's `checkpoint` file and the exporter see.

    checkpointer = EmaCheckpointer("runs/7", model, decay=0.999)
    for step, (x, y) in enumerate(dataset, 1):
        train_step(x, y)              # optimizer.apply_gradients(...)
        checkpointer.update()         # ema.apply(...) after the weights moved
        if step % 1000 == 0:
            checkpointer.save(step)

`EmaCheckpoint` does the same from Keras `fit()`, for a `tf.train.ExponentialMovingAverage` it keeps or for the
optimizer's own `use_ema=True` averages, saving before `fit()` overwrites the weights with the averages.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf

from ema_export.contracts import EMA_CHECKPOINT_SUBDIR
from ema_export.errors import EmaExportError
from ema_export.private_apis import optimizer_averages

CHECKPOINT_NAME = "ckpt"


class TrainingSetupError(EmaExportError):
    """The training-side helper was given variables it cannot checkpoint unambiguously."""


def _tf_variable(variable: Any) -> tf.Variable:
    """The `tf.Variable` behind a Keras 3 variable (what `tf.train.ExponentialMovingAverage` accepts)."""
    return variable if isinstance(variable, tf.Variable) else variable.value


def shadow_key(variable: Any) -> str:
    """The key a variable's shadow is saved under: the Keras path (unique in a model) or the tf.Variable name."""
    path = getattr(variable, "path", None) if not isinstance(variable, tf.Variable) else None
    return path or variable.name.rsplit(":", 1)[0]


def _unique_keys(variables: Sequence[Any]) -> list[str]:
    keys = [shadow_key(v) for v in variables]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise TrainingSetupError(
            f"{len(duplicates)} names are shared by several variables ({', '.join(duplicates)}), so their shadows "
            "could not be told apart in the EMA checkpoint",
            hint="Give the variables unique names (tf.Variable(..., name=...)) or pass Keras variables, whose paths "
            "are unique",
        )
    return keys


class EmaCheckpointer:
    """Keep an EMA of a model's variables and save live and EMA checkpoints together under one step number.

    Args:
        directory: CKPT_DIR. Training checkpoints go to `directory/ckpt-N`, shadows to `directory/ema/ckpt-N`.
        model: The Keras model or `tf.Module` being trained; saved as `tf.train.Checkpoint(model=model, ...)`.
        variables: Variables to average; default `model.trainable_variables`.
        average: An existing `tf.train.ExponentialMovingAverage` (given: its shadows are used), else one is created
            with `decay`.
        decay: Decay of the created average.
        max_to_keep: Complete pairs kept; older pairs are deleted, both halves together.
        shadows: Averages to save instead of `average.average(v)` (the optimizer's own `use_ema` averages), one per
            variable in `variables`' order. `update()` then does nothing: the optimizer updates them.
        **trackables: Further objects for the training checkpoint (e.g. `optimizer=optimizer`).
    """

    def __init__(self, directory: str | os.PathLike, model: Any, variables: Sequence[Any] | None = None, *,
                 average: tf.train.ExponentialMovingAverage | None = None, decay: float = 0.999,
                 max_to_keep: int = 5, shadows: Sequence[Any] | None = None, **trackables: Any) -> None:
        self.directory = Path(directory)
        self.model = model
        self.variables = list(variables if variables is not None else model.trainable_variables)
        keys = _unique_keys(self.variables)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        if shadows is None:
            self.average = average or tf.train.ExponentialMovingAverage(decay=decay)
            self._tf_variables = [_tf_variable(v) for v in self.variables]
            self.average.apply(self._tf_variables)  # creates the shadows (initialised to the current values)
            shadows = [self.average.average(v) for v in self._tf_variables]
        else:
            if len(shadows) != len(self.variables):
                raise TrainingSetupError(f"{len(shadows)} shadows given for {len(self.variables)} variables",
                                         hint="Pass one average per variable, in the same order")
            self.average = None
            self._tf_variables = []
        self.shadows = dict(zip(keys, shadows))
        live = tf.train.Checkpoint(model=model, step=self.step, **trackables)
        ema = tf.train.Checkpoint(ema_weights=self.shadows, step=self.step)
        self._live = tf.train.CheckpointManager(live, str(self.directory), max_to_keep, checkpoint_name=CHECKPOINT_NAME)
        self._ema = tf.train.CheckpointManager(ema, str(self.directory / EMA_CHECKPOINT_SUBDIR), max_to_keep,
                                               checkpoint_name=CHECKPOINT_NAME)

    def update(self) -> None:
        """Move the averages towards the current weights; call after each optimizer step."""
        if self.average is not None:
            self.average.apply(self._tf_variables)

    def save(self, step: int) -> tuple[str, str]:
        """Save the pair for `step`: the EMA half first, then the training half. Returns (training, EMA) prefixes."""
        self.step.assign(int(step))
        ema_prefix = self._ema.save(checkpoint_number=int(step))
        live_prefix = self._live.save(checkpoint_number=int(step))
        return live_prefix, ema_prefix

    def restore_latest(self) -> int | None:
        """Restore the newest complete pair (to resume training); returns its step, or None when there is none."""
        live_numbers = {int(p.rsplit("-", 1)[1]) for p in self._live.checkpoints}
        ema_numbers = {int(p.rsplit("-", 1)[1]) for p in self._ema.checkpoints}
        common = sorted(live_numbers & ema_numbers)
        if not common:
            return None
        step = common[-1]
        self._live.checkpoint.read(str(self.directory / f"{CHECKPOINT_NAME}-{step}")).expect_partial()
        self._ema.checkpoint.read(str(self.directory / EMA_CHECKPOINT_SUBDIR / f"{CHECKPOINT_NAME}-{step}")
                                  ).assert_existing_objects_matched()
        return step


def _keras_callback_base() -> type:
    import keras

    return keras.callbacks.Callback


class EmaCheckpoint(_keras_callback_base()):  # type: ignore[misc]
    """Keras callback: save live and EMA checkpoints in lockstep during `fit()`, in the exporter's layout.

    With `decay`, the callback keeps a `tf.train.ExponentialMovingAverage` of the trainable weights, updated after
    every batch. Without it, the optimizer must have been built with `use_ema=True` and its own averages are saved.
    Saves happen at the end of every `every_epochs`-th epoch and of the last one, before `fit()` replaces the
    weights with the averages (`finalize_variable_values`), so the live weights are never lost.

    Args:
        directory: CKPT_DIR.
        decay: Decay of an EMA kept by the callback; None to save the optimizer's `use_ema` averages.
        every_epochs: Save every this many epochs (and always after the last).
        max_to_keep: Complete pairs kept.
    """

    def __init__(self, directory: str | os.PathLike, decay: float | None = None, every_epochs: int = 1,
                 max_to_keep: int = 5) -> None:
        super().__init__()
        self.directory = directory
        self.decay = decay
        self.every_epochs = every_epochs
        self.max_to_keep = max_to_keep
        self.checkpointer: EmaCheckpointer | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.checkpointer is not None:
            return
        optimizer = self.model.optimizer
        if self.decay is None:
            if not getattr(optimizer, "use_ema", False):
                raise TrainingSetupError(
                    "EmaCheckpoint without decay saves the optimizer's own averages, but the optimizer was not "
                    "built with use_ema=True",
                    hint="Compile with an optimizer(use_ema=True), or give EmaCheckpoint(decay=0.999) to keep one")
            if not optimizer.built:
                optimizer.build(self.model.trainable_variables)
            shadows = optimizer_averages(optimizer, list(self.model.trainable_variables))
            self.checkpointer = EmaCheckpointer(self.directory, self.model, shadows=shadows,
                                                max_to_keep=self.max_to_keep, optimizer=optimizer)
        else:
            self.checkpointer = EmaCheckpointer(self.directory, self.model, decay=self.decay,
                                                max_to_keep=self.max_to_keep, optimizer=optimizer)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        assert self.checkpointer is not None
        self.checkpointer.update()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        assert self.checkpointer is not None
        last = epoch + 1 == self.params.get("epochs")
        if last or (epoch + 1) % self.every_epochs == 0:
            self.checkpointer.save(int(self.model.optimizer.iterations.numpy()))
