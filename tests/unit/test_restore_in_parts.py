"""The restore stage's parallel read of a large model made of variables only: each variable gets its checkpoint
value, as through `tf.train.Checkpoint`, on a tiny model of each family (the thresholds are lowered to reach it).

The model is `y = x @ w + b` with known weights (tests/unit/test_adapters.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import ema_export.restore_by_graph as restore_by_graph
from ema_export.checkpoint_graph import iter_variables, match_objects, read_object_graph, variable_identity
from ema_export.fresh_model import build_fresh_model
from ema_export.private_apis import saves_state_of_its_own
from ema_export.restore_by_graph import PART_BYTES, _objects, in_parts, restore_in_parts
from tests.unit.test_adapters import BIAS, FAMILIES, KERNEL, _fresh


def _saved(tmp_path, factory) -> str:
    return tf.train.Checkpoint(model=_fresh(factory).model).write(str(tmp_path / "ckpt"))


def _entries(model, prefix):
    """variable_identity -> (variable, graph entry) for each variable of `model`, matched through the checkpoint's
    object graph (as the restore stage matches them)."""
    graph = read_object_graph(tf.train.load_checkpoint(prefix))
    node = next(child.node_id for child in graph.nodes[0].children if child.local_name == "model")
    matched = match_objects(graph, node, model)
    return {variable_identity(matched[entry.node_id][0]): (matched[entry.node_id][0], entry)
            for entry in iter_variables(graph, node) if entry.node_id in matched}


def _targets(model, prefix):
    """(variable, checkpoint key) for each variable of `model`."""
    return [(variable, entry.checkpoint_key) for variable, entry in _entries(model, prefix).values()]


@pytest.mark.parametrize("part_bytes", [1, PART_BYTES], ids=["a-part-each", "one-part"])
@pytest.mark.parametrize(("name", "factory"), FAMILIES, ids=[name for name, _ in FAMILIES])
def test_each_variable_gets_its_checkpoint_value_read_in_parts_two_at_once(tmp_path, name, factory, part_bytes):
    prefix = _saved(tmp_path, factory)
    fresh = build_fresh_model(".", model=factory)  # initializer values
    targets = _targets(fresh.model, prefix)
    assert len(targets) == 2
    restore_in_parts(prefix, targets, workers=2, part_bytes=part_bytes)
    restore_in_parts(prefix, [], workers=2)  # nothing to read: no op at all
    kernel, bias = fresh.adapter.variables(fresh.model)
    np.testing.assert_array_equal(np.asarray(kernel), KERNEL)
    np.testing.assert_array_equal(np.asarray(bias), BIAS)


def test_an_entry_of_another_dtype_fails_as_in_tensorflow_s_restore(tmp_path):
    prefix = _saved(tmp_path, FAMILIES[2][1])
    fresh = build_fresh_model(".", model=FAMILIES[2][1])
    (_, kernel_key), *_ = _targets(fresh.model, prefix)
    wrong = tf.Variable(np.zeros(KERNEL.shape, np.float64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="dtype"):
        restore_in_parts(prefix, [(wrong, kernel_key)], workers=2)


def test_only_large_models_of_variables_alone_each_with_its_entry_are_read_in_parts(tmp_path, monkeypatch):
    prefix = _saved(tmp_path, FAMILIES[2][1])
    fresh = build_fresh_model(".", model=FAMILIES[2][1])
    shapes = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    entries = _entries(fresh.model, prefix)

    def plan(chosen):
        return in_parts(_objects(fresh.model), chosen, shapes)  # the objects walked afresh: tables are added below

    assert plan(entries) is None  # 12 bytes: one RestoreV2 through tf.train.Checkpoint
    monkeypatch.setattr(restore_by_graph, "IN_PARTS_MIN_BYTES", 0)
    monkeypatch.setattr(restore_by_graph, "IN_PARTS_MIN_MEAN_BYTES", 0)
    planned = plan(entries)
    assert sorted(key for _, key in planned) == sorted(entry.checkpoint_key for _, entry in entries.values())
    assert plan(dict(list(entries.items())[:1])) is None  # a variable without its entry
    fresh.model.static = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer([b"a"], [1], tf.string, tf.int64), -1)
    assert plan(entries) is not None  # rebuilt from its initializer: nothing in a checkpoint
    fresh.model.table = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, -1)
    assert saves_state_of_its_own(fresh.model.table) and not saves_state_of_its_own(fresh.model.static)
    assert plan(entries) is None  # its keys and values only tf.train.Checkpoint restores
