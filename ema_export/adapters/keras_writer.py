"""What a Keras family must offer to restore from the `.keras` / `.weights.h5` files its Keras writes.

Keras 3 and tf-keras write the same HDF5 tree (`layers/dense/vars/0`, `optimizer/vars/<i>`), but learning which
variable sits at which path, loading the values, naming the restored variables and rebuilding a saved architecture
each go through that Keras's own saving library. One subclass per Keras, reached through its family's adapter
(`ModelAdapter.keras_writer`); `ema_export.restore_by_keras_file` picks the one that wrote a file once and never asks
which it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import h5py

    from ema_export.restored import RestoredVariable

VariableNamer = Callable[[Any, str, "h5py.File"], "RestoredVariable"]
"""Describes one model variable restored from the entry at `key` ("" when the saving walk gave it none) of the
open weights file."""


@dataclass(frozen=True)
class SavedLayout:
    """Where a Keras's saving walk puts a model's values, learnt by running the walk over the model.

    Attributes:
        paths: Variable identity -> the entry (`layers/dense/vars/0`) that holds exactly that variable's value.
        computed: Entries that hold a value computed on save, no variable's own: a LoRA layer's kernel with its
            adapters merged in, a quantized kernel re-quantized after such a merge. A file holding them does not hold
            the values of the variables they were computed from.
    """

    paths: dict[int, str]
    computed: tuple[str, ...] = ()


class KerasWriter(ABC):
    """How the files one Keras writes are read back into a model of its family. Stateless."""

    label: str
    """Who saved a file, for messages: "Keras 3", "tf-keras (Keras 2)"."""
    models: str
    """What can load its files, for messages: "a Keras 3 model"."""
    keras_major: str
    """The major of `keras_version` it records in a `.keras` archive's metadata.json."""
    skipped_state: tuple[str, ...]
    """Groups of its files that hold training state, not model variables (a rebuilt model has none of them, and they
    are never served), so entries under them are not reported as belonging to no variable."""

    @abstractmethod
    def weight_paths(self, model: Any, variables: list[Any]) -> SavedLayout:
        """Where this Keras's saving walk stores each of `model`'s variables (`layers/dense/vars/0`), by identity,
        and which entries it fills with computed values instead; `variables` are the model's, as its adapter lists
        them. The optimizer is skipped: it is not exported."""

    @abstractmethod
    def load(self, model: Any, path: str) -> None:
        """Load the file's values into `model` with this Keras's own loader, never into the model's optimizer."""

    @abstractmethod
    def namer(self, model: Any) -> VariableNamer:
        """How each restored variable of `model` is named and found again by later stages (prepared once per model)."""

    @abstractmethod
    def model_from_json(self, config_text: str) -> Any:
        """Rebuild the architecture of a `.keras` archive's config.json (or a `model.json`) this Keras wrote."""


def compiled_optimizer(model: Any) -> Any:
    """The optimizer a compiled model carries (None otherwise): the saving walk and the loader must skip it."""
    return getattr(model, "optimizer", None)
