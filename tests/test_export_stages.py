"""Export stages' cost accounting and the memory-lean fold: stage durations, checks slice by slice, averages read
straight into the variables that are saved."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

import ema_export
from ema_export import fold as fold_module
from ema_export.api import STAGES
from ema_export.cli import cli
from ema_export.errors import FoldError
from ema_export.fold import count_non_finite, relative_l2
from ema_export.fresh_model import build_fresh_model, without_initial_values
from ema_export.layouts import choose_layout
from ema_export.locate import locate
from ema_export.manifest import read_manifest
from ema_export.read import read_checkpoints
from ema_export.restore import restore
from support import models as tm

BFLOAT16 = tf.bfloat16.as_numpy_dtype


@pytest.fixture
def seed_ckpt(tmp_path):
    tm.write_seed_checkpoints(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_manifest_and_result_record_every_stage_duration(seed_ckpt, tmp_path):
    seen = []
    result = ema_export.export(seed_ckpt, tmp_path / "models", model=tm.LinearModule, progress=seen.append)

    timings = read_manifest(result.version_dir)["timings"]
    assert list(timings) == list(STAGES[:-1]) + ["total"]  # publishing comes after the manifest is written
    assert all(seconds >= 0 for seconds in timings.values())
    assert timings["total"] == pytest.approx(sum(v for k, v in timings.items() if k != "total"), abs=0.01)
    assert timings["write SavedModel"] > 0 and timings["verify"] > 0
    assert list(result.timings) == list(STAGES) == seen


def test_dry_run_times_its_stages_and_keeps_no_values(seed_ckpt, tmp_path):
    planned = ema_export.dry_run(seed_ckpt, tmp_path / "models", model=tm.LinearModule)

    assert list(planned.timings) == list(STAGES[:5])
    assert not any(isinstance(value, tf.Variable) for value in vars(planned.fold).values())
    assert {item.name for item in planned.fold.folded} == {"weights", "biases"}


def test_dry_run_still_checks_every_value(tmp_path):
    bad = tm.EMA_W.copy()
    bad[1, 2] = np.inf
    tm.write_seed_checkpoints(tmp_path / "ckpt", ema=(bad, tm.EMA_B))

    with pytest.raises(FoldError, match="1 NaN/Inf"):
        ema_export.dry_run(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)


def test_verbose_cli_prints_stage_durations(seed_ckpt, tmp_path):
    result = CliRunner().invoke(cli, [str(seed_ckpt), str(tmp_path / "models"), "--model",
                                      "support.models:LinearModule", "--verbose"])

    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("Stage durations"))
    assert all(f"{stage} " in line for stage in STAGES)


def test_keras_averages_are_the_saved_variables_read_from_the_checkpoint(tmp_path):
    keys = tm.write_keras_checkpoints(tm.build_sequential, tmp_path / "ckpt", ema_key=lambda v: v.path)
    reader = tf.train.load_checkpoint(str(tmp_path / "ckpt" / "ema"))
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.build_sequential)

    stored = dict(tf.train.list_variables(str(result.version_dir / "variables" / "variables")))
    for shadow_key in keys[2]:
        value = reader.get_tensor(shadow_key)
        saved = [key for key in stored if key.startswith("ema_variables/")
                 and np.array_equal(tf.train.load_variable(str(result.version_dir / "variables" / "variables"),
                                                           key), value)]
        assert len(saved) == 1, shadow_key  # each average saved exactly once, bit for bit


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BFLOAT16, np.complex64])
def test_non_finite_count_is_exact_across_slices(monkeypatch, dtype):
    monkeypatch.setattr(fold_module, "_SLICE", 7)
    value = np.ones(50, np.float32)
    value[[3, 20, 49]] = [np.nan, np.inf, -np.inf]

    assert count_non_finite(value.astype(dtype)) == 3
    assert count_non_finite(np.ones(50, dtype)) == 0


def test_sums_that_overflow_are_not_mistaken_for_non_finite_values(monkeypatch):
    monkeypatch.setattr(fold_module, "_SLICE", 8)
    assert count_non_finite(np.full(40, 3e38, np.float32)) == 0
    assert count_non_finite(np.full(40, 60000, np.float16)) == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, BFLOAT16])
def test_relative_l2_matches_float64_numpy_across_slices(monkeypatch, dtype):
    monkeypatch.setattr(fold_module, "_SLICE", 11)
    rng = np.random.default_rng(0)
    live = rng.standard_normal((9, 13)).astype(dtype)
    average = (live.astype(np.float32) + rng.normal(0, 0.1, live.shape)).astype(dtype)
    wide_live, wide_average = live.astype(np.float64), average.astype(np.float64)
    expected = np.linalg.norm(wide_average - wide_live) / np.linalg.norm(wide_live)

    assert relative_l2(live, average) == pytest.approx(expected, rel=1e-5)


def test_relative_l2_of_a_large_float16_tensor_does_not_overflow():
    live = np.ones(200_000, np.float16)  # its sum of squares is far above float16's largest value
    assert relative_l2(live, live * np.float16(1.5)) == pytest.approx(0.5)
    assert relative_l2(np.zeros(3, np.float32), np.full(3, 2.0, np.float32)) == pytest.approx(np.sqrt(12))


def test_architecture_files_are_rebuilt_with_zeros_for_initial_values(tmp_path):
    import keras

    model = tm.build_sequential()
    (tmp_path / "model.json").write_text(model.to_json())
    config = json.loads(model.to_json())

    rebuilt = json.loads(without_initial_values(model.to_json()))
    initializers = [value for key, value in _items(rebuilt) if key.endswith("initializer")]
    assert initializers and set(initializers) == {"zeros"}  # kernel, bias, gamma, beta, moving mean and variance
    assert _drop_initializers(rebuilt) == _drop_initializers(config)  # nothing else changed
    assert without_initial_values("not json {") == "not json {"  # left for Keras to report

    fresh = build_fresh_model(tmp_path)
    assert isinstance(fresh.model, keras.Model)
    assert all(not np.any(variable.numpy()) for variable in fresh.model.variables)


def test_architecture_file_export_serves_the_checkpoint_values_not_the_zeros(tmp_path):
    tm.write_keras_checkpoints(tm.build_sequential, tmp_path / "ckpt", ema_key=lambda v: v.path)
    (tmp_path / "ckpt" / "model.json").write_text(tm.build_sequential().to_json())
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models")

    assert result.verification.passed and result.verification.arms_differ
    reader = tf.train.load_checkpoint(str(tmp_path / "ckpt"))
    saved = str(result.version_dir / "variables" / "variables")
    stored = {np.asarray(tf.train.load_variable(saved, key)).tobytes() for key, _ in tf.train.list_variables(saved)}
    live = [key for key in reader.get_variable_to_shape_map() if key.startswith("model/") and "VARIABLE_VALUE" in key]
    assert live and all(reader.get_tensor(key).tobytes() in stored for key in live)


def test_a_checkpoint_shadow_becomes_its_export_variable_without_a_copy(seed_ckpt, tmp_path):
    sources = locate(seed_ckpt)
    indexes = read_checkpoints(sources)
    restored = restore(build_fresh_model(seed_ckpt, tm.LinearModule), sources.training, indexes.training)
    match = choose_layout(indexes, restored)[0].collect(indexes, restored)
    index, shadow = next(iter(match.matched.items()))
    assert shadow.prefix == sources.ema.prefix

    tensor = shadow.tensor()
    address = np.asarray(tensor).__array_interface__["data"][0]
    np.testing.assert_array_equal(np.asarray(tensor), shadow.value())
    variable = fold_module.averaged_variable(restored.variables[index], tensor)
    del tensor

    assert np.asarray(tf.convert_to_tensor(variable)).__array_interface__["data"][0] == address


def _drop_initializers(node):
    if isinstance(node, dict):
        return {key: _drop_initializers(value) for key, value in node.items() if not key.endswith("initializer")}
    return [_drop_initializers(item) for item in node] if isinstance(node, list) else node


def _items(node):
    """Every (key, value) of a nested config."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _items(value)
    elif isinstance(node, list):
        for item in node:
            yield from _items(item)
