"""Layout `tracked-shadows`: `tf.train.Checkpoint(model=..., ema=[ema.average(v) ...])`, one checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import ema_export
from ema_export.errors import LayoutError
from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from support import models as tm

pytestmark = pytest.mark.slow  # every test runs a full export
X = np.array([[0.5, -1.0, 2.0, 1.5], [1.0, 1.0, -2.0, 0.0]], np.float32)


def train_and_save(ckpt_dir, container: str, steps: int = 4) -> str:
    """Real producer: a few SGD steps on the seed module with an EMA kept after each, one checkpoint for both."""
    model = tm.LinearModule()
    variables = [model.weights, model.biases]
    for variable, value in zip(variables, (tm.LIVE_W, tm.LIVE_B)):
        variable.assign(value)
    average = tf.train.ExponentialMovingAverage(decay=0.5)
    average.apply(variables)
    optimizer = tf.keras.optimizers.SGD(0.1)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        inputs = rng.standard_normal((8, tm.NUM_FEATURES)).astype(np.float32)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(inputs)))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        average.apply(variables)
    shadows = [average.average(v) for v in variables]
    tracked = {"list": shadows, "dict": {v.name: average.average(v) for v in variables}}[container]
    return tf.train.Checkpoint(model=model, ema=tracked).save(str(ckpt_dir / "ckpt"))


def values(prefix, *keys):
    reader = tf.train.load_checkpoint(prefix)
    return [reader.get_tensor(key) for key in keys]


@pytest.mark.parametrize("container", ["list", "dict"])
def test_shadows_beside_the_model_are_detected_and_folded(tmp_path, container):
    prefix = train_and_save(tmp_path / "ckpt", container)
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)

    assert result.fold.layout == "tracked-shadows"
    assert "outside the model (under ema)" in result.fold.layout_reason
    assert result.attachment == "model"
    live_w, live_b = values(prefix, "model/weights/.ATTRIBUTES/VARIABLE_VALUE", "model/biases/.ATTRIBUTES/VARIABLE_VALUE")
    shadow_keys = [item.shadow_key for item in sorted(result.fold.folded, key=lambda item: item.name, reverse=True)]
    ema_w, ema_b = values(prefix, *shadow_keys)
    assert not np.allclose(live_w, ema_w)
    loaded = tf.saved_model.load(str(result.version_dir))
    np.testing.assert_allclose(loaded.signatures[SIGNATURE_LIVE](inputs=X)["output_0"],
                               tm.linear_numpy(X, live_w, live_b), rtol=1e-5)
    np.testing.assert_allclose(loaded.signatures[SIGNATURE_EMA](inputs=X)["output_0"],
                               tm.linear_numpy(X, ema_w, ema_b), rtol=1e-5)


def test_forcing_the_layout_and_a_checkpoint_without_any_ema(tmp_path):
    train_and_save(tmp_path / "with", "list")
    result = ema_export.dry_run(tmp_path / "with", tmp_path / "models", model=tm.LinearModule,
                                layout="tracked-shadows")
    assert result.fold.layout == "tracked-shadows" and result.fold.layout_reason.startswith("chosen with --layout")
    assert not (tmp_path / "models").exists()

    model = tm.LinearModule()
    tf.train.Checkpoint(model=model).save(str(tmp_path / "without" / "ckpt"))
    with pytest.raises(LayoutError) as error:
        ema_export.export(tmp_path / "without", tmp_path / "models", model=tm.LinearModule)
    message = str(error.value)
    assert "No EMA shadows found" in message
    for name in ("ema-checkpoint", "tracked-shadows"):
        assert name in message
