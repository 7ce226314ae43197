"""What tf-keras (Keras 2) training code really writes, exported (item 5 of issue 9).

One `fit()` run with tf-keras's own `ModelCheckpoint`, trained with `Adam(use_ema=True)`, writes every file these tests
export: the callback's default output (a SavedModel directory per epoch), a `.keras` file and a `.weights.h5` file.
At each epoch's end, before the checkpoint callbacks run, a callback placed first computes the raw and the averaged
outputs inside the training process with the model itself; the export must serve exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import ema_export
from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from support import models as tm
from support.exporting import read_in_parts, written_in_shards

tf_keras = pytest.importorskip("tf_keras")

pytestmark = pytest.mark.slow

X = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0], [4.0, 0.25, -0.5, -1.0]], np.float32)


def build_mlp():
    inputs = tf_keras.Input((tm.NUM_FEATURES,), name="features")
    hidden = tf_keras.layers.ReLU()(tf_keras.layers.BatchNormalization()(tf_keras.layers.Dense(tm.HIDDEN)(inputs)))
    return tf_keras.Model(inputs, tf_keras.layers.Dense(tm.NUM_CLASSES)(hidden))


@dataclass(frozen=True)
class Run:
    directory: Path
    raw: list[np.ndarray]
    """Per epoch: the model's outputs on X when the checkpoints were written."""
    averaged: list[np.ndarray]
    """Per epoch: the outputs with the optimizer's averages in place of the trainable weights."""


def outputs_of_both_arms(model) -> tuple[np.ndarray, np.ndarray]:
    """Raw and averaged outputs, computed by the training model itself: averages swapped in, then swapped back."""
    raw_values = [variable.numpy() for variable in model.trainable_variables]
    raw = model(X, training=False).numpy()
    for variable, average in zip(model.trainable_variables, model.optimizer._model_variables_moving_average):
        variable.assign(average)
    averaged = model(X, training=False).numpy()
    for variable, value in zip(model.trainable_variables, raw_values):
        variable.assign(value)
    return raw, averaged


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """tf-keras fit() for 2 epochs with ModelCheckpoint writing SavedModel directories and .keras files."""
    directory = tmp_path_factory.mktemp("tf_keras_run")
    tf_keras.utils.set_random_seed(3)
    model = build_mlp()
    model.compile(optimizer=tf_keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5), loss="mse")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((32, tm.NUM_FEATURES)).astype(np.float32)
    y = rng.standard_normal((32, tm.NUM_CLASSES)).astype(np.float32)
    raw, averaged = [], []

    def record(epoch, logs):
        both = outputs_of_both_arms(model)
        raw.append(both[0])
        averaged.append(both[1])

    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[
        tf_keras.callbacks.LambdaCallback(on_epoch_end=record),
        tf_keras.callbacks.ModelCheckpoint(str(directory / "savedmodel-{epoch}")),  # the default: a SavedModel
        tf_keras.callbacks.ModelCheckpoint(str(directory / "model-{epoch}.keras")),
        tf_keras.callbacks.ModelCheckpoint(str(directory / "weights-{epoch}.weights.h5"), save_weights_only=True),
    ])
    return Run(directory, raw, averaged)


def served(version_dir, signature: str) -> np.ndarray:
    function = tf.saved_model.load(str(version_dir)).signatures[signature]
    return function(features=tf.constant(X))["output_0"].numpy()


def test_model_checkpoint_saved_model_directory_serves_both_arms(run, tmp_path):
    assert (run.directory / "savedmodel-2" / "saved_model.pb").is_file()
    assert not np.allclose(run.raw[1], run.averaged[1], atol=1e-3)

    result = ema_export.export(run.directory / "savedmodel-2", tmp_path / "out", model=build_mlp)

    assert result.sources.training.prefix == str(run.directory / "savedmodel-2" / "variables" / "variables")
    assert result.fold.layout == "tf-keras-use-ema"
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_LIVE), run.raw[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_EMA), run.averaged[1], rtol=1e-5, atol=1e-5)


def test_tf_keras_dot_keras_file_rebuilds_its_architecture_and_serves_both_arms(run, tmp_path):
    # Epoch 1's file: fit() had not finished, so its weights are raw and optimizer/vars/N hold the averages.
    path = run.directory / "model-1.keras"
    assert not np.allclose(run.raw[0], run.averaged[0], atol=1e-3)

    for model in (None, build_mlp):  # the architecture inside the file, or the training code's factory
        result = ema_export.export(path, tmp_path / "out", model=model)
        assert result.fold.layout == "keras-file-use-ema"
        assert "Adam use_ema=True in its config.json, positions from Keras" in result.fold.layout_reason
        np.testing.assert_allclose(served(result.version_dir, SIGNATURE_LIVE), run.raw[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(served(result.version_dir, SIGNATURE_EMA), run.averaged[0], rtol=1e-5, atol=1e-5)
        assert not result.warnings


def test_tf_keras_weights_file_is_read_by_tf_keras_and_serves_both_arms(run, tmp_path):
    # A .weights.h5 records no Keras version; the tf-keras model it is restored into says which Keras reads it.
    result = ema_export.export(run.directory / "weights-1.weights.h5", tmp_path / "out", model=build_mlp)

    assert result.fold.layout == "keras-file-use-ema"
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_LIVE), run.raw[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_EMA), run.averaged[0], rtol=1e-5, atol=1e-5)


def test_tf_keras_file_with_a_keras_3_model_names_the_saver(run, tmp_path):
    import keras

    def keras_3_mlp():
        inputs = keras.Input((tm.NUM_FEATURES,), name="features")
        return keras.Model(inputs, keras.layers.Dense(tm.NUM_CLASSES)(inputs))

    with pytest.raises(ema_export.EmaExportError) as error:
        ema_export.export(run.directory / "model-1.keras", tmp_path / "out", model=keras_3_mlp)
    message = str(error.value)
    assert "saved by tf-keras (Keras 2)" in message and "only a tf-keras model can load it" in message
    assert "Omit --model" in message and "\n" not in message and "Could not locate class" not in message


def test_model_checkpoint_saved_model_directory_restored_in_parts_serves_both_arms(run, tmp_path, monkeypatch):
    """The restore's parallel read and the write's own checkpoint writer on what tf-keras fit() wrote (the MLP read
    and written as if it were large: a part per variable, two writer threads): the same answers as the one-op
    restore."""
    reads = read_in_parts(monkeypatch)
    written = written_in_shards(monkeypatch)

    result = ema_export.export(run.directory / "savedmodel-2", tmp_path / "out", model=build_mlp)

    assert [variables for _, variables in reads] == [len(build_mlp().variables)]  # each in a part of its own
    model = build_mlp()  # every variable once, and an average of each trainable one (BatchNorm statistics are shared)
    assert len(written) == 2 and sum(count for _, count in written) == len(model.variables) + len(
        model.trainable_variables)
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_LIVE), run.raw[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_EMA), run.averaged[1], rtol=1e-5, atol=1e-5)


# --- issue 23: two towers named alike, mixed precision ---------------------------------------------------------------


def _tower(inputs, name: str):
    """One tower, as a function called twice: tf-keras names its variables by layer only (`hidden/kernel` twice)."""
    hidden = tf_keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    return tf_keras.Model(inputs, tf_keras.layers.Dense(tm.NUM_CLASSES, name="out")(hidden), name=name)


def build_towers():
    tf_keras.utils.set_random_seed(5)
    left, right = tf_keras.Input((tm.NUM_FEATURES,), name="left"), tf_keras.Input((tm.NUM_FEATURES,), name="right")
    towers = [_tower(tf_keras.Input((tm.NUM_FEATURES,)), name) for name in ("tower_a", "tower_b")]
    return tf_keras.Model([left, right], tf_keras.layers.Add()([towers[0](left), towers[1](right)]))


def build_mixed_precision():
    """Built under mixed_float16, as trained (`compile` then wraps the optimizer in a LossScaleOptimizerV3)."""
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        tf_keras.utils.set_random_seed(6)
        inputs = tf_keras.Input((tm.NUM_FEATURES,), name="features")
        hidden = tf_keras.layers.Dense(tm.HIDDEN, activation="relu")(inputs)
        return tf_keras.Model(inputs, tf_keras.layers.Dense(tm.NUM_CLASSES, dtype="float32")(hidden))
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


def _inputs_of(model) -> dict[str, np.ndarray]:
    return {tensor.name.split(":")[0]: X for tensor in model.inputs}


def _both_arms(model, inputs) -> tuple[np.ndarray, np.ndarray]:
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    raw_values = [variable.numpy() for variable in model.trainable_variables]
    raw = np.asarray(model(inputs, training=False), np.float32)
    for variable, average in zip(model.trainable_variables, optimizer._model_variables_moving_average):
        variable.assign(average)
    averaged = np.asarray(model(inputs, training=False), np.float32)
    for variable, value in zip(model.trainable_variables, raw_values):
        variable.assign(value)
    return raw, averaged


def _fit_and_checkpoint(build, directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """fit() for one epoch with tf-keras's ModelCheckpoint (a SavedModel directory) and a tf.train.Checkpoint saved
    by a callback, both during training; the raw and averaged outputs computed by the model at that moment."""
    model = build()
    model.compile(optimizer=tf_keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5), loss="mse")
    rng = np.random.default_rng(7)
    x = [rng.standard_normal((32, tm.NUM_FEATURES)).astype(np.float32) for _ in model.inputs]
    y = rng.standard_normal((32, tm.NUM_CLASSES)).astype(np.float32)
    checkpoint = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=model.optimizer),
                                            str(directory / "ckpt"), 1)
    arms: list[tuple[np.ndarray, np.ndarray]] = []
    model.fit(x if len(x) > 1 else x[0], y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[
        tf_keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: (
            arms.append(_both_arms(model, [X] * len(model.inputs) if len(model.inputs) > 1 else X)),
            checkpoint.save())),
        tf_keras.callbacks.ModelCheckpoint(str(directory / "savedmodel")),
    ])
    return arms[0]


def _serve_all(version_dir, signature: str, names: list[str]) -> np.ndarray:
    function = tf.saved_model.load(str(version_dir)).signatures[signature]
    return np.asarray(function(**{name: tf.constant(X) for name in names})["output_0"], np.float32)


@pytest.mark.parametrize("build, names, tolerance", [
    (build_towers, ["left", "right"], 1e-5),
    (build_mixed_precision, ["features"], 1e-2),
], ids=["towers", "mixed_float16"])
def test_tf_keras_checkpoints_pair_averages_by_position_and_serve_both_arms(build, names, tolerance, tmp_path):
    raw, averaged = _fit_and_checkpoint(build, tmp_path)
    assert not np.allclose(raw, averaged, atol=1e-3)
    for source in ("ckpt", "savedmodel"):
        result = ema_export.export(tmp_path / source, tmp_path / "out", model=build)
        assert result.fold.layout == "tf-keras-use-ema"
        assert len(result.fold.folded) == 8 if build is build_towers else 4
        np.testing.assert_allclose(_serve_all(result.version_dir, SIGNATURE_LIVE, names), raw, rtol=tolerance,
                                   atol=tolerance)
        np.testing.assert_allclose(_serve_all(result.version_dir, SIGNATURE_EMA, names), averaged, rtol=tolerance,
                                   atol=tolerance)
