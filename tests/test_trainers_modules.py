"""Plain TensorFlow training code: a `tf.Module` restored from a TF1 `Saver` checkpoint by names (item 8 of issue 9),
and averages that belong to another model (item 3)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import ema_export
from ema_export.errors import FoldError
from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from support import models as tm

X = np.array([[0.5, -1.0, 2.0, 1.5], [1.0, 1.0, -2.0, 0.0]], np.float32)


class ScopedLinear(tf.Module):
    """Attributes `kernel` and `bias` holding variables named after a TF1 scope, `linear/kernel` and `linear/bias`:
    their names and their attribute paths differ."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = tf.Variable(tf.zeros([tm.NUM_FEATURES, tm.NUM_CLASSES]), name="linear/kernel")
        self.bias = tf.Variable(tf.zeros([tm.NUM_CLASSES]), name="linear/bias")

    @tf.function(input_signature=[tf.TensorSpec([None, tm.NUM_FEATURES], tf.float32, name="inputs")])
    def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.matmul(inputs, self.kernel) + self.bias


def train_scoped_tf1(ckpt_dir) -> str:
    """Real producer: a TF1 graph under `variable_scope("linear")`, EMA applied after each step, Saver.save."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        with tf.compat.v1.variable_scope("linear"):
            kernel = tf.compat.v1.get_variable("kernel", initializer=tm.LIVE_W)
            bias = tf.compat.v1.get_variable("bias", initializer=tm.LIVE_B)
        inputs = tf.compat.v1.placeholder(tf.float32, [None, tm.NUM_FEATURES])
        loss = tf.reduce_mean(tf.square(tf.matmul(inputs, kernel) + bias - 1.0))
        train = tf.compat.v1.train.GradientDescentOptimizer(0.1).minimize(loss)
        with tf.control_dependencies([train]):
            update = tf.compat.v1.train.ExponentialMovingAverage(0.5).apply([kernel, bias])
        session.run(tf.compat.v1.global_variables_initializer())
        rng = np.random.default_rng(0)
        for _ in range(3):
            session.run(update, {inputs: rng.standard_normal((8, tm.NUM_FEATURES)).astype(np.float32)})
        return tf.compat.v1.train.Saver().save(session, str(ckpt_dir / "model.ckpt"), global_step=3)


def test_scoped_variable_names_in_a_module_follow_attribute_paths(tmp_path):
    prefix = train_scoped_tf1(tmp_path / "ckpt")
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "out", model=ScopedLinear)
    reader = tf.train.load_checkpoint(prefix)
    loaded = tf.saved_model.load(str(result.version_dir))
    for signature, suffix in ((SIGNATURE_LIVE, ""), (SIGNATURE_EMA, "/ExponentialMovingAverage")):
        expected = tm.linear_numpy(X, reader.get_tensor("linear/kernel" + suffix),
                                   reader.get_tensor("linear/bias" + suffix))
        np.testing.assert_allclose(loaded.signatures[signature](inputs=X)["output_0"].numpy(), expected, rtol=1e-5)
    assert {item.name for item in result.fold.folded} == {"linear/kernel", "linear/bias"}


def test_no_allow_missing_hint_when_no_variable_has_a_shadow(tmp_path):
    """Averages of another model (every name differs): a misread checkpoint, where --allow-missing would serve the
    raw weights as "EMA". The error must not suggest it (item 3 of issue 9)."""
    live_prefix, _ = tm.write_seed_checkpoints(tmp_path / "seed")
    variables = [tf.Variable(tf.zeros([tm.NUM_FEATURES, 8]), name="dense/kernel"), tf.Variable(tf.zeros([8]),
                                                                                           name="dense/bias")]
    average = tf.train.ExponentialMovingAverage(decay=0.9)
    average.apply(variables)
    tf.train.Checkpoint(ema_weights={v.name: average.average(v) for v in variables}).save(str(tmp_path / "ema" / "c"))

    with pytest.raises(FoldError) as error:
        ema_export.export(live_prefix, tmp_path / "out", model=tm.LinearModule, ema_checkpoint=tmp_path / "ema")
    message = str(error.value)
    assert "missing shadow for 2 trainable variables" in message
    assert "allow-missing" not in message
