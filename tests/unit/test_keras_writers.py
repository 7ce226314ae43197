"""Each Keras's `KerasWriter` on real files that Keras wrote: which writer a file names, where its saving walk puts
each variable, its loader, the names restored variables get, the state it skips and the architecture it rebuilds.

The model is a tiny trained MLP (`hidden` Dense, BatchNorm, `logits` Dense) of each family, compiled with Adam and a
metric, fitted one step so the file holds optimizer (and, for tf-keras, metric) state beside the weights.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import pytest
import tensorflow as tf

from ema_export.adapters import adapter_for, keras_writer_of
from ema_export.adapters.keras3 import Keras3Writer
from ema_export.adapters.tf_keras import TfKerasWriter
from ema_export.checkpoint_graph import variable_identity
from ema_export.errors import RestoreError
from ema_export.fresh_model import build_fresh_model
from ema_export.keras_files import as_array, open_weights
from ema_export.locate import CheckpointFiles
from ema_export.restore_by_keras_file import restore_from_keras_file

FAMILIES = ["keras", "tf_keras"]


def _library(family: str) -> Any:
    if family == "keras":
        import keras

        return keras
    import tf_keras

    return tf_keras


def _factory(family: str) -> Any:
    library = _library(family)

    def build() -> Any:
        return library.Sequential([library.Input((2,)), library.layers.Dense(3, name="hidden"),
                                   library.layers.BatchNormalization(name="norm"),
                                   library.layers.Dense(1, name="logits")])

    return build


@dataclass(frozen=True)
class Saved:
    family: str
    model: Any
    archive: str
    weights: str


def _save(family: str, directory: Any) -> Saved:
    library = _library(family)
    model = _factory(family)()
    model.compile(optimizer=library.optimizers.Adam(0.1), loss="mse", metrics=["mae"])
    rng = np.random.default_rng(0)
    model.fit(rng.standard_normal((8, 2)).astype("float32"), rng.standard_normal((8, 1)).astype("float32"),
              epochs=1, verbose=0)
    archive, weights = str(directory / f"{family}.keras"), str(directory / f"{family}.weights.h5")
    model.save(archive)
    model.save_weights(weights)
    return Saved(family, model, archive, weights)


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    return _save(request.param, tmp_path_factory.mktemp(request.param))


def _fresh(family: str) -> Any:
    return build_fresh_model(".", model=_factory(family))


def _datasets(path: str) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}

    def keep(key: str, item: Any) -> None:  # h5py stops the visit at the first callback that returns a value
        if isinstance(item, h5py.Dataset):
            found[key] = as_array(item)

    with open_weights(path) as weights:
        weights.visititems(keep)
    return found


def test_a_keras_archive_names_the_keras_that_wrote_it(saved):
    writer = keras_writer_of(saved.archive)
    assert writer is adapter_for(saved.model).keras_writer
    assert isinstance(writer, Keras3Writer if saved.family == "keras" else TfKerasWriter)
    with zipfile.ZipFile(saved.archive) as archive:
        version = json.loads(archive.read("metadata.json"))["keras_version"]
    assert version.split(".")[0] == writer.keras_major


def test_a_weights_file_records_no_version_and_is_read_by_the_model_s_keras(saved):
    family_writer = adapter_for(saved.model).keras_writer
    assert keras_writer_of(saved.weights, family_writer) is family_writer
    assert isinstance(keras_writer_of(saved.weights), Keras3Writer)  # no model to ask: Keras 3's


def test_weight_paths_are_where_the_file_keeps_each_variable(saved):
    # As in an export: a fresh model of the architecture, never compiled or fitted (loaded here, so values match).
    fresh = _fresh(saved.family)
    writer = fresh.adapter.keras_writer
    writer.load(fresh.model, saved.archive)
    variables = fresh.variables()
    loaded = [variable.numpy() for variable in variables]
    layout = writer.weight_paths(fresh.model, variables)
    paths = layout.paths
    stored = _datasets(saved.archive)
    for variable, value in zip(variables, loaded):
        key = paths[variable_identity(variable)]
        np.testing.assert_array_equal(stored[key], variable.numpy(), err_msg=key)
        np.testing.assert_array_equal(variable.numpy(), value)  # tf-keras's walk fills in numbers, then restores
    assert paths[variable_identity(variables[0])] == "layers/dense/vars/0"  # named after the class, not `hidden`
    # Everything else in the file is the training state the writer skips, and that state is really there.
    others = set(stored) - set(paths.values())
    assert others and all(key.startswith(writer.skipped_state) for key in others)
    assert {key.split("/")[0] + "/" for key in others} == set(writer.skipped_state)
    # No layer of this model computes what it saves; the training state the walk visits is all the writer skips.
    assert all(entry.startswith(writer.skipped_state) for entry in layout.computed)


@pytest.mark.parametrize("which", ["archive", "weights"])
def test_load_fills_a_fresh_model_and_never_its_optimizer(saved, which):
    path = getattr(saved, which)
    library = _library(saved.family)
    model = _factory(saved.family)()
    optimizer = library.optimizers.Adam(0.1)
    model.compile(optimizer=optimizer, loss="mse")
    writer = TfKerasWriter() if saved.family == "tf_keras" else Keras3Writer()
    writer.load(model, path)
    for loaded, trained in zip(model.variables, saved.model.variables):
        np.testing.assert_array_equal(loaded.numpy(), trained.numpy())
    assert int(optimizer.iterations.numpy()) == 0  # the file's optimizer state (one step taken) stayed in the file


def test_namer_gives_each_variable_the_names_later_stages_find_it_by(saved):
    fresh = _fresh(saved.family)
    writer = fresh.adapter.keras_writer
    kernel = fresh.variables()[0]
    name = writer.namer(fresh.model)
    with open_weights(saved.archive) as weights:
        restored = name(kernel, "layers/dense/vars/0", weights)
    assert (restored.checkpoint_key, restored.training_name, restored.trainable) == (
        "layers/dense/vars/0", "hidden/kernel", True)
    if saved.family == "keras":  # found by its file path, and by its Keras path in shadow names
        assert (restored.path, restored.keras_path) == ("layers/dense/vars/0", kernel.path)
    else:  # found by its object-graph path, as a TensorFlow checkpoint of the model records it
        assert (restored.path, restored.keras_path) == ("layer_with_weights-0/kernel", "")


def test_model_from_json_rebuilds_a_model_of_the_writer_s_family(saved):
    with zipfile.ZipFile(saved.archive) as archive:
        config = archive.read("config.json").decode()
    model = keras_writer_of(saved.archive).model_from_json(config)
    assert adapter_for(model) is adapter_for(saved.model)
    assert [tuple(v.shape) for v in model.variables] == [tuple(v.shape) for v in saved.model.variables]


@pytest.mark.parametrize("which", ["archive", "weights"])
def test_the_strategy_restores_every_variable_from_the_file(saved, which):
    path = getattr(saved, which)
    fresh = _fresh(saved.family)
    restored = restore_from_keras_file(fresh, CheckpointFiles(path, (path,), "test"))
    stored = _datasets(path)
    assert [item.variable for item in restored.variables] == fresh.variables()
    for item in restored.variables:
        np.testing.assert_array_equal(item.variable.numpy(), stored[item.checkpoint_key])


def test_a_file_of_one_keras_is_refused_by_a_model_of_the_other(saved):
    other = "tf_keras" if saved.family == "keras" else "keras"
    writer = keras_writer_of(saved.archive)
    with pytest.raises(RestoreError) as raised:
        restore_from_keras_file(_fresh(other), CheckpointFiles(saved.archive, (saved.archive,), "test"))
    assert f"saved by {writer.label}" in str(raised.value) and f"only {writer.models} can load it" in str(raised.value)


def test_a_tf_module_cannot_load_a_keras_file(saved):
    class Linear(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = tf.Variable(tf.zeros([2, 1]))

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
        def __call__(self, x):
            return tf.matmul(x, self.kernel)

    with pytest.raises(RestoreError, match="only a .* model can load it"):
        restore_from_keras_file(build_fresh_model(".", model=Linear),
                                CheckpointFiles(saved.weights, (saved.weights,), "test"))
