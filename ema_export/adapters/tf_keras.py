"""tf-keras (Keras 2) models. The `.keras` / `.weights.h5` files tf-keras writes hold its values at the same paths as
Keras 3's; they are read through tf-keras's own saving library (`TfKerasWriter`).
"""

from __future__ import annotations

import sys
import zipfile
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from ema_export.adapters.keras_common import KerasAdapter
from ema_export.adapters.keras_writer import KerasWriter, SavedLayout, VariableNamer, compiled_optimizer
from ema_export.checkpoint_graph import children_of, variable_identity
from ema_export.errors import ModelLoadError
from ema_export.keras_files import WEIGHTS_MEMBER
from ema_export.private_apis import tf_keras_saving_lib
from ema_export.restored import RestoredVariable

if TYPE_CHECKING:
    import h5py


def _trackable_paths(model: Any) -> dict[int, str]:
    """The object-graph path of each variable (`layer_with_weights-0/kernel`), by identity: the path the manifest
    gives a variable restored from a Keras file, the same a TensorFlow checkpoint of the model records."""
    paths: dict[int, str] = {}
    seen = {id(model)}
    queue = [(model, "")]
    while queue:
        obj, prefix = queue.pop(0)
        for name, child in children_of(obj).items():
            path = f"{prefix}/{name}".lstrip("/")
            if isinstance(child, tf.Variable):
                paths.setdefault(id(child), path)
            elif id(child) not in seen:
                seen.add(id(child))
                queue.append((child, path))
    return paths


class TfKerasWriter(KerasWriter):
    """Files written by tf-keras's `model.save('x.keras')` / `save_weights('x.weights.h5')`."""

    label = "tf-keras (Keras 2)"
    models = "a tf-keras model"
    keras_major = "2"
    skipped_state = ("optimizer/", "metrics/")  # tf-keras also saves a compiled model's metrics

    def weight_paths(self, model: Any, variables: list[Any]) -> SavedLayout:
        """tf-keras's saving walk (`tf_keras/src/saving/saving_lib.py` `_save_state`), recorded.

        tf-keras layers hand the store values, not variables (`Layer.save_own_variables` stores `v.numpy()`), so each
        variable is first filled with its own number, the walk records which number lands at which path, and the
        values are put back. A numeric entry that is not wholly one variable's number was computed on save. The
        restore loads every value from the file right after, and checks it.
        """
        saving_lib = tf_keras_saving_lib()
        originals = [variable.numpy() for variable in variables]
        by_number: dict[int, Any] = {}
        paths: dict[int, str] = {}
        computed: list[str] = []

        class RecordingStore(dict):
            def __init__(self, current: str) -> None:
                super().__init__()
                self.current = current

            def __setitem__(self, key: str, value: Any) -> None:
                entry = f"{self.current}/vars/{key}".lstrip("/")
                array = np.asarray(value)
                if not array.size or array.dtype.kind not in "iuf":
                    return  # nothing numbered can land here
                owner = by_number.get(int(array.flat[0])) if np.all(array == array.flat[0]) else None
                if owner is not None and tuple(array.shape) == tuple(owner.shape):
                    paths.setdefault(variable_identity(owner), entry)
                else:
                    computed.append(entry)

        class Walk:
            def make(self, path: str) -> RecordingStore:
                return RecordingStore(path)

        try:
            for number, variable in enumerate(variables, start=1):
                if variable.dtype.is_floating or variable.dtype.is_integer:
                    variable.assign(tf.fill(tf.shape(variable), tf.cast(number, variable.dtype)))
                    by_number[number] = variable
            optimizer = compiled_optimizer(model)
            saving_lib._save_state(model, Walk(), None, "", {id(optimizer)} if optimizer is not None else set())
        finally:
            for variable, value in zip(variables, originals):
                variable.assign(value)
        return SavedLayout(paths, tuple(computed))

    def load(self, model: Any, path: str) -> None:
        """tf-keras's own loader (`saving_lib._load_state`, what `load_weights_only` runs) with the optimizer
        marked as already visited."""
        saving_lib = tf_keras_saving_lib()
        optimizer = compiled_optimizer(model)
        archive = zipfile.ZipFile(path) if path.endswith(".keras") else None
        store = (saving_lib.H5IOStore(WEIGHTS_MEMBER, archive=archive, mode="r") if archive is not None
                 else saving_lib.H5IOStore(path, mode="r"))
        try:
            saving_lib._load_state(model, weights_store=store, assets_store=None, inner_path="",
                                   visited_trackables={id(optimizer)} if optimizer is not None else set())
        finally:
            store.close()
            if archive is not None:
                archive.close()

    def namer(self, model: Any) -> VariableNamer:
        """Each variable under its object-graph path and its tf-keras name."""
        graph_paths = _trackable_paths(model)

        def restored_variable(variable: Any, key: str, weights: h5py.File) -> RestoredVariable:
            name = variable.name.split(":")[0]
            return RestoredVariable(variable=variable, path=graph_paths.get(id(variable), name), checkpoint_key=key,
                                    training_name=name, trainable=bool(variable.trainable),
                                    shape=tuple(variable.shape), dtype=tf.dtypes.as_dtype(variable.dtype))

        return restored_variable

    def model_from_json(self, config_text: str) -> Any:
        """tf-keras's config names its own classes (`Functional` from `keras.engine`), which Keras 3 cannot rebuild."""
        try:
            import tf_keras
        except ImportError as error:
            raise ModelLoadError(
                f"This .keras file was saved by tf-keras (Keras 2), which is not installed ({error})",
                hint="pip install tf-keras (the version that trained the model), or pass --model "
                "package.module:factory",
            ) from error
        return tf_keras.models.model_from_json(config_text)


class TfKerasAdapter(KerasAdapter):
    name = "tf_keras"
    keras_writer = TfKerasWriter()

    def owns(self, model: Any) -> bool:
        tf_keras = sys.modules.get("tf_keras")  # imported by the factory if it built a tf-keras model
        return tf_keras is not None and isinstance(model, tf_keras.Model)

    def track_live(self, root: tf.Module, model: Any) -> None:
        # Track variables, not the model object: Keras 2 would also save every layer's traced functions.
        root.live_variables = list(model.variables)

