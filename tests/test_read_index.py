"""The read stage: each checkpoint is opened once per export, and its index is shared by restore and every layout."""

from __future__ import annotations

import dataclasses

import pytest

import ema_export
from ema_export import read
from ema_export.checkpoint_graph import iter_variables, node_paths
from support import models as tm


def test_an_export_opens_each_checkpoint_once(tmp_path):
    tm.write_seed_checkpoints(tmp_path / "ckpt")
    before = read.load_count()

    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.LinearModule)

    # The training checkpoint (locate's step, restore, layout detection and collection) and the EMA checkpoint.
    assert read.load_count() - before == 2
    assert {item.name for item in result.fold.folded} == {"weights", "biases"}


def test_within_one_export_an_index_is_opened_once_and_shared(tmp_path):
    training, ema = tm.write_seed_checkpoints(tmp_path / "ckpt")
    before = read.load_count()

    with read.one_export():
        first = read.open_index(training, read.ROLE_TRAINING)
        assert read.open_index(training, read.ROLE_TRAINING) is first
        assert read.open_index(ema, read.ROLE_EMA) is not first

    assert read.load_count() - before == 2
    assert read.open_index(training, read.ROLE_TRAINING) is not first  # outside an export, files are read afresh
    assert read.load_count() - before == 3


def test_an_index_holds_the_maps_and_the_object_graph(tmp_path):
    training, _ = tm.write_seed_checkpoints(tmp_path / "ckpt")

    index = read.open_index(training, read.ROLE_TRAINING)

    assert index.shapes["weights/.ATTRIBUTES/VARIABLE_VALUE"] == list(tm.LIVE_W.shape)
    assert index.dtypes["biases/.ATTRIBUTES/VARIABLE_VALUE"].name == "float32"
    assert index.graph is not None
    paths = {index.node_paths[entry.node_id] for entry in iter_variables(index.graph)}
    assert paths == {("weights",), ("biases",), ("save_counter",)}
    assert index.node_paths == node_paths(index.graph)
    with pytest.raises(dataclasses.FrozenInstanceError):
        index.prefix = "elsewhere"  # type: ignore[misc]
