"""What the restore stage returns, shared by its three strategies and every later stage.

`restore.py` dispatches to a strategy (the object graph in `restore_by_graph`, names in `restore_by_name`, Keras
files in `restore_by_keras_file`); each builds these types, so none of them imports the dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from ema_export.checkpoint_graph import variable_identity
from ema_export.errors import RestoreError

if TYPE_CHECKING:  # only annotations: the adapters build RestoredVariables, and fresh_model imports the adapters
    from ema_export.fresh_model import FreshModel
    from ema_export.locate import CheckpointFiles


@dataclass
class RestoredVariable:
    """A model variable and the checkpoint entry its live value came from."""

    variable: Any
    path: str
    checkpoint_key: str
    training_name: str
    trainable: bool
    shape: tuple[int, ...]
    dtype: tf.DType

    keras_path: str = ""

    @property
    def aliases(self) -> tuple[str, ...]:
        """Names a shadow may use for this variable: its training-time name, and its Keras path if it has one."""
        return tuple(dict.fromkeys(name for name in (self.training_name, self.keras_path) if name))

    @property
    def name(self) -> str:
        """The name people know the variable by: its name at training time."""
        return self.training_name or self.path


@dataclass
class RestoredModel:
    """The fresh model with live values, and where each came from."""

    fresh: FreshModel
    checkpoint: CheckpointFiles
    attachment: str
    variables: list[RestoredVariable]
    reader: tf.train.CheckpointReader | None = field(repr=False)
    object_paths: dict[int, tuple[Any, Any, str]] = field(repr=False, default_factory=dict)
    attachment_node: int | None = None
    """Object-graph node the model hangs at (None for name-based or Keras-file checkpoints)."""

    def trainable_positions(self) -> list[int | None]:
        """The index in `variables` of each of the model's `trainable_variables`, in that order (None for one that
        was not restored): the order in which Keras builds an optimizer's per-variable lists, averages included."""
        position_of = {variable_identity(item.variable): index for index, item in enumerate(self.variables)}
        return [position_of.get(variable_identity(variable))
                for variable in getattr(self.fresh.model, "trainable_variables", [])]


def raise_for_shapes(source: str, entries: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
    """One error naming every variable whose shape differs from its checkpoint entry, before anything is loaded
    (TensorFlow and Keras would fail on the first one, with a long message and warnings about the rest).

    Args:
        source: The checkpoint, for the message.
        entries: (name, model shape, stored shape) per variable.
    """
    differing = [f"{name} {list(model)} in the model, {list(stored)} in the checkpoint"
                 for name, model, stored in entries if tuple(model) != tuple(stored)]
    if differing:
        raise RestoreError(
            f"{len(differing)} of {len(entries)} model variables have another shape than in {source}:",
            hint="The model is not the architecture that was trained; pass the --model that was trained",
            problems=differing,
        )
