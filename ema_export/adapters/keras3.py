"""Keras 3 models; their `.keras` / `.weights.h5` files are read through Keras 3's saving library (`Keras3Writer`)."""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from ema_export.adapters.keras_common import KerasAdapter
from ema_export.adapters.keras_writer import KerasWriter, SavedLayout, VariableNamer, compiled_optimizer
from ema_export.checkpoint_graph import variable_identity
from ema_export.private_apis import keras_saving_lib
from ema_export.restored import RestoredVariable

if TYPE_CHECKING:
    import h5py


def _recording_store(variables: list[Any]) -> Any:
    store_class: Any = keras_saving_lib().H5IOStore
    known = {variable_identity(variable) for variable in variables}

    class RecordingStore(store_class):
        """Keras's own weights store, made to note where each variable would be written instead of writing it, and
        which entries would get a value that is none of the model's variables (Keras 3 layers store the variable
        object itself, `Layer.save_own_variables`; anything else was computed on save)."""

        def __init__(self) -> None:
            super().__init__(io.BytesIO(), mode="w")
            self.paths: dict[int, str] = {}
            self.computed: list[str] = []
            self._current = ""

        def make(self, path: str, metadata: dict | None = None) -> RecordingStore:
            self._current = path
            return self

        def __setitem__(self, key: str, value: Any) -> None:
            entry = "/".join(filter(None, (self._current, "vars", key)))
            identity = variable_identity(value)
            if identity in known:
                self.paths.setdefault(identity, entry)
            else:
                self.computed.append(entry)

    return RecordingStore()


def _training_name(weights: h5py.File, key: str, variable: Any) -> str:
    """`dense/kernel`: the layer name Keras recorded beside the values (Keras 3.10+), and the variable's name."""
    recorded = weights[key].parent.attrs.get("name")
    return f"{recorded}/{variable.name}" if recorded else getattr(variable, "path", variable.name)


def _restored_variable(variable: Any, key: str, weights: h5py.File) -> RestoredVariable:
    """Found again by its file path where it has one, else by its Keras path (`dense/kernel`), which shadows may use."""
    return RestoredVariable(
        variable=variable,
        path=key or variable.path,
        checkpoint_key=key,
        training_name=_training_name(weights, key, variable) if key and key in weights else variable.path,
        trainable=bool(variable.trainable),
        shape=tuple(variable.shape),
        dtype=tf.dtypes.as_dtype(variable.dtype),
        keras_path=variable.path,
    )


class Keras3Writer(KerasWriter):
    """Files written by Keras 3's `model.save` / `save_weights` (and `ModelCheckpoint`)."""

    label = "Keras 3"
    models = "a Keras 3 model"
    keras_major = "3"
    skipped_state = ("optimizer/",)

    def weight_paths(self, model: Any, variables: list[Any]) -> SavedLayout:
        """Keras's own traversal (`saving_lib._save_state`, what `save_weights` runs) with a store that records
        instead of writing, so the paths are exactly those of any file saved from this architecture. A value a layer
        computes on save (a LoRA kernel with its adapters merged in) is recorded as computed, not as a variable's."""
        saving_lib = keras_saving_lib()
        store = _recording_store(variables)
        optimizer = compiled_optimizer(model)
        try:
            saving_lib._save_state(model, store, None, "", {id(optimizer)} if optimizer is not None else set())
        finally:
            store.close()
        return SavedLayout(store.paths, tuple(store.computed))

    def load(self, model: Any, path: str) -> None:
        saving_lib = keras_saving_lib()
        optimizer = compiled_optimizer(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mismatches are errors in the restore; Keras's warnings would repeat them
            saving_lib.load_weights_only(model, path, objects_to_skip=[optimizer] if optimizer is not None else None)

    def namer(self, model: Any) -> VariableNamer:
        return _restored_variable

    def model_from_json(self, config_text: str) -> Any:
        import keras

        return keras.models.model_from_json(config_text)


class Keras3Adapter(KerasAdapter):
    name = "keras"
    keras_writer = Keras3Writer()

    def owns(self, model: Any) -> bool:
        try:
            import keras
        except ImportError:  # pragma: no cover - keras ships with tensorflow
            return False
        return isinstance(model, keras.Model)

    def track_live(self, root: tf.Module, model: Any) -> None:
        # Track the variables, not the Keras model object: a SavedModel that tracks a Keras 3 model cannot be run by
        # the session-based loader TF Serving uses ("Could not find variable ..."); Keras's own export does the same.
        root.live_variables = [variable.value for variable in model.variables]

