"""Stage 4, fold: validate the layout's pairing and decide the averaged value of every variable.

Validation is total and raises once: every trainable variable gets a shadow (or is reported), every shadow belongs
to a variable, shapes and dtypes agree, values are finite, nothing is claimed twice. Non-trainable variables
(BatchNorm moving statistics, counters) keep their live values in both arms.

Each shadow is read once by TensorFlow's restore op, checked through a numpy view of that memory, and becomes the
variable the SavedModel will save without a copy, so folding never holds more than one shadow beyond the saved
variables.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from ema_export.errors import FoldError, name_list
from ema_export.layouts import Shadow, ShadowMatch
from ema_export.memory import large_enough, read_ahead, tensor_bytes
from ema_export.restored import RestoredModel, RestoredVariable

KEPT_NON_TRAINABLE = "non-trainable: both arms share the live value"
KEPT_NO_SHADOW = "no shadow (--allow-missing): the EMA arm uses the live value"


@dataclass(frozen=True)
class FoldedVariable:
    """A variable whose EMA arm uses its shadow."""

    name: str
    path: str
    shape: tuple[int, ...]
    dtype: str
    shadow_key: str
    relative_l2: float


@dataclass(frozen=True)
class KeptVariable:
    """A variable whose EMA arm uses the live value, and why."""

    name: str
    path: str
    reason: str


@dataclass(frozen=True)
class FoldReport:
    """What folding decided: plain facts, complete when returned. The averaged values are not in it (see `Fold`)."""

    layout: str
    layout_reason: str
    source: str
    folded: list[FoldedVariable]
    kept_live: list[KeptVariable]
    warnings: list[str]

    @property
    def ema_equals_live(self) -> bool:
        """Every shadow equals its live value exactly: the EMA was never updated, or is a stale copy."""
        return _all_equal(self.folded)

    def largest_drifts(self, count: int = 5) -> list[FoldedVariable]:
        """The variables whose averaged value differs most from the live one."""
        return sorted(self.folded, key=lambda item: item.relative_l2, reverse=True)[:count]


Averages = Mapping[int, tf.Variable]
"""A variable's index in `RestoredModel.variables` -> the `tf.Variable` holding its averaged value."""


@dataclass(frozen=True)
class Fold:
    """What `fold` returns: the report, and the averaged variables that only `assemble` needs.

    `averages` holds the variables `serve_ema` reads and the SavedModel saves; empty when folding ran without keeping
    values (dry run).
    Kept apart from the report so the caller drops them once assembled (the export root holds them then) while the
    report lives on in the result.
    """

    report: FoldReport
    averages: Averages


def _all_equal(folded: list[FoldedVariable]) -> bool:
    return bool(folded) and all(item.relative_l2 == 0.0 for item in folded)


_SLICE = 1 << 22
"""Elements per slice in the value checks: their temporaries stay at 16 MiB (float32) however large the tensor."""


def _slices(*arrays: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """Matching flat slices of same-sized arrays (views, no copies, for contiguous arrays)."""
    flat = [np.ravel(array) for array in arrays]
    for start in range(0, flat[0].size, _SLICE):
        yield tuple(part[start:start + _SLICE] for part in flat)


def relative_l2(live: np.ndarray, average: np.ndarray) -> float:
    """||average - live|| / ||live|| (the absolute distance when the live value is all zeros).

    Norms accumulate in float64 across slices; each slice's difference goes into one reused buffer, so a large
    tensor costs neither a full-size temporary nor fresh pages per slice.
    """
    wide = live.dtype.itemsize < 4  # float16 / bfloat16 sums of squares overflow in their own type
    scratch = np.empty(min(live.size, _SLICE), np.float64 if wide else np.result_type(live, average))
    distance_squared = scale_squared = 0.0
    for live_part, average_part in _slices(live, average):
        difference = scratch[:live_part.size]
        if wide:
            live_part = live_part.astype(np.float64)
        np.subtract(average_part, live_part, out=difference, casting="unsafe")
        distance_squared += float(np.vdot(difference, difference).real)
        scale_squared += float(np.vdot(live_part, live_part).real)
    distance, scale = float(np.sqrt(distance_squared)), float(np.sqrt(scale_squared))
    return distance / scale if scale > 0 else distance


def count_non_finite(value: np.ndarray) -> int:
    """NaN and Inf elements of a floating-point value (bfloat16 and float16 included).

    A slice whose sum is finite holds no NaN or Inf (either would make the sum NaN or infinite), so only a slice
    whose sum is not finite, through a bad element or overflow, is counted element by element: the count is exact.
    """
    bad = 0
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum only sends the slice to the exact count
        for (part,) in _slices(value):
            if not np.isfinite(part.sum(dtype=np.float64 if part.dtype.itemsize < 4 else None)):
                bad += int(part.size - np.count_nonzero(np.isfinite(part)))
    return bad


READ_AHEAD_MIN_MEAN_BYTES = 1 << 20
"""Shadows averaging at least this are read two at a time: reading is then most of folding's time. Smaller ones are
read in turn: worker threads would save little (ResNet50's 0.3 MB average) and their memory arenas cost about 30 MB
of peak RSS later in the export."""

BN_STATS_POLICIES = ("live", "ema")
"""`--bn-stats`: non-trainable statistics serve their live value in both arms, or their average in `serve_ema`."""

KEPT_STATS_LIVE = "non-trainable: its shadow is not used (--bn-stats live); both arms share the live value"


def _checked_value(variable: RestoredVariable, shadow: Shadow) -> tuple[tf.Tensor | None, str | None]:
    """The shadow's value if it can stand in for the variable, else the problem with it."""
    if shadow.shape != variable.shape:
        return None, (f"shape mismatch: {variable.name} is {list(variable.shape)}, its shadow "
                      f"{shadow.checkpoint_key} is {list(shadow.shape)}")
    if shadow.dtype != variable.dtype:
        return None, (f"dtype mismatch: {variable.name} is {variable.dtype.name}, its shadow "
                      f"{shadow.checkpoint_key} is {shadow.dtype.name}")
    value = shadow.tensor()
    bad = count_non_finite(_view(value)) if shadow.dtype.is_floating or shadow.dtype.is_complex else 0
    if bad:
        return None, f"non-finite shadow: {shadow.checkpoint_key} (for {variable.name}) has {bad} NaN/Inf values"
    return value, None


@dataclass
class _Inspected:
    """A shadow read and checked against its variable: its value (unless it has a problem) and what folding reports."""

    value: tf.Tensor | None
    problem: str | None
    relative_l2: float = 0.0
    all_zero: bool = True

    def take_value(self) -> tf.Tensor:
        """The value, released from this record, so a variable created from it is its only holder."""
        value, self.value = self.value, None
        assert value is not None
        return value


def _inspect(item: tuple[int, RestoredVariable, Shadow]) -> _Inspected:
    """Read a shadow and check it (shape, dtype, NaN/Inf), then measure its drift from the live value.

    The numpy views end with this call, so the variable that later adopts the value's memory is its only holder.
    """
    _, variable, shadow = item
    value, problem = _checked_value(variable, shadow)
    if problem:
        return _Inspected(None, problem)
    average, live = _view(value), _view(variable.variable)  # views: no copy of either
    return _Inspected(value, None, relative_l2(live, average), not np.any(average))  # the views end here


def _view(value: Any) -> np.ndarray:
    """A numpy view of a tensor's or variable's current value, without a copy.

    `.numpy()` copies; `np.asarray` of an eager tensor shares its memory. A view must be dropped before the tensor
    becomes a variable, or TensorFlow copies the memory the view still holds.
    """
    return np.asarray(tf.convert_to_tensor(value))


def averaged_variable(variable: RestoredVariable, value: tf.Tensor) -> tf.Variable:
    """The variable that holds `variable`'s averaged value in the export (named after its path, under `ema/`)."""
    return tf.Variable(value, trainable=False, name="ema/" + variable.path.replace("/", "."))


def fold(restored: RestoredModel, match: ShadowMatch, layout_reason: str, allow_missing: bool = False,
         bn_stats: str = "live", keep_values: bool = True) -> Fold:
    """Check the pairing and collect averaged values.

    Args:
        restored: The model with its live values.
        match: The layout's pairing of shadows with variables.
        layout_reason: Why the layout was chosen, for the report.
        allow_missing: Trainable variables without a shadow serve their live value instead of failing.
        bn_stats: "live" keeps non-trainable variables (BatchNorm statistics) live in both arms even when the
            checkpoint averaged them; "ema" uses their averages in `serve_ema` where the checkpoint has them.
        keep_values: Put each checked average into its export variable (`Fold.averages`); a dry run checks
            every value the same way but keeps none.

    Raises:
        FoldError: Listing every missing, extra, mismatched, duplicated or non-finite shadow at once.
    """
    problems = list(match.problems)
    folded: list[FoldedVariable] = []
    kept: list[KeptVariable] = []
    values: dict[int, tf.Variable] = {}
    missing: list[str] = []
    averaged: set[int] = set()  # indices of the variables folded
    all_zero = True
    to_read: list[tuple[int, RestoredVariable, Shadow]] = []
    for index, variable in enumerate(restored.variables):
        shadow = match.matched.get(index)
        if shadow is None:
            if variable.trainable:
                missing.append(variable.name)
            kept.append(KeptVariable(variable.name, variable.path,
                                     KEPT_NO_SHADOW if variable.trainable else KEPT_NON_TRAINABLE))
        elif not variable.trainable and bn_stats == "live":
            kept.append(KeptVariable(variable.name, variable.path, KEPT_STATS_LIVE))
        else:
            to_read.append((index, variable, shadow))
    # Large shadows are read and checked two at a time in worker threads (TensorFlow's restore op and numpy release
    # the GIL), in order; each is adopted by its variable here before the next is taken.
    sizes = [tensor_bytes(shadow.shape, shadow.dtype) for _, _, shadow in to_read]
    ahead = 2 if large_enough(sizes, 0, READ_AHEAD_MIN_MEAN_BYTES) else 1
    for (index, variable, shadow), inspected in zip(to_read, read_ahead(_inspect, to_read, ahead)):
        if inspected.problem:
            problems.append(inspected.problem)
            continue
        folded.append(FoldedVariable(variable.name, variable.path, variable.shape, variable.dtype.name,
                                     shadow.checkpoint_key, inspected.relative_l2))
        all_zero = all_zero and inspected.all_zero
        averaged.add(index)
        if keep_values:
            values[index] = averaged_variable(variable, inspected.take_value())
        del inspected  # before the next shadow is taken: its memory is the variable's now, or freed
    if missing and not allow_missing:
        problems.append(f"missing shadow for {len(missing)} trainable variables: {', '.join(missing)}")
    if match.unmatched:
        problems.append(
            f"{len(match.unmatched)} extra shadows match no model variable: "
            + ", ".join(f"{s.checkpoint_key} (named {s.recorded_name!r})" for s in match.unmatched)
        )
    if problems:
        hint = "Check that --model is the architecture that was trained and that the EMA checkpoint is its own"
        # Not --allow-missing when shadows claim names several variables share (the shadows are there; dropping
        # them would not help), nor when no trainable variable has a shadow: that is a misread checkpoint, and
        # --allow-missing would serve the raw weights as "EMA".
        if match.shared_names:
            hint = ("Variables that share a name cannot be paired with their shadows by name: give them unique names "
                    "in training (Keras layers: name=...)")
        elif missing and not allow_missing and len(missing) < sum(1 for v in restored.variables if v.trainable):
            hint += "; --allow-missing keeps live values for variables without a shadow"
        raise FoldError(f"The EMA shadows in {match.source} do not fit the model ({len(problems)} problems):",
                        hint=hint, problems=problems)
    warnings = list(match.warnings)
    if _all_equal(folded) and not match.explains_equality:
        warnings.append(
            "every shadow equals its live value exactly: the EMA was never updated, or was saved as a copy of the "
            "weights (Keras fit() with use_ema=True overwrites the weights with the averages at its end)"
        )
    statistics = [item.name for item in kept if item.reason == KEPT_STATS_LIVE]
    if statistics:  # the checkpoint's producer averaged them (TF-Slim, Model Garden's trainable_weights_only=False)
        warnings.append(f"{len(statistics)} non-trainable variables have averages too ({name_list(statistics, 3)}): "
                        "both arms serve their live values; --bn-stats ema serves their averages in serve_ema")
    if bn_stats == "ema" and not any(not restored.variables[index].trainable for index in averaged):
        warnings.append("--bn-stats ema: the checkpoint has no averaged non-trainable statistics; both arms use the "
                        "live ones")
    if folded and all_zero:
        warnings.append("every shadow is all zeros: averages initialised to zero (as Model Garden's EMA optimizer "
                        "does) that were never updated, or saved before the first step")
    if missing:
        warnings.append(f"{len(missing)} trainable variables have no shadow and serve their live value in serve_ema")
    return Fold(FoldReport(match.layout, layout_reason, match.source, folded, kept, warnings), values)
