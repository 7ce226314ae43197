"""What every model family must offer the stages: build, call, EMA call, variables, how an export tracks it, and (a
Keras family) the `KerasWriter` that reads its Keras files.

One subclass per family (Keras 3, tf-keras, tf.Module), registered in `ema_export.adapters.ADAPTERS`; the stages
never ask which family a model is, they ask its adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from ema_export.checkpoint_graph import children_of, variable_identity

if TYPE_CHECKING:
    from ema_export.adapters.keras_writer import KerasWriter
    from ema_export.fold import Averages
    from ema_export.restored import RestoredModel


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

    @abstractmethod
    def ema_call(self, restored: RestoredModel, averages: Averages, root: tf.Module,
                 copied: list[str]) -> Callable[..., Any]:
        """The EMA arm's call on serving inputs, with what it reads tracked on `root`. Names of non-averaged variables
        that had to be copied (not shared with the live arm) are appended to `copied`."""


def _follow(root: Any, path: str) -> tuple[Any, Any, str]:
    obj, parent, name = root, None, ""
    for name in filter(None, path.split("/")):
        parent, obj = obj, children_of(obj)[name]
    return obj, parent, name


def _share(parent: Any, name: str, old: Any, new: Any) -> bool:
    """Put `new` where `old` hangs in `parent`, so both instances use one variable. False if it cannot be done."""
    if parent is None:
        return False
    if getattr(parent, name, None) is old:
        setattr(parent, name, new)
        return True
    try:
        key: Any = int(name) if isinstance(parent, Sequence) else name
        if parent[key] is old:
            parent[key] = new
            return True
    except (TypeError, KeyError, IndexError, ValueError):
        pass
    return False


class SecondInstanceAdapter(ModelAdapter):
    """A family with no way to run with substituted variables: a second instance from the factory carries the
    averages; its non-averaged variables are replaced by the live ones where the model exposes them as attributes or
    container items, and copied (and reported) otherwise."""

    @abstractmethod
    def track_ema(self, root: tf.Module, copy: Any, own: list[Any]) -> None:
        """Attach the second instance's state to the export root; `own` are the variables it really reads."""

    def ema_call(self, restored: RestoredModel, averages: Averages, root: tf.Module,
                 copied: list[str]) -> Callable[..., Any]:
        fresh = restored.fresh
        copy = fresh.factory()
        fresh.build(copy)
        own: list[Any] = []  # variables of the copy that its EMA arm really reads (not replaced by a live one)
        for index, item in enumerate(restored.variables):
            target, parent, name = _follow(copy, item.path)
            if index in averages:
                target.assign(averages[index])
                own.append(target)
            elif not _share(parent, name, target, item.variable):
                target.assign(item.variable)
                copied.append(item.name)
                own.append(target)
        self.track_ema(root, copy, own)
        return lambda *inputs: fresh.call(copy, inputs)
