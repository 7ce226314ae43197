"""Stage 4, fold: validate the layout's pairing and decide the averaged value of every variable.

Validation is total and raises once: every trainable variable gets a shadow (or is reported), every shadow belongs
to a variable, shapes and dtypes agree, values are finite, nothing is claimed twice. Non-trainable variables
(BatchNorm moving statistics, counters) keep their live values in both arms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ema_export.errors import FoldError
from ema_export.layouts import ShadowMatch
from ema_export.restore import RestoredModel

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


def fold(restored: RestoredModel, match: ShadowMatch, layout_reason: str, allow_missing: bool = False) -> FoldReport:
    """Check the pairing and collect averaged values.

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
        if not variable.trainable:
            kept.append(KeptVariable(variable.name, variable.path, KEPT_NON_TRAINABLE))
            continue
        if shadow is None:
            missing.append(variable.name)
            kept.append(KeptVariable(variable.name, variable.path, KEPT_NO_SHADOW))
            continue
        if shadow.shape != variable.shape:
            problems.append(f"shape mismatch: {variable.name} is {list(variable.shape)}, its shadow "
                            f"{shadow.checkpoint_key} is {list(shadow.shape)}")
            continue
        if shadow.dtype != variable.dtype:
            problems.append(f"dtype mismatch: {variable.name} is {variable.dtype.name}, its shadow "
                            f"{shadow.checkpoint_key} is {shadow.dtype.name}")
            continue
        value = shadow.value()
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            problems.append(f"non-finite shadow: {shadow.checkpoint_key} (for {variable.name}) has {bad} NaN/Inf values")
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
        if missing and not allow_missing:
            hint += "; --allow-missing keeps live values for variables without a shadow"
        raise FoldError(f"The EMA shadows in {match.source} do not fit the model ({len(problems)} problems):",
                        hint=hint, problems=problems)
    warnings = list(match.warnings)
    report = FoldReport(match.layout, layout_reason, match.source, folded, kept, warnings, values)
    if report.ema_equals_live:
        warnings.append(
            "every shadow equals its live value exactly: the EMA was never updated, or was saved as a copy of the "
            "weights (Keras fit() with use_ema=True overwrites the weights with the averages at its end)"
        )
    if missing:
        warnings.append(f"{len(missing)} trainable variables have no shadow and serve their live value in serve_ema")
    return report
