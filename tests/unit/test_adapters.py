"""Each model family's adapter on a tiny model of that family: which adapter owns it, its declared inputs, build,
the live call and the variables. The model is `y = x @ w + b` with known weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from ema_export.adapters import ADAPTERS, adapter_for
from ema_export.fresh_model import build_fresh_model

KERNEL = np.array([[1.0], [2.0]], np.float32)
BIAS = np.array([0.5], np.float32)
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


