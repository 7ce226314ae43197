"""tf-keras (Keras 2) models as the model being exported: the seed EMA layout and tf-keras `use_ema`."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import ema_export
from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from support import models as tm

pytestmark = pytest.mark.slow  # every test trains a model and exports it
tf_keras = pytest.importorskip("tf_keras")

X = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0], [4.0, 0.25, -0.5, -1.0]], np.float32)


def build_tf_keras_mlp():
    return tf_keras.Sequential([
        tf_keras.layers.Dense(tm.HIDDEN, input_shape=(tm.NUM_FEATURES,)),
        tf_keras.layers.BatchNormalization(),
        tf_keras.layers.ReLU(),
        tf_keras.layers.Dense(tm.NUM_CLASSES),
    ])


def randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for variable in model.variables:
        value = rng.standard_normal(variable.shape).astype(np.float32)
        variable.assign(np.abs(value) + 0.5 if "variance" in variable.name else value)


def expected(prefix, trainable_keys, statistics_keys, reader_prefix=None):
    live = tf.train.load_checkpoint(prefix)
    values = tf.train.load_checkpoint(reader_prefix or prefix)
    k1, b1, gamma, beta, k2, b2 = (values.get_tensor(key) for key in trainable_keys)
    mean, variance = (live.get_tensor(key) for key in statistics_keys)
    return tm.mlp_numpy(X, k1, b1, gamma, beta, mean, variance, k2, b2)


def served(version_dir, signature):
    loaded = tf.saved_model.load(str(version_dir))
    function = loaded.signatures[signature]
    (name,) = function.structured_input_signature[1]
    return function(**{name: tf.constant(X)})["output_0"].numpy()


def test_tf_keras_model_with_a_separate_ema_checkpoint(tmp_path):
    model = build_tf_keras_mlp()
    randomize(model)
    average = tf.train.ExponentialMovingAverage(decay=0.9)
    average.apply(model.trainable_variables)
    for variable in model.trainable_variables:
        average.average(variable).assign(variable * 0.5 - 0.25)
    live_prefix = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt" / "ckpt"))
    ema_prefix = tf.train.Checkpoint(
        ema_weights={v.name: average.average(v) for v in model.trainable_variables}).save(
        str(tmp_path / "ckpt" / "ema" / "ckpt"))
    trainable = [tm._key_holding(live_prefix, v.numpy()) for v in model.trainable_variables]
    statistics = [tm._key_holding(live_prefix, v.numpy()) for v in model.non_trainable_variables]
    shadows = [tm._key_holding(ema_prefix, average.average(v).numpy()) for v in model.trainable_variables]

    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=build_tf_keras_mlp)

    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_LIVE), expected(live_prefix, trainable, statistics),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_EMA),
                               expected(live_prefix, shadows, statistics, reader_prefix=ema_prefix),
                               rtol=1e-5, atol=1e-5)
    assert len(result.fold.folded) == 6 and len(result.fold.kept_live) == 2
    # 8 live variables and 6 averages; the EMA copy reads the live BatchNorm statistics, so they are stored once.
    stored = [k for k, _ in tf.train.list_variables(str(result.version_dir / "variables" / "variables"))]
    assert len(stored) == 1 + 8 + 6


def test_tf_keras_model_trained_with_use_ema(tmp_path):
    model = build_tf_keras_mlp()
    randomize(model, seed=1)
    optimizer = tf_keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5)
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.default_rng(2)
    for _ in range(4):  # checkpoint during training: fit() would copy the averages into the weights at its end
        model.train_on_batch(rng.standard_normal((16, tm.NUM_FEATURES)).astype(np.float32),
                             rng.standard_normal((16, tm.NUM_CLASSES)).astype(np.float32))
    prefix = tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(tmp_path / "ckpt" / "ckpt"))
    averages = optimizer._model_variables_moving_average
    trainable = [tm._key_holding(prefix, v.numpy()) for v in model.trainable_variables]
    statistics = [tm._key_holding(prefix, v.numpy()) for v in model.non_trainable_variables]
    shadows = [tm._key_holding(prefix, a.numpy()) for a in averages]

    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=build_tf_keras_mlp)

    assert result.fold.layout == "tf-keras-use-ema"
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_LIVE), expected(prefix, trainable, statistics),
                               rtol=1e-5, atol=1e-5)
    ema = expected(prefix, shadows, statistics)
    assert not np.allclose(ema, served(result.version_dir, SIGNATURE_LIVE))
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_EMA), ema, rtol=1e-5, atol=1e-5)
