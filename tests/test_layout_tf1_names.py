"""Layout `tf1-names`: a TF1 graph trained with `tf.compat.v1.train.ExponentialMovingAverage`, saved by a Saver."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import ema_export
from ema_export.errors import FoldError, RestoreError
from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from support import models as tm

pytestmark = pytest.mark.slow  # every test runs a full export
X = np.array([[0.5, -1.0, 2.0, 1.5], [1.0, 1.0, -2.0, 0.0]], np.float32)


def train_tf1(ckpt_dir, ema_names=(None,), zero_debias=False, steps=3, averaged_extra=False) -> str:
    """Real producer: a TF1 graph, a few GradientDescent steps, EMA(s) applied after each, Saver.save."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        weights = tf.compat.v1.get_variable("weights", initializer=tm.LIVE_W)
        biases = tf.compat.v1.get_variable("biases", initializer=tm.LIVE_B)
        inputs = tf.compat.v1.placeholder(tf.float32, [None, tm.NUM_FEATURES])
        loss = tf.reduce_mean(tf.square(tf.matmul(inputs, weights) + biases - 1.0))
        train = tf.compat.v1.train.GradientDescentOptimizer(0.1).minimize(loss)
        updates = []
        with tf.control_dependencies([train]):
            for name in ema_names:
                kwargs = {"name": name} if name else {}
                average = tf.compat.v1.train.ExponentialMovingAverage(0.5, zero_debias=zero_debias, **kwargs)
                updates.append(average.apply([weights, biases]))
            if averaged_extra:
                updates.append(tf.compat.v1.train.ExponentialMovingAverage(0.5).apply(
                    [tf.compat.v1.get_variable("unused", initializer=np.ones(2, np.float32))]))
        session.run(tf.compat.v1.global_variables_initializer())
        rng = np.random.default_rng(0)
        for _ in range(steps):
            session.run(updates, {inputs: rng.standard_normal((8, tm.NUM_FEATURES)).astype(np.float32)})
        return tf.compat.v1.train.Saver().save(session, str(ckpt_dir / "model.ckpt"), global_step=steps)


def served(version_dir, signature):
    return tf.saved_model.load(str(version_dir)).signatures[signature](inputs=X)["output_0"].numpy()


@pytest.mark.parametrize("ema_name", [None, "smoothed"], ids=["default-name", "custom-name"])
def test_name_based_checkpoint_restores_by_name_and_folds(tmp_path, ema_name):
    prefix = train_tf1(tmp_path / "ckpt", ema_names=(ema_name,))
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule, ema_name=ema_name)

    suffix = ema_name or "ExponentialMovingAverage"
    reader = tf.train.load_checkpoint(prefix)
    live_w, live_b = reader.get_tensor("weights"), reader.get_tensor("biases")
    ema_w, ema_b = reader.get_tensor(f"weights/{suffix}"), reader.get_tensor(f"biases/{suffix}")
    assert not np.allclose(live_w, ema_w)
    assert result.fold.layout == "tf1-names" and "name-based" in result.fold.layout_reason
    assert "name-based" in result.attachment
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_LIVE), tm.linear_numpy(X, live_w, live_b),
                               rtol=1e-5)
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_EMA), tm.linear_numpy(X, ema_w, ema_b),
                               rtol=1e-5)


def test_zero_debias_bookkeeping_is_not_taken_for_shadows(tmp_path):
    train_tf1(tmp_path / "ckpt", zero_debias=True)
    result = ema_export.dry_run(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)
    assert sorted(item.shadow_key for item in result.fold.folded) == ["biases/ExponentialMovingAverage",
                                                                     "weights/ExponentialMovingAverage"]


def test_two_emas_over_one_variable_are_ambiguous_not_guessed(tmp_path):
    train_tf1(tmp_path / "ckpt", ema_names=(None, None))
    with pytest.raises(FoldError) as error:
        ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)
    message = str(error.value)
    assert "ambiguous shadows for weights" in message
    assert "weights/ExponentialMovingAverage, weights/ExponentialMovingAverage_1" in message
    assert "--ema-name" in message
    # Naming one of them resolves it.
    result = ema_export.dry_run(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule,
                                ema_name="ExponentialMovingAverage_1")
    assert {item.shadow_key for item in result.fold.folded} == {"weights/ExponentialMovingAverage_1",
                                                                "biases/ExponentialMovingAverage_1"}


def test_model_that_does_not_fit_the_names_is_a_restore_error(tmp_path):
    train_tf1(tmp_path / "ckpt")
    with pytest.raises(RestoreError, match="cannot be restored by name"):
        ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.build_sequential)


def test_shadow_of_a_variable_the_model_lacks_is_reported(tmp_path):
    train_tf1(tmp_path / "ckpt", averaged_extra=True)
    with pytest.raises(FoldError, match="extra shadows match no model variable: unused/ExponentialMovingAverage"):
        ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)
