"""Training side: live and EMA checkpoints saved in lockstep, paired by step by the exporter."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

import ema_export
from ema_export.cli import cli
from ema_export.errors import CheckpointNotFoundError
from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from ema_export.training import EmaCheckpoint, EmaCheckpointer, TrainingSetupError
from support import models as tm

pytestmark = pytest.mark.slow  # every test trains and exports, some in a child process
X = np.array([[0.5, -1.0, 2.0, 1.5], [1.0, 1.0, -2.0, 0.0]], np.float32)


def train_module(ckpt_dir, saves=(10, 20, 30), max_to_keep=5):
    """A custom loop on the seed module: SGD steps, EMA after each, a pair saved at the given steps."""
    model = tm.LinearModule()
    model.weights.assign(tm.LIVE_W)
    model.biases.assign(tm.LIVE_B)
    checkpointer = EmaCheckpointer(ckpt_dir, model, decay=0.8, max_to_keep=max_to_keep)
    optimizer = keras.optimizers.SGD(0.05)
    rng = np.random.default_rng(0)
    for step in range(1, max(saves) + 1):
        inputs = rng.standard_normal((8, tm.NUM_FEATURES)).astype(np.float32)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(inputs) - 1.0))
        variables = [model.weights, model.biases]
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        checkpointer.update()
        if step in saves:
            checkpointer.save(step)
    return checkpointer


def pair_values(ckpt_dir, step):
    live = tf.train.load_checkpoint(str(Path(ckpt_dir) / f"ckpt-{step}"))
    ema = tf.train.load_checkpoint(str(Path(ckpt_dir) / "ema" / f"ckpt-{step}"))
    return ([live.get_tensor(f"model/{n}/.ATTRIBUTES/VARIABLE_VALUE") for n in ("weights", "biases")],
            [ema.get_tensor(f"ema_weights/{n}/.ATTRIBUTES/VARIABLE_VALUE") for n in ("weights", "biases")])


def served(version_dir, signature, name="inputs"):
    return tf.saved_model.load(str(version_dir)).signatures[signature](**{name: X})["output_0"].numpy()


def test_lockstep_pairs_keep_the_newest_and_export_the_latest_by_default(tmp_path):
    train_module(tmp_path / "ckpt", saves=(10, 20, 30), max_to_keep=2)
    for directory in (tmp_path / "ckpt", tmp_path / "ckpt" / "ema"):
        assert sorted(p.name for p in directory.glob("*.index")) == ["ckpt-20.index", "ckpt-30.index"]

    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)
    (live_w, live_b), (ema_w, ema_b) = pair_values(tmp_path / "ckpt", 30)
    assert not np.allclose(live_w, ema_w)
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_LIVE), tm.linear_numpy(X, live_w, live_b),
                               rtol=1e-5)
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_EMA), tm.linear_numpy(X, ema_w, ema_b),
                               rtol=1e-5)
    sources = result.manifest["sources"]
    assert (sources["training_step"], sources["ema_step"], sources["steps_match"]) == (30, 30, True)
    assert sources["training_step_source"] == "variable step"


def test_step_selects_an_older_pair_and_a_missing_one_is_explained(tmp_path):
    train_module(tmp_path / "ckpt", saves=(10, 20, 30))
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule, step=20)
    (_, _), (ema_w, ema_b) = pair_values(tmp_path / "ckpt", 20)
    np.testing.assert_allclose(served(result.version_dir, SIGNATURE_EMA), tm.linear_numpy(X, ema_w, ema_b),
                               rtol=1e-5)
    assert result.manifest["sources"]["training_step"] == 20
    with pytest.raises(CheckpointNotFoundError, match=r"No complete checkpoint pair for step 25.*10, 20, 30"):
        ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule, step=25)


CRASHING_TRAINER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import test_training
    from ema_export.training import EmaCheckpointer

    original = EmaCheckpointer.save
    def save_then_die_at_20(self, step):
        if step == 20:
            self._ema.save(checkpoint_number=step)      # the EMA half is written first...
            os.kill(os.getpid(), signal.SIGKILL)       # ...and the process dies before the training half
        return original(self, step)
    EmaCheckpointer.save = save_then_die_at_20
    test_training.train_module({ckpt!r}, saves=(10, 20, 30))
""")


def test_process_killed_between_the_two_saves_exports_the_last_complete_pair(tmp_path):
    script = CRASHING_TRAINER.format(tests=str(Path(__file__).parent), ckpt=str(tmp_path / "ckpt"))
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert completed.returncode == -signal.SIGKILL
    assert (tmp_path / "ckpt" / "ema" / "ckpt-20.index").exists()
    assert not (tmp_path / "ckpt" / "ckpt-20.index").exists()

    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)
    assert result.sources.training.prefix.endswith("ckpt-10") and result.sources.ema.prefix.endswith("ema/ckpt-10")
    assert result.manifest["sources"]["ema_step"] == 10


def test_a_newer_training_half_without_its_ema_half_is_skipped_and_said(tmp_path):
    train_module(tmp_path / "ckpt", saves=(10, 20))
    # As after a crash between two separate saves in the other order: the EMA half of step 20 was never written,
    # so its state file still names step 10. (A state file naming files that are gone is refused: see tests/unit.)
    for path in (tmp_path / "ckpt" / "ema").glob("ckpt-20*"):
        path.unlink()
    state = tmp_path / "ckpt" / "ema" / "checkpoint"
    state.write_text(state.read_text().replace("ckpt-20", "ckpt-10"))
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)
    assert result.sources.training.prefix.endswith("ckpt-10")
    assert "ckpt-20 has no EMA partner" in result.sources.training.chosen_by


def test_an_explicit_pair_from_different_steps_is_refused_unless_allowed(tmp_path):
    train_module(tmp_path / "ckpt", saves=(10, 20))
    live, ema = tmp_path / "ckpt" / "ckpt-20", tmp_path / "ckpt" / "ema" / "ckpt-10"
    runner = CliRunner()
    refused = runner.invoke(cli, [str(live), str(tmp_path / "models"), "--model", "support.models:LinearModule",
                                  "--ema-checkpoint", str(ema)])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "at step 20 (variable step) but the EMA checkpoint is at step 10" in refused.stderr
    assert "--allow-step-mismatch" in refused.stderr

    allowed = runner.invoke(cli, [str(live), str(tmp_path / "models"), "--model", "support.models:LinearModule",
                                  "--ema-checkpoint", str(ema), "--allow-step-mismatch", "--json"])
    assert allowed.exit_code == 0, allowed.output
    manifest = json.loads(allowed.stdout)
    assert manifest["policies"]["allow_step_mismatch"] is True
    assert (manifest["sources"]["training_step"], manifest["sources"]["ema_step"]) == (20, 10)
    assert manifest["sources"]["steps_match"] is False


def test_duplicate_variable_names_are_refused_at_setup(tmp_path):
    twins = tf.Module()
    twins.a, twins.b = tf.Variable(1.0, name="w"), tf.Variable(2.0, name="w")
    with pytest.raises(TrainingSetupError, match="shared by several variables"):
        EmaCheckpointer(tmp_path, twins, variables=[twins.a, twins.b])


def _fit(callback, use_ema):
    keras.backend.clear_session()
    model = tm.build_sequential()
    optimizer = keras.optimizers.Adam(0.05, use_ema=use_ema, ema_momentum=0.5)
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.default_rng(1)
    inputs = rng.standard_normal((64, tm.NUM_FEATURES)).astype(np.float32)
    targets = rng.standard_normal((64, tm.NUM_CLASSES)).astype(np.float32)
    model.fit(inputs, targets, batch_size=16, epochs=3, verbose=0, callbacks=[callback])
    return model


@pytest.mark.parametrize("kind", ["tf.train.ExponentialMovingAverage", "optimizer use_ema"])
def test_keras_callback_saves_pairs_before_fit_finalizes(tmp_path, kind):
    use_ema = kind == "optimizer use_ema"
    callback = EmaCheckpoint(tmp_path / "ckpt", decay=None if use_ema else 0.5, every_epochs=2, max_to_keep=5)
    model = _fit(callback, use_ema)
    # Epoch 2 and the last epoch (3): 4 batches each, so steps 8 and 12.
    for directory in (tmp_path / "ckpt", tmp_path / "ckpt" / "ema"):
        assert sorted(p.name for p in directory.glob("*.index")) == ["ckpt-12.index", "ckpt-8.index"]

    keras.backend.clear_session()  # the export runs in a fresh process in real use: same layer names
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.build_sequential)
    assert result.manifest["sources"]["training_step"] == 12 and result.fold.layout == "ema-checkpoint"
    live, ema = served(result.version_dir, SIGNATURE_LIVE, "features"), served(result.version_dir, SIGNATURE_EMA,
                                                                               "features")
    assert not np.allclose(live, ema)
    if use_ema:
        # fit() replaced the weights with the averages after the last save: the in-memory model is now the EMA arm,
        # and the live weights survive only in the checkpoint.
        np.testing.assert_allclose(ema, model(X, training=False).numpy(), rtol=1e-5, atol=1e-5)
        assert not result.fold.ema_equals_live
    else:
        np.testing.assert_allclose(live, model(X, training=False).numpy(), rtol=1e-5, atol=1e-5)


def test_callback_without_decay_needs_use_ema(tmp_path):
    with pytest.raises(TrainingSetupError, match="use_ema=True"):
        _fit(EmaCheckpoint(tmp_path / "ckpt"), use_ema=False)
