"""Stage 4, fold: validate the layout's pairing and decide the averaged value of every variable.

Validation is total and raises once: every trainable variable gets a shadow (or is reported), every shadow belongs
to a variable, shapes and dtypes agree, values are finite, nothing is claimed twice. Non-trainable variables
(BatchNorm moving statistics, counters) keep their live values in both arms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ema_export.errors import FoldError
from ema_export.layouts import Shadow, ShadowMatch
from ema_export.restore import RestoredModel, RestoredVariable

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


@dataclass
class FoldReport:
    """What folding decided. `values` maps a variable's index in `RestoredModel.variables` to its averaged value."""

    layout: str
    layout_reason: str
    source: str
    folded: list[FoldedVariable]
    kept_live: list[KeptVariable]
    warnings: list[str]
    values: dict[int, np.ndarray] = field(repr=False)

    @property
    def ema_equals_live(self) -> bool:
        """Every shadow equals its live value exactly: the EMA was never updated, or is a stale copy."""
        return bool(self.folded) and all(item.relative_l2 == 0.0 for item in self.folded)

    def largest_drifts(self, count: int = 5) -> list[FoldedVariable]:
        """The variables whose averaged value differs most from the live one."""
        return sorted(self.folded, key=lambda item: item.relative_l2, reverse=True)[:count]


def relative_l2(live: np.ndarray, average: np.ndarray) -> float:
    """||average - live|| / ||live|| (the absolute distance when the live value is all zeros).

    Norms accumulate in float64 without materialising float64 copies of large tensors.
    """
    difference = np.subtract(average, live, dtype=np.float64) if live.dtype.itemsize < 4 else average - live
    distance = float(np.sqrt(np.vdot(difference, difference).real))
    scale = float(np.sqrt(np.vdot(live, live).real))
    return distance / scale if scale > 0 else distance


BN_STATS_POLICIES = ("live", "ema")
"""`--bn-stats`: non-trainable statistics serve their live value in both arms, or their average in `serve_ema`."""

KEPT_STATS_LIVE = "non-trainable: its shadow is not used (--bn-stats live); both arms share the live value"


def _checked_value(variable: RestoredVariable, shadow: Shadow) -> tuple[np.ndarray | None, str | None]:
    """The shadow's value if it can stand in for the variable, else the problem with it."""
    if shadow.shape != variable.shape:
        return None, (f"shape mismatch: {variable.name} is {list(variable.shape)}, its shadow "
                      f"{shadow.checkpoint_key} is {list(shadow.shape)}")
    if shadow.dtype != variable.dtype:
        return None, (f"dtype mismatch: {variable.name} is {variable.dtype.name}, its shadow "
                      f"{shadow.checkpoint_key} is {shadow.dtype.name}")
    value = shadow.value()
    if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        return None, f"non-finite shadow: {shadow.checkpoint_key} (for {variable.name}) has {bad} NaN/Inf values"
    return value, None


def fold(restored: RestoredModel, match: ShadowMatch, layout_reason: str, allow_missing: bool = False,
         bn_stats: str = "live") -> FoldReport:
    """Check the pairing and collect averaged values.

    Args:
        restored: The model with its live values.
        match: The layout's pairing of shadows with variables.
        layout_reason: Why the layout was chosen, for the report.
        allow_missing: Trainable variables without a shadow serve their live value instead of failing.
        bn_stats: "live" keeps non-trainable variables (BatchNorm statistics) live in both arms even when the
            checkpoint averaged them; "ema" uses their averages in `serve_ema` where the checkpoint has them.

    Raises:
        FoldError: Listing every missing, extra, mismatched, duplicated or non-finite shadow at once.
    """
    problems = list(match.problems)
    folded: list[FoldedVariable] = []
    kept: list[KeptVariable] = []
    values: dict[int, np.ndarray] = {}
    missing: list[str] = []
    for index, variable in enumerate(restored.variables):
        shadow = match.matched.get(index)
        if shadow is None:
            if variable.trainable:
                missing.append(variable.name)
            kept.append(KeptVariable(variable.name, variable.path,
                                     KEPT_NO_SHADOW if variable.trainable else KEPT_NON_TRAINABLE))
            continue
        if not variable.trainable and bn_stats == "live":
            kept.append(KeptVariable(variable.name, variable.path, KEPT_STATS_LIVE))
            continue
        value, problem = _checked_value(variable, shadow)
        if problem:
            problems.append(problem)
            continue
        values[index] = value
        live = np.asarray(variable.variable.numpy())  # restored and checked equal to its checkpoint entry
        folded.append(FoldedVariable(variable.name, variable.path, variable.shape, variable.dtype.name,
                                     shadow.checkpoint_key, relative_l2(live, value)))
    if missing and not allow_missing:
        problems.append(f"missing shadow for {len(missing)} trainable variables: {', '.join(missing)}")
    if match.unmatched:
        problems.append(
            f"{len(match.unmatched)} extra shadows match no model variable: "
            + ", ".join(f"{s.checkpoint_key} (named {s.recorded_name!r})" for s in match.unmatched)
        )
    if problems:
        hint = "Check that --model is the architecture that was trained and that the EMA checkpoint is its own"
        # Not when no trainable variable has a shadow: that is a misread checkpoint, and --allow-missing would
        # serve the raw weights as "EMA".
        if missing and not allow_missing and len(missing) < sum(1 for v in restored.variables if v.trainable):
            hint += "; --allow-missing keeps live values for variables without a shadow"
        raise FoldError(f"The EMA shadows in {match.source} do not fit the model ({len(problems)} problems):",
                        hint=hint, problems=problems)
    warnings = list(match.warnings)
    report = FoldReport(match.layout, layout_reason, match.source, folded, kept, warnings, values)
    if report.ema_equals_live and not match.explains_equality:
        warnings.append(
            "every shadow equals its live value exactly: the EMA was never updated, or was saved as a copy of the "
            "weights (Keras fit() with use_ema=True overwrites the weights with the averages at its end)"
        )
    if bn_stats == "ema" and not any(not v.trainable for i, v in enumerate(restored.variables) if i in values):
        warnings.append("--bn-stats ema: the checkpoint has no averaged non-trainable statistics; both arms use the "
                        "live ones")
    if values and all(not np.any(value) for value in values.values()):
        warnings.append("every shadow is all zeros: averages initialised to zero (as Model Garden's EMA optimizer "
                        "does) that were never updated, or saved before the first step")
    if missing:
        warnings.append(f"{len(missing)} trainable variables have no shadow and serve their live value in serve_ema")
    return report
