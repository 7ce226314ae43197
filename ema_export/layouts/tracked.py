"""Shadows tracked in the training checkpoint itself, beside the model.

Training code that saves `tf.train.Checkpoint(model=model, ema=[ema.average(v) for v in variables])` (or a dict, or
any other attribute name) keeps one checkpoint. The shadows are whatever variables outside the model's own subtree
carry the name `tf.train.ExponentialMovingAverage` gives them: `<variable>/ExponentialMovingAverage[_N]`.
"""

from __future__ import annotations

from ema_export.checkpoint_graph import iter_variables
from ema_export.layouts.base import (CheckpointShadows, Layout, Shadow, ShadowMatch, match_by_name, strip_ema_suffix,
                                     strip_output_index)
from ema_export.read import CheckpointIndexes
from ema_export.restored import RestoredModel


class TrackedShadowsLayout(Layout):
    """EMA shadows saved in the training checkpoint, outside the model."""

    name = "tracked-shadows"
    description = "ema.average(v) values tracked in the training checkpoint beside the model"

    def _shadows(self, indexes: CheckpointIndexes, restored: RestoredModel) -> list[Shadow]:
        index = indexes.training
        graph = index.graph if index is not None else None
        if index is None or graph is None:
            return []
        build = CheckpointShadows(index)
        suffix = f"/{self.settings.ema_name}" if self.settings.ema_name else None
        shadows = []
        for entry in iter_variables(graph):
            if entry.node_id in restored.object_paths:
                continue  # the model's own variables
            if suffix and entry.full_name.endswith(suffix):
                variable_name = entry.full_name[: -len(suffix)]
            else:
                variable_name = strip_ema_suffix(entry.full_name)
            if variable_name is None:
                continue
            claimed = [variable_name, strip_output_index(entry.path[-1]) if entry.path else None]
            shadows.append(build.shadow(entry.checkpoint_key, entry.full_name, claimed))
        return shadows

    def detect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> str | None:
        shadows = self._shadows(indexes, restored)
        if not shadows:
            return None
        containers = sorted({s.checkpoint_key.split("/", 1)[0] for s in shadows})
        return (f"{indexes.training_source} holds {len(shadows)} values named <variable>/ExponentialMovingAverage "
                f"outside the model (under {', '.join(containers)})")

    def collect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> ShadowMatch:
        return match_by_name(self.name, indexes.training_source, self._shadows(indexes, restored), restored)
