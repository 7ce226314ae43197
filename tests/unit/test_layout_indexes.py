"""Layouts look for shadows in the `CheckpointIndexes` they are given, and open nothing themselves.

Each test writes the seed's real training and EMA checkpoints into tmp_path (a few milliseconds, no model, no export),
opens their indexes as the read stage does, and hands the layouts only those indexes and a restored model built from
the stage's own dataclasses. `read.load_count()` counts every checkpoint opened in the process, so a layout that
opened a file instead of asking its index would show up in it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from ema_export import read
from ema_export.layouts import LAYOUTS, choose_layout
from ema_export.layouts.ema_checkpoint import EmaCheckpointLayout
from ema_export.read import ROLE_EMA, ROLE_TRAINING, CheckpointIndexes, open_index
from ema_export.restored import RestoredModel, RestoredVariable
from support import models as tm


def _restored(**values: np.ndarray) -> RestoredModel:
    """A restored model whose variables were saved as `tf.train.Checkpoint(<name>=...)`, holding `values`.

    Layouts read only the variables of it (every other required field is None, filled by name).
    """
    variables = [
        RestoredVariable(variable=tf.Variable(value), path=name, checkpoint_key=f"{name}/.ATTRIBUTES/VARIABLE_VALUE",
                         training_name=name, trainable=True, shape=tuple(value.shape), dtype=tf.float32)
        for name, value in values.items()
    ]
    required = {field.name: None for field in dataclasses.fields(RestoredModel)
                if field.init and field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING}
    return RestoredModel(**{**required, "variables": variables})


@pytest.fixture
def seed(tmp_path) -> tuple[str, str]:
    """The seed layout's training and EMA checkpoint prefixes."""
    return tm.write_seed_checkpoints(tmp_path / "ckpt")


def test_the_ema_checkpoint_layout_pairs_the_shadows_of_the_index_it_is_given(seed):
    training, ema = seed
    indexes = CheckpointIndexes(open_index(training, ROLE_TRAINING), open_index(ema, ROLE_EMA))
    restored = _restored(weights=tm.LIVE_W, biases=tm.LIVE_B)
    layout = EmaCheckpointLayout()
    opened = read.load_count()

    reason = layout.detect(indexes, restored)
    match = layout.collect(indexes, restored)

    assert read.load_count() == opened  # outside an export every open_index opens afresh: none happened
    assert reason == f"{ema} is a separate checkpoint holding 2 values"
    assert (match.layout, match.source, match.unmatched, match.problems) == ("ema-checkpoint", ema, [], [])
    np.testing.assert_array_equal(match.matched[0].value(), tm.EMA_W)
    np.testing.assert_array_equal(match.matched[1].value(), tm.EMA_B)
    assert {(shadow.prefix, shadow.role) for shadow in match.matched.values()} == {(ema, ROLE_EMA)}


def test_without_the_ema_index_no_layout_finds_shadows_in_the_seed_training_checkpoint(seed):
    training, _ = seed
    indexes = CheckpointIndexes(open_index(training, ROLE_TRAINING), None)
    restored = _restored(weights=tm.LIVE_W, biases=tm.LIVE_B)
    opened = read.load_count()

    reasons = {name: layout().detect(indexes, restored) for name, layout in LAYOUTS.items()}

    assert reasons == dict.fromkeys(LAYOUTS)
    assert read.load_count() == opened


def test_choosing_and_collecting_within_one_export_opens_each_checkpoint_once(seed):
    training, ema = seed
    restored = _restored(weights=tm.LIVE_W, biases=tm.LIVE_B)
    opened = read.load_count()

    with read.one_export():
        indexes = CheckpointIndexes(open_index(training, ROLE_TRAINING), open_index(ema, ROLE_EMA))
        layout, reason = choose_layout(indexes, restored)  # the inversion check reads around both checkpoints
        match = layout.collect(indexes, restored)

    assert read.load_count() - opened == 2
    assert layout.name == "ema-checkpoint" and reason.startswith(ema)
    assert sorted(match.matched) == [0, 1]


def test_a_keras_file_is_a_path_beside_the_indexes_not_an_index(tmp_path):
    missing = str(tmp_path / "never-written.keras")
    indexes = CheckpointIndexes(None, None, keras_file=missing)
    restored = _restored(weights=tm.LIVE_W)

    # Layouts of TensorFlow checkpoints find no index to look in; none tries to read the (absent) file as one.
    for name in ("ema-checkpoint", "tracked-shadows", "keras-use-ema", "tf-keras-use-ema", "optimizer-slot",
                 "tf1-names"):
        assert LAYOUTS[name]().detect(indexes, restored) is None
    assert indexes.training_source == missing


def test_indexes_hold_a_training_index_or_a_keras_file_never_both_nor_neither(seed):
    training, _ = seed
    index = open_index(training, ROLE_TRAINING)
    with pytest.raises(ValueError, match="exactly one"):
        CheckpointIndexes(index, None, keras_file="model.keras")
    with pytest.raises(ValueError, match="exactly one"):
        CheckpointIndexes(None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CheckpointIndexes(index, None).ema = index  # type: ignore[misc]
