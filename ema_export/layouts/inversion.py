"""Inverted checkpoints: files whose model holds the moving averages and whose EMA slots hold the raw weights.

Two producers write them on purpose, and neither says so inside the file:

- Keras: `callbacks=[SwapEMAWeights(swap_on_epoch=True), ModelCheckpoint(...)]`, the documented way to checkpoint EMA
  weights (`keras/src/callbacks/swap_ema_weights.py`, docstring lines 33-39). The callback swaps model weights and
  averages at every `on_epoch_end` (lines 173-176) and back at `on_epoch_begin` (168-171), so the checkpoint callback
  after it saves every epoch swapped. On the last epoch it also copies the swapped-in averages back over the averages
  (`_finalize_ema_values`, lines 177-182), so the last file holds the averages twice. `ModelCheckpoint` without the
  swap writes in `on_epoch_end` too, before `fit()` finalizes, so its last file never holds equal copies: a finalized
  file written by the same `ModelCheckpoint` series is the swap's signature, and it marks every earlier file of that
  series as inverted.
- Model Garden: `EMACheckpointing` writes `<model_dir>/ema_checkpoints/average_weights-<step>` between two swaps
  (`optimizer_slot.find_inversion`). A renamed copy is recognised by value: it mirrors a checkpoint of the same step
  beside it; when neither of the two is named by Model Garden, which one is inverted cannot be known and the export
  is refused.

Where the evidence is ambiguous, the export is refused; `--inverted` swaps the arms back explicitly (recorded in the
manifest) and `--not-inverted` exports the file as it is.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ema_export.errors import LayoutError
from ema_export.layouts.base import Shadow, ShadowMatch
from ema_export.restored import RestoredModel

INVERTED_FLAGS = "--inverted (swap the arms back) or --not-inverted (export it as it is)"


@dataclass(frozen=True)
class Finding:
    """What the evidence says about a checkpoint: `inverted` True/False, or None when it cannot be told."""

    prefix: str
    inverted: bool | None
    evidence: str
    instead: str = ""
    """A checkpoint to pass instead, when one is known to hold both values exactly."""


def refuse(finding: Finding) -> LayoutError:
    """The error for a checkpoint that is, or may be, inverted and was not declared with --inverted/--not-inverted."""
    if finding.inverted:
        instead = f"Pass {finding.instead} as CKPT_DIR instead, or " if finding.instead else "Pass "
        return LayoutError(
            f"{finding.prefix} is an inverted EMA checkpoint ({finding.evidence}): its model holds the moving "
            "averages and its optimizer's EMA values the raw weights, so exported as it is serve_ema would serve "
            "the raw weights",
            hint=f"{instead}--inverted to export it with the arms swapped back (recorded in the manifest), or "
            f"--not-inverted if it is not. Received: {finding.prefix}",
        )
    return LayoutError(
        f"Cannot tell whether {finding.prefix} is an inverted EMA checkpoint ({finding.evidence})",
        hint=f"Say which it is: {INVERTED_FLAGS}. Received: {finding.prefix}",
    )


def swap_arms(match: ShadowMatch, restored: RestoredModel) -> ShadowMatch:
    """The pairing of an inverted checkpoint, turned the right way round: each matched variable takes its shadow's
    value (the raw weight) and its new shadow is the value the model held (the average).

    The variables of the restored model are assigned here, once, before folding reads them; a shadow whose shape or
    dtype does not fit is left as it is for folding to report.
    """
    swapped: dict[int, Shadow] = {}
    for index, shadow in match.matched.items():
        variable = restored.variables[index]
        if shadow.shape != variable.shape or shadow.dtype != variable.dtype:
            swapped[index] = shadow
            continue
        held = np.asarray(variable.variable.numpy()).copy()
        variable.variable.assign(shadow.value())
        swapped[index] = dataclasses.replace(
            shadow, checkpoint_key=variable.checkpoint_key or variable.path,
            recorded_name=f"{variable.name} (model value of the inverted checkpoint)", read=held.copy,
            prefix=None)
    note = (f"--inverted: the model values of {match.source} were served as the averages and its EMA values as the "
            f"raw weights ({len(swapped)} variables swapped back)")
    return dataclasses.replace(match, matched=swapped, warnings=[*match.warnings, note])


# --- Keras files: SwapEMAWeights(swap_on_epoch=True) before ModelCheckpoint ------------------------------------------

_NUMBER = re.compile(r"\d+")


def series_pattern(name: str) -> re.Pattern[str] | None:
    """`model-03.keras` -> a pattern matching `model-<N>.keras`, capturing N; None for a name without a number."""
    numbers = list(_NUMBER.finditer(name))
    if not numbers:
        return None
    last = numbers[-1]
    return re.compile(re.escape(name[: last.start()]) + r"(\d+)" + re.escape(name[last.end():]) + "$")


def keras_series(path: str) -> dict[int, str]:
    """The files of the numbered series `path` belongs to (`model-{epoch:02d}.keras`), by number."""
    pattern = series_pattern(Path(path).name)
    if pattern is None:
        return {}
    found = {}
    for candidate in Path(path).parent.iterdir():
        matched = pattern.match(candidate.name)
        if matched and candidate.is_file():
            found[int(matched.group(1))] = str(candidate)
    return found


def _holds_averages_twice(path: str, pairs: list[tuple[str, str]]) -> bool:
    """Whether every (weight, average) pair of the file is equal: the file was finalized."""
    from ema_export.keras_files import read_value

    try:
        return bool(pairs) and all(np.array_equal(read_value(path, weight), read_value(path, average))
                                   for weight, average in pairs)
    except (KeyError, OSError, ValueError):  # a sibling of another architecture says nothing about this file
        return False


def _steps(path: str, counter_key: str) -> int | None:
    from ema_export.keras_files import read_value

    try:
        return int(read_value(path, counter_key))
    except (KeyError, OSError, ValueError, TypeError):
        return None


def judge_keras_file(path: str, pairs: list[tuple[str, str]], counter_key: str) -> Finding | None:
    """Whether a Keras file was written between SwapEMAWeights's swaps, from the files written beside it.

    Args:
        path: The `.keras` / `.weights.h5` file being exported.
        pairs: (weight key, average key) of every trainable variable, as the layout paired them in `path`.
        counter_key: Key of the optimizer's step counter.

    Returns:
        None when nothing beside the file says anything; otherwise the finding with its evidence.
    """
    if _holds_averages_twice(path, pairs):
        return None  # finalized itself: the existing warning says both arms serve the averages
    steps = _steps(path, counter_key)
    series = keras_series(path)
    newer = {number: other for number, other in series.items() if other != path
             and (_steps(other, counter_key) or 0) > (steps or 0)}
    if newer:
        newest = newer[max(newer)]
        if _holds_averages_twice(newest, pairs):
            return Finding(path, True, f"{Path(newest).name}, the newest file of its series, holds its averages "
                           "twice, as SwapEMAWeights(swap_on_epoch=True) leaves the last epoch's checkpoint of "
                           "ModelCheckpoint; every earlier epoch was saved with weights and averages swapped")
        return None
    later_finalized = [other for other in sorted(Path(path).parent.iterdir())
                       if other.name.endswith((".keras", ".weights.h5")) and str(other) not in series.values()
                       and (_steps(str(other), counter_key) or 0) > (steps or 0)
                       and _holds_averages_twice(str(other), pairs)]
    if later_finalized:
        return Finding(path, None, f"{later_finalized[0].name}, written later, holds its averages twice: it was "
                       "saved either after fit() returned (then this file is a regular checkpoint) or by "
                       "SwapEMAWeights(swap_on_epoch=True) before a checkpoint callback (then this file is inverted)")
    return None
