"""Each model family's adapter on a tiny model of that family: which adapter owns it, its declared inputs, build,
the live call, the variables, and the EMA call with one averaged variable and one shared live one.

The model is `y = x @ w + b` with known weights; the EMA arm gets an averaged `w` and must read the live `b`, stored
once in the export root.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from ema_export.adapters import ADAPTERS, adapter_for
from ema_export.checkpoint_graph import children_of
from ema_export.fresh_model import build_fresh_model
from ema_export.restored import RestoredModel, RestoredVariable

KERNEL = np.array([[1.0], [2.0]], np.float32)
BIAS = np.array([0.5], np.float32)
AVERAGED_KERNEL = np.array([[10.0], [20.0]], np.float32)
INPUTS = np.array([[1.0, 1.0], [2.0, 0.0]], np.float32)


def _keras3():
    import keras

    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])


def _tf_keras():
    import tf_keras

    return tf_keras.Sequential([tf_keras.Input((2,)), tf_keras.layers.Dense(1)])


class _Linear(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kernel = tf.Variable(tf.zeros([2, 1]))
        self.shift = tf.Variable(tf.zeros([1]))  # named to sort after `kernel`: tf.Module lists by attribute name

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
    def __call__(self, x):
        return tf.matmul(x, self.kernel) + self.shift


FAMILIES = [("keras", _keras3), ("tf_keras", _tf_keras), ("module", _Linear)]


def _fresh(factory):
    fresh = build_fresh_model(".", model=factory)
    kernel, bias = fresh.adapter.variables(fresh.model)
    kernel.assign(KERNEL)
    bias.assign(BIAS)
    return fresh


def _graph_paths(root) -> dict[int, str]:
    """Object-graph path of each variable below `root`, as restore records it (shortest path first)."""
    paths: dict[int, str] = {}
    queue, seen = [(root, "")], {id(root)}
    while queue:
        obj, path = queue.pop(0)
        for name, child in children_of(obj).items():
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_path = f"{path}/{name}" if path else name
            if isinstance(child, tf.Variable) or hasattr(child, "assign"):
                paths.setdefault(id(child), child_path)
            queue.append((child, child_path))
    return paths


def _restored(fresh) -> RestoredModel:
    paths = _graph_paths(fresh.model)
    variables = [RestoredVariable(variable=v, path=paths.get(id(v), ""), checkpoint_key="", training_name=name,
                                  trainable=True, shape=tuple(v.shape), dtype=tf.as_dtype(v.dtype))
                 for v, name in zip(fresh.adapter.variables(fresh.model), ["kernel", "bias"])]
    required = {field.name: None for field in dataclasses.fields(RestoredModel)
                if field.init and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING}
    return RestoredModel(**{**required, "fresh": fresh, "variables": variables})


def test_registry_lists_each_family_once_and_rejects_other_objects():
    assert [adapter.name for adapter in ADAPTERS] == ["keras", "tf_keras", "module"]
    assert adapter_for(object()) is None


@pytest.mark.parametrize(("name", "factory"), FAMILIES, ids=[name for name, _ in FAMILIES])
def test_adapter_owns_its_family_and_declares_its_inputs(name, factory):
    fresh = build_fresh_model(".", model=factory)
    assert fresh.adapter.name == name
    assert adapter_for(fresh.model) is fresh.adapter
    assert [spec.shape.as_list() for spec in fresh.input_signature] == [[None, 2]]
    assert fresh.is_keras == (name == "keras") and fresh.is_tf_keras == (name == "tf_keras")


@pytest.mark.parametrize(("name", "factory"), FAMILIES, ids=[name for name, _ in FAMILIES])
def test_build_creates_variables_and_call_runs_the_live_weights(name, factory):
    fresh = _fresh(factory)
    assert [tuple(v.shape) for v in fresh.adapter.variables(fresh.model)] == [(2, 1), (1,)]
    np.testing.assert_allclose(fresh.call(fresh.model, [tf.constant(INPUTS)]), INPUTS @ KERNEL + BIAS)


@pytest.mark.parametrize(("name", "factory"), FAMILIES, ids=[name for name, _ in FAMILIES])
def test_ema_call_reads_the_average_and_shares_the_rest(name, factory):
    fresh = _fresh(factory)
    restored = _restored(fresh)
    averaged = tf.Variable(AVERAGED_KERNEL)
    root, copied = tf.Module(), []
    fresh.adapter.track_live(root, fresh.model)
    ema = fresh.adapter.ema_call(restored, {0: averaged}, root, copied)

    np.testing.assert_allclose(ema(tf.constant(INPUTS)), INPUTS @ AVERAGED_KERNEL + BIAS)
    np.testing.assert_allclose(fresh.call(fresh.model, [tf.constant(INPUTS)]), INPUTS @ KERNEL + BIAS)
    assert copied == []  # the bias hangs at an attribute, so the EMA arm shares the live one
    live_bias = restored.variables[1].variable
    live_bias.assign([1.5])  # a shared variable: the EMA arm sees the change
    np.testing.assert_allclose(ema(tf.constant(INPUTS)), INPUTS @ AVERAGED_KERNEL + 1.5)
    # Stored once each: live kernel, live bias, averaged kernel.
    stored = {id(v) for v in root.variables}
    assert len(stored) == 3
