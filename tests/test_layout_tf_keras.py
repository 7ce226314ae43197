"""Layout `tf-keras-use-ema`: tf-keras (Keras 2) optimizers with `use_ema=True`, averages `<opt>/average/<var>`.

tf-keras optimizers train plain `tf.Variable`s, so the model is the seed's `tf.Module` (the exporter does not take
tf-keras models), trained by a custom loop the way Keras 2 training code applies gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import ema_export
from ema_export.errors import FoldError, LayoutError
from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from support import models as tm
from support.producers import keras_ema as kp

pytestmark = pytest.mark.slow  # every test trains a model and exports it
X = kp.X


def train(model: tf.Module, variables: list[tf.Variable], num_steps: int = 4):
    """Real producer: tf-keras Adam with use_ema, a few custom-loop steps."""
    optimizer = tf_keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5)
    for inputs, targets in kp.batches(num_steps):
        with tf.GradientTape() as tape:
            outputs = model(inputs)
            loss = tf.reduce_mean(tf.square(outputs - targets[:, : outputs.shape[-1]]))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return optimizer


def train_linear(ckpt_dir, finalize: bool = False) -> str:
    model = tm.LinearModule()
    variables = [model.weights, model.biases]
    for variable, value in zip(variables, (tm.LIVE_W, tm.LIVE_B)):
        variable.assign(value)
    optimizer = train(model, variables)
    if finalize:
        optimizer.finalize_variable_values(variables)  # what tf-keras fit() does when it ends
    return tf.train.Checkpoint(weights=model.weights, biases=model.biases, optimizer=optimizer).save(
        str(ckpt_dir / "ckpt"))


def test_averages_are_matched_by_variable_name_and_served(tmp_path):
    prefix = train_linear(tmp_path / "ckpt")

    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)

    assert result.fold.layout == "tf-keras-use-ema"
    assert "2 tf-keras optimizer averages" in result.fold.layout_reason
    assert "'Adam/average/" in result.fold.layout_reason and "matched by variable name" in result.fold.layout_reason
    assert result.attachment == "checkpoint root"
    values = kp.checkpoint_values(prefix)
    live = tm.linear_numpy(X, values["weights"], values["biases"])
    ema = tm.linear_numpy(X, values["Adam/average/weights"], values["Adam/average/biases"])
    assert not np.allclose(live, ema, atol=1e-3)
    np.testing.assert_allclose(kp.serve(result.version_dir, SIGNATURE_LIVE, X, "inputs"), live, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kp.serve(result.version_dir, SIGNATURE_EMA, X, "inputs"), ema, rtol=1e-5, atol=1e-6)
    assert not result.fold.warnings


def test_forcing_each_keras_layout(tmp_path):
    train_linear(tmp_path / "ckpt")
    forced = ema_export.dry_run(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule,
                                layout="tf-keras-use-ema")
    assert forced.fold.layout == "tf-keras-use-ema" and forced.fold.layout_reason.startswith("chosen with --layout (")
    # tf-keras tracks no list of trained variables, which is what the Keras 3 layout pairs by.
    with pytest.raises(LayoutError, match="No Keras 3 use_ema averages"):
        ema_export.dry_run(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule, layout="keras-use-ema")


class TwoKernels(tf.Module):
    """Two variables both named `kernel`, as two layers of hand-written tf.Variables often are."""

    def __init__(self) -> None:
        super().__init__(name="two_kernels")
        self.first = tf.Variable(tf.fill([tm.NUM_FEATURES, tm.NUM_CLASSES], 0.5), name="kernel")
        self.second = tf.Variable(tf.eye(tm.NUM_CLASSES), name="kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, tm.NUM_FEATURES], tf.float32, name="inputs")])
    def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.matmul(tf.matmul(inputs, self.first), self.second)


def test_an_average_whose_name_two_variables_share_is_an_error_listing_both(tmp_path):
    model = TwoKernels()
    optimizer = train(model, [model.first, model.second])
    tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(tmp_path / "ckpt" / "ckpt"))

    with pytest.raises(FoldError) as error:
        ema_export.dry_run(tmp_path / "ckpt", tmp_path / "models", model=TwoKernels)
    message = str(error.value)
    # A tf.Module's trainable_variables are sorted by attribute, not in the order training gave the optimizer: the
    # averages cannot be paired by position, and the shared name is one problem.
    assert message.count("are named 'kernel', the name of 2 variables (first, second)") == 1
    assert "optimizer/_variables/1/" in message and "optimizer/_variables/2/" in message


def test_averages_copied_into_the_weights_are_reported(tmp_path):
    train_linear(tmp_path / "ckpt", finalize=True)
    result = ema_export.dry_run(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)
    assert result.fold.layout == "tf-keras-use-ema" and result.fold.ema_equals_live
    finalized = [w for w in result.fold.warnings if "finalize_variable_values" in w]
    assert len(finalized) == 1 and "ran 4 steps" in finalized[0] and "ModelCheckpoint" in finalized[0]
