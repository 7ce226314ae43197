"""fold and the name matching it validates: shadows paired with variables, every problem reported at once.

The inputs are built from the stages' own dataclasses (one eager `tf.Variable` per model variable, shadows that read
a numpy value), so no checkpoint, model or export is involved.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from ema_export.errors import FoldError
from ema_export.fold import KEPT_NO_SHADOW, KEPT_NON_TRAINABLE, KEPT_STATS_LIVE, Fold, FoldReport, fold, relative_l2
from ema_export.layouts import Shadow, ShadowMatch
from ema_export.layouts.base import match_by_name
from ema_export.restored import RestoredModel, RestoredVariable


def _variable(name: str, value, trainable: bool = True, keras_path: str = "") -> RestoredVariable:
    array = np.asarray(value, dtype=np.float32) if not isinstance(value, np.ndarray) else value
    return RestoredVariable(
        variable=tf.Variable(array, trainable=trainable), path=f"model/{name}",
        checkpoint_key=f"model/{name}/.ATTRIBUTES/VARIABLE_VALUE", training_name=name, trainable=trainable,
        shape=tuple(array.shape), dtype=tf.as_dtype(array.dtype), keras_path=keras_path,
    )


def _shadow(claimed: str | tuple[str, ...], value, key: str | None = None) -> Shadow:
    names = (claimed,) if isinstance(claimed, str) else claimed
    array = np.asarray(value, dtype=np.float32) if not isinstance(value, np.ndarray) else value
    return Shadow(checkpoint_key=key or f"{names[0]}/ExponentialMovingAverage", recorded_name=names[0],
                  claimed_names=names, shape=tuple(array.shape), dtype=tf.as_dtype(array.dtype), read=lambda: array)


def _restored(*variables: RestoredVariable) -> RestoredModel:
    """A RestoredModel holding `variables`. Matching and folding read nothing else, so every other required field is
    None (filled by name, so that fields added to or moved out of RestoredModel leave these tests alone)."""
    required = {field.name: None for field in dataclasses.fields(RestoredModel)
                if field.init and field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING}
    return RestoredModel(**{**required, "variables": list(variables)})


def _folded(variables: list[RestoredVariable], shadows: list[Shadow], **options) -> Fold:
    restored = _restored(*variables)
    return fold(restored, match_by_name("test-layout", "ckpt/ema", shadows, restored), "chosen by the test", **options)


def _fold(variables: list[RestoredVariable], shadows: list[Shadow], **options) -> FoldReport:
    return _folded(variables, shadows, **options).report


def _problems(variables: list[RestoredVariable], shadows: list[Shadow], **options) -> list[str]:
    with pytest.raises(FoldError) as raised:
        _fold(variables, shadows, **options)
    return raised.value.problems


def test_each_trainable_variable_takes_its_shadow_and_statistics_stay_live():
    kernel, bias, mean = [[1.0, 2.0], [3.0, 4.0]], [0.0, 0.0], [5.0, 5.0]
    folded = _folded(
        [_variable("dense/kernel", kernel), _variable("dense/bias", bias), _variable("bn/mean", mean, False),
         _variable("bn/count", 3.0, False)],
        [_shadow("dense/kernel", [[1.0, 2.0], [3.0, 5.0]]), _shadow("dense/bias", [0.5, 0.0]),
         _shadow("bn/mean", [4.0, 4.0])],
    )
    report = folded.report
    np.testing.assert_array_equal(folded.averages[0], [[1.0, 2.0], [3.0, 5.0]])
    np.testing.assert_array_equal(folded.averages[1], [0.5, 0.0])
    assert sorted(folded.averages) == [0, 1]
    drift = {item.name: item.relative_l2 for item in report.folded}
    assert drift["dense/kernel"] == pytest.approx(1 / math.sqrt(30))
    assert drift["dense/bias"] == pytest.approx(0.5)  # all-zero live value: the absolute distance
    assert {item.name: item.reason for item in report.kept_live} == {"bn/mean": KEPT_STATS_LIVE,
                                                                      "bn/count": KEPT_NON_TRAINABLE}
    assert report.warnings == ["1 non-trainable variables have averages too (bn/mean): both arms serve their live "
                               "values; --bn-stats ema serves their averages in serve_ema"]
    assert not report.ema_equals_live
    assert [item.name for item in report.largest_drifts(1)] == ["dense/bias"]


def test_bn_stats_ema_uses_the_averaged_statistics():
    folded = _folded([_variable("w", [1.0]), _variable("bn/mean", [5.0], False)],
                     [_shadow("w", [2.0]), _shadow("bn/mean", [4.0])], bn_stats="ema")
    np.testing.assert_array_equal(folded.averages[1], [4.0])
    assert folded.report.kept_live == []


def test_without_keep_values_the_same_report_and_no_averages():
    variables, shadows = [_variable("w", [1.0]), _variable("v", [3.0])], [_shadow("w", [2.0]), _shadow("v", [3.0])]
    kept, checked_only = _folded(variables, shadows), _folded(variables, shadows, keep_values=False)
    assert sorted(kept.averages) == [0, 1] and checked_only.averages == {}
    assert checked_only.report == kept.report


def test_the_report_is_frozen_and_holds_no_tensors():
    report = _fold([_variable("w", [1.0, 2.0])], [_shadow("w", [1.5, 2.0])])
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.warnings = ["changed"]  # type: ignore[misc]
    fields = dataclasses.astuple(report)  # plain facts all the way down: nothing a later stage could reach into
    assert not any(isinstance(item, (tf.Variable, tf.Tensor, np.ndarray)) for item in _leaves(fields))


def _leaves(value):
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def test_every_problem_is_reported_at_once():
    problems = _problems(
        [_variable("a", [1.0, 2.0]), _variable("b", [1.0]), _variable("c", [1.0]), _variable("d", [1.0, 1.0])],
        [_shadow("a", [1.0, 2.0, 3.0]), _shadow("b", np.array([1.0])), _shadow("d", [np.nan, np.inf]),
         _shadow("zzz", [0.0])],
    )
    assert len(problems) == 5, problems
    assert problems[0].startswith("shape mismatch: a is [2]")
    assert problems[1].startswith("dtype mismatch: b is float32") and "float64" in problems[1]
    assert problems[2].startswith("non-finite shadow") and "has 2 NaN/Inf values" in problems[2]
    assert problems[3] == "missing shadow for 1 trainable variables: c"
    assert problems[4].startswith("1 extra shadows match no model variable: zzz/ExponentialMovingAverage")


def test_the_error_names_the_flag_that_accepts_missing_shadows():
    with pytest.raises(FoldError) as raised:
        _fold([_variable("w", [1.0]), _variable("v", [1.0])], [_shadow("w", [2.0])])
    assert "--allow-missing" in raised.value.hint


def test_allow_missing_keeps_the_live_value_and_says_so():
    report = _fold([_variable("w", [1.0]), _variable("v", [1.0])], [_shadow("w", [2.0])], allow_missing=True)
    assert [(item.name, item.reason) for item in report.kept_live] == [("v", KEPT_NO_SHADOW)]
    assert report.warnings == ["1 trainable variables have no shadow and serve their live value in serve_ema"]


def test_a_shadow_tries_its_names_in_order_and_a_keras_path_is_a_name():
    report = _fold([_variable("kernel", [1.0], keras_path="dense/kernel"), _variable("other", [1.0])],
                   [_shadow(("not/a/variable", "dense/kernel"), [2.0]), _shadow("other", [3.0])])
    assert {item.name: item.shadow_key for item in report.folded} == {
        "kernel": "not/a/variable/ExponentialMovingAverage", "other": "other/ExponentialMovingAverage"}


def test_two_shadows_for_one_variable_are_a_problem():
    problems = _problems([_variable("w", [1.0])], [_shadow("w", [2.0], key="first"), _shadow("w", [3.0], key="second")])
    assert problems == ["duplicate claim: shadows first and second both belong to w"]


def test_a_name_two_variables_share_is_never_guessed():
    problems = _problems([_variable("w", [1.0]), dataclasses.replace(_variable("w", [1.0]), path="model/w_1")],
                         [_shadow("w", [2.0])], allow_missing=True)
    assert problems == ["duplicate claim: shadow w/ExponentialMovingAverage is named 'w', the name of 2 variables "
                        "(model/w, model/w_1)"]


def test_shadows_of_a_shared_name_are_one_problem_and_the_hint_is_not_allow_missing():
    # Two towers built by one function: tf-keras names both `hidden/kernel` and `hidden/bias`.
    variables = [dataclasses.replace(_variable(name, [1.0]), path=f"{tower}/{name}")
                 for tower in ("tower_a", "tower_b") for name in ("hidden/kernel", "hidden/bias")]
    shadows = [_shadow(name, [2.0], key=f"average/{name}/{n}")
               for n in (0, 1) for name in ("hidden/kernel", "hidden/bias")]
    with pytest.raises(FoldError) as raised:
        _fold(variables, shadows)
    assert raised.value.problems[:2] == [
        "duplicate claim: 2 shadows (average/hidden/kernel/0, average/hidden/kernel/1) are named 'hidden/kernel', the "
        "name of 2 variables (tower_a/hidden/kernel, tower_b/hidden/kernel)",
        "duplicate claim: 2 shadows (average/hidden/bias/0, average/hidden/bias/1) are named 'hidden/bias', the name "
        "of 2 variables (tower_a/hidden/bias, tower_b/hidden/bias)"]
    assert "--allow-missing" not in raised.value.hint and "unique names" in raised.value.hint
    assert len(raised.value.summary()) <= 330  # about 300: the first problem is never cut below 80 characters


def test_a_short_keras_name_shared_by_layers_is_a_duplicate_claim():
    problems = _problems([_variable("dense/kernel", [1.0]), _variable("dense_1/kernel", [1.0])],
                         [_shadow("kernel", [2.0])], allow_missing=True)
    assert len(problems) == 1 and "keyed 'kernel', the short name of 2 variables" in problems[0]


def test_shadows_equal_to_the_live_values_are_flagged_unless_the_layout_explains_them():
    report = _fold([_variable("w", [1.0, 2.0])], [_shadow("w", [1.0, 2.0])])
    assert report.ema_equals_live and "every shadow equals its live value exactly" in report.warnings[0]
    restored = _restored(_variable("w", [1.0, 2.0]))
    match = match_by_name("test-layout", "ckpt", [_shadow("w", [1.0, 2.0])], restored)
    explained = fold(restored, dataclasses.replace(match, explains_equality=True), "test").report
    assert explained.ema_equals_live and explained.warnings == []


def test_all_zero_shadows_are_flagged_as_never_updated():
    report = _fold([_variable("w", [1.0, 2.0])], [_shadow("w", [0.0, 0.0])])
    assert any("every shadow is all zeros" in warning for warning in report.warnings)


def test_layout_problems_and_warnings_are_carried_into_the_report():
    restored = _restored(_variable("w", [1.0]))
    match = ShadowMatch("test-layout", "ckpt", {0: _shadow("w", [2.0])}, [], [], warnings=["from the layout"])
    assert fold(restored, match, "test").report.warnings == ["from the layout"]
    with pytest.raises(FoldError) as raised:
        fold(restored, dataclasses.replace(match, problems=["the layout's own problem"]), "test")
    assert raised.value.problems == ["the layout's own problem"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relative_l2_is_the_relative_euclidean_distance(dtype):
    live, average = np.array([3.0, 4.0], dtype), np.array([3.0, 5.0], dtype)
    assert relative_l2(live, average) == pytest.approx(0.2)
    assert relative_l2(np.zeros(2, dtype), average) == pytest.approx(math.sqrt(34))
    assert relative_l2(live, live) == 0.0


def test_relative_l2_of_half_precision_values_accumulates_in_float64():
    live = np.full(1000, 300.0, np.float16)
    assert relative_l2(live, live + np.float16(3.0)) == pytest.approx(0.01, rel=1e-3)


def test_relative_l2_of_half_precision_values_sums_every_slice():
    live = np.full((3, 1_500_000), 300.0, np.float16)  # 4.5 M elements: more than one slice of fold._SLICE (4 M)
    average = live.copy()
    average[2, -1] = np.float16(400.0)  # one drifted element, in the last slice
    expected = 100.0 / math.sqrt(live.size * 300.0**2)
    assert relative_l2(live, average) == pytest.approx(expected, rel=1e-9)
