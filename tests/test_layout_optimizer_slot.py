"""The `optimizer-slot` layout: `average` slots of moving-average optimizer wrappers, on checkpoints they wrote.

The producers (`support.producers.optimizer_slot`) train a few real steps with Model Garden's own
`ExponentialMovingAverage` and a TF Addons-style wrapper and checkpoint through TensorFlow; expected outputs are
computed in numpy from the values read back from those files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import ema_export
from ema_export.errors import FoldError, LayoutError
from ema_export.fresh_model import build_fresh_model
from ema_export.layouts.optimizer_slot import OptimizerSlotLayout
from ema_export.locate import locate
from ema_export.names import SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE
from ema_export.read import read_checkpoints
from ema_export.restore import restore
from support import models as tm
from support.producers import optimizer_slot as sp

pytestmark = pytest.mark.slow  # every test runs a full export
X = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0], [4.0, 0.25, -0.5, -1.0]], np.float32)
LAYOUT = OptimizerSlotLayout.name


def value_key(path: str) -> str:
    return f"{path}/.ATTRIBUTES/VARIABLE_VALUE"


def average_key(path: str, optimizer: str = "optimizer") -> str:
    return f"{path}/.OPTIMIZER_SLOT/{optimizer}/average/.ATTRIBUTES/VARIABLE_VALUE"


def read(prefix, key: str) -> np.ndarray:
    return tf.train.load_checkpoint(str(prefix)).get_tensor(key)


def serve(version_dir, signature: str, inputs: np.ndarray) -> np.ndarray:
    loaded = tf.saved_model.load(str(version_dir))
    return loaded.signatures[signature](inputs=tf.constant(inputs))["output_0"].numpy()


def expected_linear(prefix, root: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(live, ema) outputs of the linear model from the weights and `average` slots stored in `prefix`."""
    live = [read(prefix, value_key(root + name)) for name in ("weights", "biases")]
    ema = [read(prefix, average_key(root + name)) for name in ("weights", "biases")]
    return tm.linear_numpy(X, *live), tm.linear_numpy(X, *ema)


def detect(checkpoint, model=tm.LinearModule) -> str | None:
    """What the layout's auto-detection says about a checkpoint, after the stages that run before it."""
    sources = locate(checkpoint)
    indexes = read_checkpoints(sources)
    restored = restore(build_fresh_model(sources.checkpoint_dir, model, None), sources.training, indexes.training)
    return OptimizerSlotLayout().detect(indexes, restored)


def nothing_published(out_dir) -> bool:
    return not out_dir.exists() or not any(out_dir.iterdir())


# --- The producers are faithful to the wrappers they stand in for ----------------------------------------------


def test_tfa_style_average_starts_at_the_variable_and_follows_each_step(tmp_path):
    run = sp.write_tfa_checkpoint(tmp_path / "ckpt")
    prefix, trajectory = run.prefix, run.trajectory
    decay = 0.9
    expected = trajectory.initial
    for values in trajectory.steps:
        expected = {name: decay * expected[name] + (1 - decay) * value for name, value in values.items()}
    for name, value in expected.items():
        np.testing.assert_allclose(read(prefix, average_key(name)), value, rtol=1e-5, atol=1e-6)


def test_model_garden_average_starts_at_zero_with_a_growing_decay(tmp_path):
    # What the layout relies on, checked on the real optimizer: zero-initialised `average` slots (ema_optimizer.py:122)
    # that follow the weights with decay min(0.99, (1 + step) / (10 + step)) after each step (lines 142-158).
    run = sp.write_model_garden_run(tmp_path / "model_dir")
    expected = {name: np.zeros_like(value) for name, value in run.trajectory.initial.items()}
    for step, values in enumerate(run.trajectory.steps, start=1):
        decay = min(0.99, (1 + step) / (10 + step))
        expected = {name: expected[name] - (1 - decay) * (expected[name] - value) for name, value in values.items()}
    for name, value in expected.items():
        np.testing.assert_allclose(read(run.regular, average_key("model/" + name)), value, rtol=1e-5, atol=1e-6)
    assert run.regular.endswith("model_dir/ckpt-4")
    assert run.inverted.endswith("model_dir/ema_checkpoints/average_weights-4")


# --- Export ---------------------------------------------------------------------------------------------------

PRODUCERS = {
    # name: (write the checkpoint into a directory -> its prefix, where the model hangs, inner optimizer's name)
    "tfa-at-root": (lambda d: sp.write_tfa_checkpoint(d).prefix, "", "awg_optimizer"),
    "tfa-under-model": (lambda d: sp.write_tfa_checkpoint(d, attach_at_root=False).prefix, "model/", "awg_optimizer"),
    "model-garden": (lambda d: sp.write_model_garden_run(d).regular, "model/", sp.MODEL_GARDEN_INNER_NAME),
}


@pytest.mark.parametrize("producer", sorted(PRODUCERS))
def test_detected_and_both_arms_serve_the_checkpoint_values(producer, tmp_path):
    write, root, inner = PRODUCERS[producer]
    prefix = write(tmp_path / "ckpt")

    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)

    assert result.fold.layout == LAYOUT
    assert "2 optimizer slots named 'average'" in result.fold.layout_reason
    assert "2 of them for model variables" in result.fold.layout_reason
    assert f"inner optimizer tracked as {inner}" in result.fold.layout_reason
    live, ema = expected_linear(prefix, root)
    assert not np.allclose(live, ema)
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_LIVE, X), live, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X), ema, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(serve(result.version_dir, SIGNATURE_DEFAULT, X),
                                  serve(result.version_dir, SIGNATURE_EMA, X))
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X[:1]), ema[:1], rtol=1e-5, atol=1e-6)
    # Paired by object-graph node: the average slots, not the inner optimizer's momentum slots.
    assert {item.shadow_key for item in result.fold.folded} == {average_key(root + "weights"),
                                                                average_key(root + "biases")}
    assert result.warnings == []


def test_layout_flag_overrides_detection(tmp_path):
    prefix = sp.write_tfa_checkpoint(tmp_path / "ckpt").prefix
    # A separate EMA checkpoint beside it too (tf.train.ExponentialMovingAverage), which detection tries first.
    variables = [tf.Variable(read(prefix, value_key(name)), name=name) for name in ("weights", "biases")]
    average = tf.train.ExponentialMovingAverage(decay=0.5)
    average.apply(variables)
    for variable in variables:
        average.average(variable).assign(variable * 0.5)
    tf.train.Checkpoint(ema_weights={v.name: average.average(v) for v in variables}).save(
        str(tmp_path / "ckpt" / "ema" / "ckpt"))

    detected = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)
    forced = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule, layout=LAYOUT)

    assert detected.fold.layout == "ema-checkpoint"
    assert forced.fold.layout == LAYOUT
    assert forced.fold.layout_reason.startswith("chosen with --layout (2 optimizer slots named 'average'")
    _, ema = expected_linear(prefix)
    np.testing.assert_allclose(serve(forced.version_dir, SIGNATURE_EMA, X), ema, rtol=1e-5, atol=1e-6)


def test_forcing_the_layout_without_average_slots_names_the_slots_found(tmp_path):
    module, optimizer = tm.LinearModule(), sp.sgd()
    sp.train(module, optimizer)
    tf.train.Checkpoint(weights=module.weights, biases=module.biases, optimizer=optimizer).save(
        str(tmp_path / "ckpt" / "ckpt"))

    assert detect(tmp_path / "ckpt") is None
    with pytest.raises(LayoutError) as error:
        ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule, layout=LAYOUT)
    message = str(error.value)
    assert "No optimizer slot named 'average'" in message and "moving-average optimizer wrapper" in message
    assert "Omit --layout" in message and message.endswith("Received: optimizer slots momentum")

    tm.write_seed_checkpoints(tmp_path / "seed")  # no optimizer at all
    with pytest.raises(LayoutError, match="Received: no optimizer slots$"):
        ema_export.export(tmp_path / "seed", tmp_path / "models", model=tm.LinearModule, layout=LAYOUT)


def test_two_average_slots_for_one_variable_are_ambiguous(tmp_path):
    # Nested averaging wrappers (as with TF Addons SWA over MovingAverage) each keep an `average` slot.
    nested = sp.MovingAverage(sp.MovingAverage(sp.sgd(), average_decay=0.5))
    run = sp.write_tfa_checkpoint(tmp_path / "ckpt", optimizer=nested)

    with pytest.raises(LayoutError) as error:
        ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)
    message = str(error.value)
    assert "2 model variables have more than one 'average' slot" in message
    assert "kept by the averaging optimizers at 'optimizer', 'optimizer/awg_optimizer'" in message
    assert "does not guess" in message and "--ema-checkpoint" in message
    for name in ("biases", "weights"):
        assert f"{name}: {average_key(name)} or {average_key(name, 'optimizer/awg_optimizer')}" in message
    assert nothing_published(tmp_path / "models")

    # Following the hint: the outer wrapper's averages, saved on their own, are served.
    variables = [run.module.weights, run.module.biases]
    tf.train.Checkpoint(ema_weights={v.name: nested.get_slot(v, "average") for v in variables}).save(
        str(tmp_path / "ckpt" / "ema" / "ckpt"))
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)
    _, ema = expected_linear(run.prefix)
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X), ema, rtol=1e-5, atol=1e-6)


def test_slot_of_another_shape_is_reported(tmp_path):
    sp.write_tfa_checkpoint(tmp_path / "ckpt", optimizer=sp.ColumnAverage(sp.sgd()))
    with pytest.raises(FoldError, match=r"shape mismatch: weights is \[4, 3\], its shadow "
                                        + average_key("weights").replace(".", r"\.") + r" is \[3\]"):
        ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)
    assert nothing_published(tmp_path / "models")


def test_model_garden_inverted_checkpoint_is_detected_and_refused(tmp_path):
    run = sp.write_model_garden_run(tmp_path / "model_dir")
    # The eval action really inverted it: its weights are the regular checkpoint's averages, and the reverse.
    for name in ("model/weights", "model/biases"):
        np.testing.assert_allclose(read(run.inverted, value_key(name)), read(run.regular, average_key(name)),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(read(run.inverted, average_key(name)), read(run.regular, value_key(name)),
                                   rtol=1e-5, atol=1e-6)

    reason = detect(run.model_dir / "ema_checkpoints")
    assert "is an inverted EMA checkpoint" in reason and "ema_checkpoints/ directory" in reason
    assert "'average' slots of ckpt-4, the regular checkpoint of the same step" in reason
    for checkpoint, options in [(run.model_dir / "ema_checkpoints", {}), (run.inverted, {"layout": LAYOUT})]:
        with pytest.raises(LayoutError) as error:
            ema_export.export(checkpoint, tmp_path / "models", model=tm.LinearModule, **options)
        message = str(error.value)
        assert "is an inverted EMA checkpoint, as Model Garden's EMACheckpointing writes them" in message
        assert "its model holds the moving averages and its 'average' slots the raw weights" in message
        assert f"Pass {run.regular} (the regular checkpoint of the same step) as CKPT_DIR instead" in message
        assert message.endswith(f"Received: {run.inverted}")
    assert nothing_published(tmp_path / "models")

    # Following the hint: the regular checkpoint serves, as its EMA arm, what the inverted one held as weights.
    result = ema_export.export(run.regular, tmp_path / "models", model=tm.LinearModule)
    inverted_weights = [read(run.inverted, value_key("model/" + name)) for name in ("weights", "biases")]
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X), tm.linear_numpy(X, *inverted_weights),
                               rtol=1e-5, atol=1e-5)


def test_inverted_checkpoint_copied_away_is_still_recognised_by_name(tmp_path):
    run = sp.write_model_garden_run(tmp_path / "model_dir")
    (tmp_path / "copied").mkdir()
    for path in (run.model_dir / "ema_checkpoints").glob("average_weights-4.*"):
        shutil.copy(path, tmp_path / "copied")

    with pytest.raises(LayoutError) as error:
        ema_export.export(tmp_path / "copied" / "average_weights-4", tmp_path / "models", model=tm.LinearModule)
    message = str(error.value)
    assert "inverted EMA checkpoint" in message and "its name is average_weights-<step>" in message
    assert "Pass the regular checkpoint in the training's model directory" in message


def copy_checkpoint(prefix, directory, name: str) -> str:
    """Copy a checkpoint's files under another name, with a state file, as someone keeping a checkpoint does."""
    directory.mkdir()
    for path in Path(prefix).parent.glob(Path(prefix).name + ".*"):
        shutil.copy(path, directory / (name + path.name[len(Path(prefix).name):]))
    tf.compat.v1.train.update_checkpoint_state(str(directory), str(directory / name))
    return str(directory / name)


def test_renamed_copy_of_the_inverted_checkpoint_is_recognised_by_its_values(tmp_path):
    run = sp.write_model_garden_run(tmp_path / "model_dir")
    copy = copy_checkpoint(run.inverted, run.model_dir / "best", "ckpt-4")  # not Model Garden names

    # The regular ckpt-4 mirrors both the copy and Model Garden's named ema_checkpoints/average_weights-4: it is the
    # regular one, so the copy is the inverted one.
    with pytest.raises(LayoutError) as error:
        ema_export.export(run.model_dir / "best", tmp_path / "models", model=tm.LinearModule)
    message = str(error.value)
    assert f"{copy} is an inverted EMA checkpoint" in message and "renamed copy of that inverted checkpoint" in message
    assert f"Pass {run.regular} (the regular checkpoint of the same step) as CKPT_DIR instead" in message
    regular = ema_export.export(run.model_dir, tmp_path / "models", model=tm.LinearModule)
    assert regular.sources.training.prefix == run.regular

    # Without Model Garden's own copy, the two cannot be told apart: refused until the user says which is which.
    shutil.rmtree(run.model_dir / "ema_checkpoints")
    for checkpoint in (run.model_dir / "best", run.model_dir):
        with pytest.raises(LayoutError, match="Cannot tell whether .* is an inverted EMA checkpoint.*--inverted"):
            ema_export.export(checkpoint, tmp_path / "models", model=tm.LinearModule)
    swapped = ema_export.export(run.model_dir / "best", tmp_path / "models", model=tm.LinearModule, inverted=True)
    live, ema = expected_linear(run.regular, "model/")
    np.testing.assert_allclose(serve(swapped.version_dir, SIGNATURE_LIVE, X), live, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(serve(swapped.version_dir, SIGNATURE_EMA, X), ema, rtol=1e-5, atol=1e-5)
    assert swapped.manifest["policies"]["inverted"] is True


def test_ema_checkpoints_given_as_ema_checkpoint_says_to_drop_it(tmp_path):
    run = sp.write_model_garden_run(tmp_path / "model_dir")
    with pytest.raises(LayoutError) as error:
        ema_export.export(run.model_dir, tmp_path / "models", model=tm.LinearModule,
                          ema_checkpoint=run.model_dir / "ema_checkpoints")
    message = str(error.value)
    assert f"{run.inverted} is an inverted EMA checkpoint" in message
    assert f"Drop --ema-checkpoint (the regular checkpoint holds the averages itself) and pass {run.regular}" in message
    assert nothing_published(tmp_path / "models")


def test_model_garden_averaged_statistics_serve_with_bn_stats_ema_without_a_warning(tmp_path):
    run = sp.write_model_garden_run(tmp_path / "model_dir", trainable_weights_only=False)

    result = ema_export.export(run.model_dir, tmp_path / "models", model=sp.StandardizedLinearModule, bn_stats="ema")

    live = [read(run.regular, value_key("model/" + name)) for name in ("weights", "biases", "input_mean")]
    ema = [read(run.regular, average_key("model/" + name)) for name in ("weights", "biases", "input_mean")]
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_LIVE, X), sp.standardized_linear_numpy(X, *live),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X), sp.standardized_linear_numpy(X, *ema),
                               rtol=1e-5, atol=1e-6)
    assert not result.fold.kept_live
    assert result.warnings == []


def test_model_garden_averaged_statistics_stay_live_with_a_warning(tmp_path):
    run = sp.write_model_garden_run(tmp_path / "model_dir", trainable_weights_only=False)

    result = ema_export.export(run.model_dir, tmp_path / "models", model=sp.StandardizedLinearModule)

    live_mean = read(run.regular, value_key("model/input_mean"))
    assert not np.allclose(read(run.regular, average_key("model/input_mean")), live_mean)
    live = [read(run.regular, value_key("model/" + name)) for name in ("weights", "biases")]
    ema = [read(run.regular, average_key("model/" + name)) for name in ("weights", "biases")]
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_LIVE, X),
                               sp.standardized_linear_numpy(X, *live, live_mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X),
                               sp.standardized_linear_numpy(X, *ema, live_mean), rtol=1e-5, atol=1e-6)
    assert "3 optimizer slots named 'average'" in result.fold.layout_reason
    assert [item.name for item in result.fold.kept_live] == ["input_mean"]
    assert "1 non-trainable variables have averages too (input_mean): both arms serve their live values; " \
        "--bn-stats ema serves their averages in serve_ema" in result.warnings


def test_average_slots_of_variables_outside_the_model_are_skipped_with_a_warning(tmp_path):
    module, head = tm.LinearModule(), tf.Variable(tf.ones([2]), name="head")
    optimizer = sp.MovingAverage(sp.sgd())
    sp.train(module, optimizer)
    optimizer.apply_gradients([(tf.constant([0.5, -0.5]), head)])  # a variable trained beside the served model
    prefix = tf.train.Checkpoint(model=module, head=head, optimizer=optimizer).save(str(tmp_path / "ckpt" / "ckpt"))

    assert "3 optimizer slots named 'average'" in detect(tmp_path / "ckpt")
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)

    assert result.warnings == [f"skipped 1 'average' slots of variables outside the model: {average_key('head')}"]
    _, ema = expected_linear(prefix, "model/")
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X), ema, rtol=1e-5, atol=1e-6)
