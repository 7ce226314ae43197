"""TF-Slim's EMA recipe: `ExponentialMovingAverage.apply(slim.get_model_variables())` averages the batch-norm
statistics too, and Slim's own evaluation restores those averages (`ema.variables_to_restore()`).

tf-slim 1.1 no longer imports beside TensorFlow 2.21 (`ops.Tensor` is gone), so the recipe is replayed with the same
TF1 calls Slim makes: model variables (trainable weights and a non-trainable running statistic, updated like
BatchNorm's moving mean) averaged by one `tf.compat.v1.train.ExponentialMovingAverage`, saved by a `Saver`. By default
the export serves the live statistics in both arms; it must say so, with the flag that serves the averages.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import ema_export
from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from support import models as tm
from support.producers import optimizer_slot as sp

pytestmark = pytest.mark.slow

X = np.array([[0.5, -1.0, 2.0, 1.5], [1.0, 1.0, -2.0, 0.0]], np.float32)


def train_slim_recipe(ckpt_dir) -> str:
    """A TF1 graph: GradientDescent on `(x - input_mean) @ weights + biases`, `input_mean` a moving average of the
    inputs (what batch norm keeps), then the EMA of every model variable, statistics included, after each step."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        weights = tf.compat.v1.get_variable("weights", initializer=tm.LIVE_W)
        biases = tf.compat.v1.get_variable("biases", initializer=tm.LIVE_B)
        input_mean = tf.compat.v1.get_variable("input_mean", initializer=np.zeros(tm.NUM_FEATURES, np.float32),
                                               trainable=False)
        tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.MODEL_VARIABLES, input_mean)
        inputs = tf.compat.v1.placeholder(tf.float32, [None, tm.NUM_FEATURES])
        update_mean = input_mean.assign(0.5 * input_mean + 0.5 * tf.reduce_mean(inputs, axis=0))
        loss = tf.reduce_mean(tf.square(tf.matmul(inputs - input_mean, weights) + biases - 1.0))
        with tf.control_dependencies([update_mean]):
            train = tf.compat.v1.train.GradientDescentOptimizer(0.1).minimize(loss)
        with tf.control_dependencies([train]):
            average = tf.compat.v1.train.ExponentialMovingAverage(0.5).apply([weights, biases, input_mean])
        session.run(tf.compat.v1.global_variables_initializer())
        rng = np.random.default_rng(0)
        for _ in range(4):
            session.run(average, {inputs: rng.standard_normal((8, tm.NUM_FEATURES)).astype(np.float32) + 1.0})
        return tf.compat.v1.train.Saver().save(session, str(ckpt_dir / "model.ckpt"), global_step=4)


def served(version_dir, signature):
    return tf.saved_model.load(str(version_dir)).signatures[signature](inputs=X)["output_0"].numpy()


def test_averaged_statistics_are_named_in_a_warning_and_served_with_bn_stats_ema(tmp_path):
    prefix = train_slim_recipe(tmp_path / "ckpt")
    reader = tf.train.load_checkpoint(prefix)
    live = [reader.get_tensor(name) for name in ("weights", "biases", "input_mean")]
    ema = [reader.get_tensor(f"{name}/ExponentialMovingAverage") for name in ("weights", "biases", "input_mean")]
    assert not np.allclose(live[2], ema[2])

    result = ema_export.export(tmp_path / "ckpt", tmp_path / "out", model=sp.StandardizedLinearModule)
    assert result.fold.layout == "tf1-names"
    assert "1 non-trainable variables have averages too (input_mean): both arms serve their live values; " \
        "--bn-stats ema serves their averages in serve_ema" in result.warnings
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_EMA),
                               sp.standardized_linear_numpy(X, ema[0], ema[1], live[2]), rtol=1e-5, atol=1e-6)

    averaged = ema_export.export(tmp_path / "ckpt", tmp_path / "out", model=sp.StandardizedLinearModule,
                                 bn_stats="ema")
    assert not any("non-trainable variables have averages" in warning for warning in averaged.warnings)
    np.testing.assert_allclose(served(averaged.version_dir, SIGNATURE_LIVE),
                               sp.standardized_linear_numpy(X, *live), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served(averaged.version_dir, SIGNATURE_EMA),
                               sp.standardized_linear_numpy(X, *ema), rtol=1e-5, atol=1e-6)
