"""Layout `keras-file-use-ema`: Keras 3 `use_ema=True` averages in `.keras` and `.weights.h5` files."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import ema_export
from ema_export.errors import LayoutError, RestoreError
from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from support import models as tm
from support.producers import keras_ema as kp

pytestmark = pytest.mark.slow  # every test trains a model and exports it
AVERAGES = [f"optimizer/vars/{i}" for i in range(2, 8)]
"""Adam with a float learning rate: step counter, learning rate, then the six averages in model order."""


def fit_with_checkpoint(path, build=tm.build_functional, optimizer=None):
    """Real producer: fit() for two epochs with ModelCheckpoint, which saves at each epoch's end (before fit()
    copies the averages into the weights). Returns the trained model."""
    model = kp.compiled(build, optimizer)
    inputs, targets = kp.fit_arrays()
    checkpoint = keras.callbacks.ModelCheckpoint(str(path), save_weights_only=str(path).endswith(".weights.h5"))
    model.fit(inputs, targets, batch_size=8, epochs=2, verbose=0, callbacks=[checkpoint])
    return model


def expected_outputs(path) -> tuple[np.ndarray, np.ndarray]:
    """(live, ema) outputs from the values stored in the file."""
    values = kp.h5_values(path)
    statistics = [values[key] for key in kp.MLP_STATISTICS]
    return (kp.mlp_outputs([values[key] for key in kp.MLP_LAYERS], statistics),
            kp.mlp_outputs([values[key] for key in AVERAGES], statistics))


@pytest.mark.parametrize("filename, evidence", [
    ("ckpt.weights.h5", "no optimizer config is recorded, so they were found by shape"),
    ("ckpt.keras", "Adam use_ema=True in its config.json, positions from Keras"),
])
def test_averages_in_keras_files_are_detected_and_served(filename, evidence, tmp_path):
    fit_with_checkpoint(tmp_path / "ckpt" / filename)

    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.build_functional)

    assert result.fold.layout == "keras-file-use-ema"
    assert "stores 6 use_ema averages at optimizer/vars/2-7" in result.fold.layout_reason
    assert evidence in result.fold.layout_reason
    assert result.sources.training.prefix.endswith(filename) and result.attachment.startswith("Keras file")
    live, ema = expected_outputs(tmp_path / "ckpt" / filename)
    assert not np.allclose(live, ema, atol=1e-3)
    np.testing.assert_allclose(kp.serve(result.version_dir, SIGNATURE_LIVE), live, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kp.serve(result.version_dir, SIGNATURE_EMA), ema, rtol=1e-5, atol=1e-5)
    assert [item.shadow_key for item in result.fold.folded] == AVERAGES and not result.fold.warnings
    assert [item.path for item in result.fold.kept_live] == kp.MLP_STATISTICS
    assert all(item.name.endswith(("/moving_mean", "/moving_variance")) for item in result.fold.kept_live)


def test_model_saved_after_fit_is_reported(tmp_path):
    model = kp.compiled(tm.build_sequential)
    model.fit(*kp.fit_arrays(), batch_size=8, epochs=2, verbose=0)
    model.save(tmp_path / "final.keras")

    result = ema_export.dry_run(tmp_path / "final.keras", tmp_path / "models", model=tm.build_sequential)

    assert result.fold.layout == "keras-file-use-ema" and result.fold.ema_equals_live
    finalized = [w for w in result.fold.warnings if "finalize_variable_values" in w]
    assert len(finalized) == 1 and "ran 8 steps" in finalized[0] and "ModelCheckpoint" in finalized[0]


def build_compiled_sgd_ema():
    """A factory that compiles, as training code's builder often does: the optimizer's config comes with it."""
    model = tm.build_sequential()
    model.compile(optimizer=keras.optimizers.SGD(0.05, use_ema=True), loss="mse")
    return model


def test_weights_file_that_cannot_tell_averages_from_momentums_is_an_error_unless_the_optimizer_is_known(tmp_path):
    # SGD without momentum keeps no slots, so its file holds exactly one value per variable after the step
    # counter and learning rate: just what SGD(momentum=0.9) without use_ema stores.
    fit_with_checkpoint(tmp_path / "ckpt.weights.h5", tm.build_sequential, keras.optimizers.SGD(0.05, use_ema=True))

    with pytest.raises(LayoutError) as error:
        ema_export.dry_run(tmp_path / "ckpt.weights.h5", tmp_path / "models", model=tm.build_sequential)
    message = str(error.value)
    assert "Cannot tell where the use_ema averages are" in message and "2 readings" in message
    assert "use_ema averages of a slot-free optimizer (SGD without momentum) at optimizer/vars/2-7" in message
    assert "the momentums of SGD(momentum>0) without use_ema at optimizer/vars/2-7" in message
    assert "Save a .keras file" in message and "--model return the model compiled" in message

    result = ema_export.dry_run(tmp_path / "ckpt.weights.h5", tmp_path / "models", model=build_compiled_sgd_ema)
    assert "SGD use_ema=True in the compiled model from --model" in result.fold.layout_reason
    values = kp.h5_values(tmp_path / "ckpt.weights.h5")
    reported = {item.shadow_key: item.relative_l2 for item in result.fold.folded}
    for layer_key, average_key in zip(kp.MLP_LAYERS, AVERAGES):
        live, average = values[layer_key], values[average_key]
        assert reported[average_key] == pytest.approx(np.linalg.norm(average - live) / np.linalg.norm(live), rel=1e-5)


def test_forcing_the_layout_and_files_it_does_not_fit(tmp_path):
    fit_with_checkpoint(tmp_path / "ckpt.weights.h5", tm.build_sequential)
    forced = ema_export.dry_run(tmp_path / "ckpt.weights.h5", tmp_path / "models", model=tm.build_sequential,
                                layout="keras-file-use-ema")
    assert forced.fold.layout_reason.startswith("chosen with --layout (") and "optimizer/vars/2-7" in \
        forced.fold.layout_reason

    tm.write_seed_checkpoints(tmp_path / "tf_checkpoint")
    with pytest.raises(LayoutError, match="No use_ema averages") as error:
        ema_export.dry_run(tmp_path / "tf_checkpoint", tmp_path / "models", model=tm.LinearModule,
                           layout="keras-file-use-ema")
    assert "Received: not a Keras file" in str(error.value)

    def wider():
        return keras.Sequential([keras.Input((tm.NUM_FEATURES,), name="features"), keras.layers.Dense(7),
                                 keras.layers.BatchNormalization(), keras.layers.ReLU(),
                                 keras.layers.Dense(tm.NUM_CLASSES)])

    with pytest.raises(RestoreError, match="model variables have another shape than in .*pass the --model that was trained"):
        ema_export.dry_run(tmp_path / "ckpt.weights.h5", tmp_path / "models", model=wider)
    with pytest.raises(RestoreError, match="only a Keras 3 model can load it"):
        ema_export.dry_run(tmp_path / "ckpt.weights.h5", tmp_path / "models", model=tm.LinearModule)
