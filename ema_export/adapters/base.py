"""What every model family must offer the stages: build, call, variables, how an export tracks the live arm, and (a
Keras family) the `KerasWriter` that reads its Keras files. The EMA arm needs nothing of a family:
`ema_export.assemble` reruns the live arm's traced function on the averages.

One subclass per family (Keras 3, tf-keras, tf.Module), registered in `ema_export.adapters.ADAPTERS`; the stages
never ask which family a model is, they ask its adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from ema_export.checkpoint_graph import variable_identity

if TYPE_CHECKING:
    from ema_export.adapters.keras_writer import KerasWriter


def model_variables(model: Any) -> list[Any]:
    """Every variable of the model, each once, in the model's own order (`model.variables`, which may list a shared
    variable twice)."""
    seen: set[int] = set()
    result = []
    for variable in model.variables:
        identity = variable_identity(variable)
        if identity not in seen:
            seen.add(identity)
            result.append(variable)
    return result


class ModelAdapter(ABC):
    """The operations the stages need from one model family. Stateless: per-model facts live on `FreshModel`."""

    name: str
    """A short label for messages and the registry ("keras", "tf_keras", "module")."""

    trains_in_variable_order: bool = False
    """Whether an optimizer's per-variable lists (its averages) follow `model.trainable_variables`: Keras's `fit()`
    builds the optimizer on exactly that list. A `tf.Module` is trained on whatever list its loop passes."""

    keras_writer: KerasWriter | None = None
    """How `.keras` / `.weights.h5` files written by this family's Keras load into its models; None for a family that
    writes no Keras files."""

    @abstractmethod
    def owns(self, model: Any) -> bool:
        """Whether `model` belongs to this family."""

    @abstractmethod
    def declared_signature(self, model: Any, source: str) -> list[tf.TensorSpec] | None:
        """The serving inputs the model itself declares, None when it declares none."""

    def input_keys(self, model: Any, specs: Sequence[tf.TensorSpec], source: str) -> tuple[str, ...] | None:
        """The dict key of each serving input for a model called with a dict; None for positional inputs."""
        return None

    @abstractmethod
    def call(self, model: Any, inputs: Sequence[tf.Tensor], input_keys: tuple[str, ...] | None) -> Any:
        """Run `model` on serving inputs, in inference mode."""

    def build(self, model: Any, specs: Sequence[tf.TensorSpec], input_keys: tuple[str, ...] | None) -> None:
        """Make sure the model's variables exist, so they can be restored or assigned. Most families build eagerly."""
        return None

    def variables(self, model: Any) -> list[Any]:
        """Every variable of the model, each once, in its own order: the one order every stage lists them in."""
        return model_variables(model)

    @abstractmethod
    def track_live(self, root: tf.Module, model: Any) -> None:
        """Attach what the SavedModel must store for the live arm to the export root."""
