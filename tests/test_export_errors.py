"""Shadows that do not fit the model: every offender reported in one error, or folded with a loud record."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import ema_export
from ema_export.errors import FoldError
from ema_export.names import SIGNATURE_EMA
from support import models as tm

pytestmark = pytest.mark.slow  # every test runs a full export (or one up to its failure)
X = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]], np.float32)


def write_ema_checkpoint(directory, shadows: dict[str, np.ndarray]) -> None:
    """A real EMA checkpoint: `tf.train.ExponentialMovingAverage` over variables with these names, shadows set."""
    variables = [tf.Variable(np.zeros_like(value), name=name) for name, value in shadows.items()]
    average = tf.train.ExponentialMovingAverage(decay=0.9)
    average.apply(variables)
    for variable, value in zip(variables, shadows.values()):
        average.average(variable).assign(value)
    tf.train.Checkpoint(ema_weights={v.name: average.average(v) for v in variables}).save(str(directory / "ckpt"))


@pytest.fixture
def live_only(tmp_path):
    """A seed training checkpoint whose EMA directory each test writes itself."""
    live_prefix, _ = tm.write_seed_checkpoints(tmp_path / "seed")
    return live_prefix


def test_every_problem_is_listed_in_one_error(live_only, tmp_path):
    bad_weights = tm.EMA_W.copy()
    bad_weights[0, 0] = np.nan
    write_ema_checkpoint(tmp_path / "ema", {"weights": bad_weights, "biases": np.zeros([5], np.float32),
                                            "stray": np.ones([2], np.float32)})
    with pytest.raises(FoldError) as error:
        ema_export.export(live_only, tmp_path / "models", model=tm.LinearModule, ema_checkpoint=tmp_path / "ema")
    message = str(error.value)
    assert "(3 problems)" in message
    assert "non-finite shadow" in message and "1 NaN/Inf" in message
    assert "shape mismatch: biases is [3]" in message and "[5]" in message
    assert "extra shadows" in message and "'stray/ExponentialMovingAverage'" in message
    assert "\n" not in message
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_dtype_mismatch_is_reported(live_only, tmp_path):
    write_ema_checkpoint(tmp_path / "ema", {"weights": tm.EMA_W, "biases": tm.EMA_B.astype(np.float64)})
    with pytest.raises(FoldError, match="dtype mismatch: biases is float32, its shadow .* is float64"):
        ema_export.export(live_only, tmp_path / "models", model=tm.LinearModule, ema_checkpoint=tmp_path / "ema")


def test_missing_shadow_fails_unless_allowed_then_serves_live_value(live_only, tmp_path):
    write_ema_checkpoint(tmp_path / "ema", {"weights": tm.EMA_W})
    with pytest.raises(FoldError, match="missing shadow for 1 trainable variables: biases.*--allow-missing"):
        ema_export.export(live_only, tmp_path / "models", model=tm.LinearModule, ema_checkpoint=tmp_path / "ema")

    result = ema_export.export(live_only, tmp_path / "models", model=tm.LinearModule,
                               ema_checkpoint=tmp_path / "ema", allow_missing=True)
    served = tf.saved_model.load(str(result.version_dir)).signatures[SIGNATURE_EMA](inputs=X)["output_0"].numpy()
    np.testing.assert_allclose(served, tm.linear_numpy(X, tm.EMA_W, tm.LIVE_B), rtol=1e-6)
    kept = result.manifest["variables"]["kept_live"]
    assert [(item["name"], "allow-missing" in item["reason"]) for item in kept] == [("biases", True)]
    assert any("no shadow" in warning for warning in result.warnings)
    # The live biases are shared by both arms, not stored twice: 2 live + 1 averaged.
    stored = [k for k, _ in tf.train.list_variables(str(result.version_dir / "variables" / "variables"))]
    assert len(stored) == 1 + 3


def test_ema_equal_to_live_is_exported_with_a_warning(tmp_path):
    tm.write_seed_checkpoints(tmp_path / "ckpt", ema=(tm.LIVE_W, tm.LIVE_B))
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)
    assert result.fold.ema_equals_live
    assert any("never updated" in warning for warning in result.warnings)
    assert any("identical outputs" in warning for warning in result.warnings)
    assert result.manifest["verification"]["arms_differ"] is False
