"""TF1 name-based checkpoints: shadows saved by a `tf.compat.v1.train.Saver` under `<variable>/ExponentialMovingAverage`.

`tf.compat.v1.train.ExponentialMovingAverage` names each shadow after its variable: `<var>/ExponentialMovingAverage`,
with `_N` appended when the name was taken (a second EMA over the same variables), or `<var>/<name>` when the EMA was
created with `name=`. Zero-debiasing adds `.../biased` and `.../local_step`, which are bookkeeping, not shadows.

The shadow of a partitioned variable is saved whole too (`<var>/ExponentialMovingAverage` for the parts
`<var>/part_<i>`), so each part the restore stage restored from a slice of `<var>` takes the same slice of it.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from ema_export.errors import name_list
from ema_export.layouts.base import CheckpointShadows, Layout, Shadow, ShadowMatch
from ema_export.read import CheckpointIndexes
from ema_export.restore_by_name import PartSlice, parts_by_entry, tile
from ema_export.restored import RestoredModel

_DEFAULT_SUFFIX = r"ExponentialMovingAverage(_\d+)?"


class Tf1NamesLayout(Layout):
    """`<variable>/ExponentialMovingAverage[_N]` (or `<variable>/<--ema-name>`) in a name-based checkpoint."""

    name = "tf1-names"
    description = "<variable>/ExponentialMovingAverage entries of a name-based (TF1 Saver) checkpoint"

    def _pattern(self) -> re.Pattern[str]:
        suffix = re.escape(self.settings.ema_name) if self.settings.ema_name else _DEFAULT_SUFFIX
        return re.compile(rf"^(?P<variable>.+)/(?P<suffix>{suffix})$")

    def _shadow_keys(self, indexes: CheckpointIndexes) -> dict[str, list[str]]:
        """Variable name -> keys of its shadows, for a name-based training checkpoint (else empty)."""
        index = indexes.training
        if index is None or index.graph is not None:
            return {}
        pattern = self._pattern()
        found: dict[str, list[str]] = {}
        for key in sorted(index.shapes):
            match = pattern.match(key)
            if match:
                found.setdefault(match.group("variable"), []).append(key)
        return found

    def detect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> str | None:
        found = self._shadow_keys(indexes)
        if not found:
            return None
        suffix = self.settings.ema_name or "ExponentialMovingAverage"
        return f"{indexes.training_source} is name-based and holds {sum(map(len, found.values()))} <variable>/{suffix} entries"

    def collect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> ShadowMatch:
        found = self._shadow_keys(indexes)
        if not found:
            return ShadowMatch(self.name, indexes.training_source, {}, [], [])
        assert indexes.training is not None  # only a name-based TensorFlow checkpoint has keys found
        build = CheckpointShadows(indexes.training)

        def shadow(key: str, variable_name: str) -> Shadow:
            return build.shadow(key, key, [variable_name])

        position_of = {variable.training_name: index for index, variable in enumerate(restored.variables)}
        parts = parts_by_entry(restored.variables)
        matched: dict[int, Shadow] = {}
        unmatched: list[Shadow] = []
        problems: list[str] = []
        for variable_name, keys in found.items():
            if variable_name not in position_of and variable_name not in parts:
                unmatched += [shadow(key, variable_name) for key in keys]
            elif len(keys) > 1:
                problems.append(
                    f"ambiguous shadows for {variable_name}: {name_list(keys)} (two EMAs averaged it); pass "
                    "--ema-name with the name of the one to export")
            elif variable_name in position_of:
                matched[position_of[variable_name]] = shadow(keys[0], variable_name)
            else:
                sliced = _part_shadows(shadow(keys[0], variable_name), parts[variable_name], restored)
                if isinstance(sliced, str):
                    problems.append(sliced)
                else:
                    matched.update(sliced)
        return ShadowMatch(self.name, indexes.training_source, matched, unmatched, problems)


def _part_shadows(whole: Shadow, parts: dict[int, int], restored: RestoredModel) -> dict[int, Shadow] | str:
    """Each part's slice of a shadow saved whole, by the part's position in `restored.variables` (part index ->
    position in `parts`), each read alone by TensorFlow's restore op; or why the parts do not tile it."""
    slices = tile(whole.shape, {part: restored.variables[position].shape for part, position in parts.items()})
    if isinstance(slices, str):
        return (f"shadow {whole.checkpoint_key} is {list(whole.shape)}, which the model's parts of it do not tile: "
                f"{slices}")
    return {parts[part]: dataclasses.replace(whole, shape=part_slice.shape, slice_spec=part_slice.spec,
                                             read=functools.partial(_part_value, whole, part_slice))
            for part, part_slice in zip(sorted(parts), slices)}


def _part_value(whole: Shadow, part: PartSlice) -> np.ndarray:
    return part.of(whole.value())
