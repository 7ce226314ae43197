"""Layout `keras-use-ema`: Keras 3 `use_ema=True`, saved as `tf.train.Checkpoint(model=..., optimizer=...)`."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import ema_export
from ema_export.errors import FoldError, LayoutError
from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from support import models as tm
from support.producers import keras_ema as kp

pytestmark = pytest.mark.slow  # every test trains a model and exports it


def save(model, directory, with_optimizer: bool = True, **extra) -> str:
    """What Keras training code saves: the model and its optimizer (plus anything else it tracks). A compiled
    Keras 3 model tracks its optimizer itself, so saving the model alone keeps the averages too."""
    tracked = dict(model=model, optimizer=model.optimizer) if with_optimizer else dict(model=model)
    checkpoint = tf.train.Checkpoint(**tracked, **extra)
    return tf.train.CheckpointManager(checkpoint, str(directory), max_to_keep=3).save()


def expected_outputs(prefix: str, model) -> tuple[np.ndarray, np.ndarray]:
    """(live, ema) outputs from the checkpoint's values: averages by the names Keras records for them, live values
    by the entry holding each (a subclassed model records one tf.Variable name for several variables)."""
    reader = tf.train.load_checkpoint(prefix)
    averages = kp.checkpoint_values(prefix)

    def live(variables):
        return [reader.get_tensor(tm._key_holding(prefix, v.numpy())) for v in variables]

    statistics = live(model.non_trainable_variables)
    ema = [averages[kp.keras_average_name(model.optimizer.name, v.path)] for v in model.trainable_variables]
    return kp.mlp_outputs(live(model.trainable_variables), statistics), kp.mlp_outputs(ema, statistics)


@pytest.mark.parametrize("kind, with_optimizer, place", [("functional", True, "optimizer"),
                                                          ("subclassed", False, "model/optimizer")])
def test_averages_are_paired_by_position_and_served(kind, with_optimizer, place, tmp_path):
    build = tm.KERAS_BUILDERS[kind]
    model = kp.train_on_batches(kp.compiled(build))
    prefix = save(model, tmp_path / "ckpt", with_optimizer)

    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=build,
                               input_signature=["features:float32:[None,4]"] if kind == "subclassed" else None)

    assert result.fold.layout == "keras-use-ema"
    assert "6 Keras 3 optimizer averages" in result.fold.layout_reason
    assert "paired by position with _trainable_variables" in result.fold.layout_reason
    assert f"under {place}," in result.fold.layout_reason
    live, ema = expected_outputs(prefix, model)
    assert not np.allclose(live, ema, atol=1e-3)
    np.testing.assert_allclose(kp.serve(result.version_dir, SIGNATURE_LIVE), live, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kp.serve(result.version_dir, SIGNATURE_EMA), ema, rtol=1e-5, atol=1e-5)
    assert all(item.shadow_key.startswith(f"{place}/_variables/") for item in result.fold.folded)
    assert len(result.fold.folded) == 6 and not result.fold.warnings


def test_forcing_the_layout_and_a_model_trained_without_use_ema(tmp_path):
    save(kp.train_on_batches(kp.compiled(tm.build_sequential)), tmp_path / "ema")
    forced = ema_export.dry_run(tmp_path / "ema", tmp_path / "models", model=tm.build_sequential,
                                layout="keras-use-ema")
    assert forced.fold.layout == "keras-use-ema"
    assert forced.fold.layout_reason.startswith("chosen with --layout (") and "optimizer averages" in \
        forced.fold.layout_reason

    save(kp.train_on_batches(kp.compiled(tm.build_sequential, keras.optimizers.Adam(0.05))), tmp_path / "plain")
    with pytest.raises(LayoutError, match="No EMA shadows found") as detected:
        ema_export.dry_run(tmp_path / "plain", tmp_path / "models", model=tm.build_sequential)
    assert "keras-use-ema" in str(detected.value)
    with pytest.raises(LayoutError) as forced_error:
        ema_export.dry_run(tmp_path / "plain", tmp_path / "models", model=tm.build_sequential,
                           layout="keras-use-ema")
    message = str(forced_error.value)
    assert "No Keras 3 use_ema averages" in message and "use_ema=True" in message and "Received:" in message


def test_checkpoint_written_after_fit_is_reported_and_one_written_during_fit_is_not(tmp_path):
    model = kp.compiled(tm.build_sequential)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=model.optimizer),
                                         str(tmp_path / "during"), max_to_keep=3)
    inputs, targets = kp.fit_arrays()
    model.fit(inputs, targets, batch_size=8, epochs=2, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: manager.save())])
    save(model, tmp_path / "after")

    during = ema_export.dry_run(tmp_path / "during", tmp_path / "models", model=tm.build_sequential)
    assert not during.fold.warnings and not during.fold.ema_equals_live

    after = ema_export.dry_run(tmp_path / "after", tmp_path / "models", model=tm.build_sequential)
    assert after.fold.layout == "keras-use-ema" and after.fold.ema_equals_live
    finalized = [w for w in after.fold.warnings if "finalize_variable_values" in w]
    assert len(finalized) == 1
    assert "ran 8 steps" in finalized[0] and "after fit() returned" in finalized[0]
    assert "ModelCheckpoint" in finalized[0] and "on_epoch_end" in finalized[0] and "SwapEMAWeights" in finalized[0]


def test_two_averages_for_one_variable_are_an_error_listing_both(tmp_path):
    model = kp.train_on_batches(kp.compiled(tm.build_functional))
    head_optimizer = keras.optimizers.SGD(0.1, use_ema=True)
    head = model.layers[-1].trainable_variables
    inputs, targets = kp.batches(1)[0]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(inputs) - targets))
    head_optimizer.apply_gradients(zip(tape.gradient(loss, head), head))
    save(model, tmp_path / "ckpt", head_optimizer=head_optimizer)

    with pytest.raises(FoldError) as error:
        ema_export.dry_run(tmp_path / "ckpt", tmp_path / "models", model=tm.build_functional)
    message = str(error.value)
    assert message.count("two averages for one variable") == 2
    for variable in head:
        assert f"{variable.path} is averaged by both" in message
        assert repr(kp.keras_average_name(model.optimizer.name, variable.path)) in message
        assert repr(kp.keras_average_name(head_optimizer.name, variable.path)) in message
    assert "head_optimizer/_variables/" in message


class Scale(keras.layers.Layer):
    """A layer whose weight `proj_kernel`, in a layer named `head`, flattens like the kernel of a layer `head_proj`."""

    def build(self, input_shape):
        self.proj_kernel = self.add_weight(name="proj_kernel", shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.proj_kernel


def build_colliding():
    inputs = keras.Input((tm.NUM_FEATURES,), name="features")
    hidden = keras.layers.Dense(tm.NUM_CLASSES, name="head_proj")(inputs)
    return keras.Model(inputs, Scale(name="head")(hidden), name="colliding")


def test_a_flattened_name_two_variables_share_is_paired_by_position_and_reported(tmp_path):
    model = kp.train_on_batches(kp.compiled(build_colliding))
    assert {v.path.replace("/", "_") for v in model.trainable_variables} == {"head_proj_kernel", "head_proj_bias"}
    save(model, tmp_path / "ckpt")
    model.optimizer.finalize_variable_values(model.trainable_variables)  # Keras's own pairing, to compare with
    averages = {v.path: v.numpy() for v in model.trainable_variables}

    result = ema_export.dry_run(tmp_path / "ckpt", tmp_path / "models", model=build_colliding)

    reader = tf.train.load_checkpoint(str(tf.train.latest_checkpoint(str(tmp_path / "ckpt"))))
    assert {item.name for item in result.fold.folded} == set(averages)
    for item in result.fold.folded:
        np.testing.assert_array_equal(reader.get_tensor(item.shadow_key), averages[item.name])
    collisions = [w for w in result.fold.warnings if "flattens the paths of 2 variables" in w]
    assert len(collisions) == 2
    assert all("head_proj/kernel" in w and "head/proj_kernel" in w for w in collisions)
