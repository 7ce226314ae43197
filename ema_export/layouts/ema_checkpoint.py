"""The seed layout: shadows in a checkpoint of their own, beside the training checkpoint.

Training saves `tf.train.Checkpoint(ema_weights={v.name: ema.average(v) for v in variables})` (or a list) to
`CKPT_DIR/ema/`. A dict gives keys named after the variables (`ema_weights/weights:0/...`, `/` escaped as `.S`); a
list gives positional keys. Either way the object graph records each shadow's own name,
`<variable>/ExponentialMovingAverage`, which names its variable without relying on how the container was keyed.
"""

from __future__ import annotations

from ema_export.checkpoint_graph import iter_variables
from ema_export.layouts.base import (CheckpointShadows, Layout, ShadowMatch, match_by_name, strip_ema_suffix,
                                     strip_output_index)
from ema_export.locate import STEP_VARIABLES
from ema_export.read import CheckpointIndexes
from ema_export.restored import RestoredModel

_BOOKKEEPING = frozenset({"save_counter", *STEP_VARIABLES})


class EmaCheckpointLayout(Layout):
    """Shadows saved in a separate TF2 checkpoint (`CKPT_DIR/ema/` or `--ema-checkpoint`)."""

    name = "ema-checkpoint"
    description = "a separate TF2 checkpoint of ema.average(v) values (CKPT_DIR/ema/ or --ema-checkpoint)"

    def detect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> str | None:
        if indexes.ema is None:
            return None
        graph = indexes.ema.graph
        if graph is None:
            return None
        count = sum(1 for entry in iter_variables(graph) if entry.path[:1] and entry.path[0] not in _BOOKKEEPING)
        if not count:
            return None
        return f"{indexes.ema.prefix} is a separate checkpoint holding {count} values"

    def collect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> ShadowMatch:
        index = indexes.ema
        assert index is not None
        graph = index.graph
        assert graph is not None
        build = CheckpointShadows(index)
        shadows = [
            build.shadow(entry.checkpoint_key, entry.full_name, [strip_ema_suffix(entry.full_name), strip_output_index(entry.path[-1]),
                                              entry.full_name])
            for entry in iter_variables(graph) if entry.path and entry.path[0] not in _BOOKKEEPING
        ]
        return match_by_name(self.name, index.prefix, shadows, restored)
