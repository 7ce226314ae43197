"""The assemble stage on a tiny model of each family: the EMA arm is the live arm's one traced function run on the
averages, sharing every variable that is not averaged, and saved with the model's graph once.

The model is `y = x @ w + b` with known weights; the EMA arm gets an averaged `w` and must read the live `b`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from ema_export.assemble import assemble
from ema_export.contracts import SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE
from ema_export.restored import RestoredModel, RestoredVariable
from tests.unit.test_adapters import BIAS, FAMILIES, INPUTS, KERNEL, _fresh

AVERAGED_KERNEL = np.array([[10.0], [20.0]], np.float32)


def _restored(fresh, *extra: tf.Variable) -> RestoredModel:
    variables = [RestoredVariable(variable=v, path="", checkpoint_key="", training_name=name, trainable=True,
                                  shape=tuple(v.shape), dtype=tf.as_dtype(v.dtype))
                 for v, name in zip([*fresh.adapter.variables(fresh.model), *extra], ["kernel", "bias", "unused"])]
    required = {field.name: None for field in dataclasses.fields(RestoredModel)
                if field.init and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING}
    return RestoredModel(**{**required, "fresh": fresh, "variables": variables})


@pytest.mark.parametrize(("name", "factory"), FAMILIES, ids=[name for name, _ in FAMILIES])
def test_ema_arm_reads_the_average_and_shares_the_rest(name, factory):
    fresh = _fresh(factory)
    restored = _restored(fresh)
    assembly = assemble(restored, {0: tf.Variable(AVERAGED_KERNEL)})
    live, ema = assembly.functions[SIGNATURE_LIVE], assembly.functions[SIGNATURE_EMA]

    np.testing.assert_allclose(ema(tf.constant(INPUTS))["output_0"], INPUTS @ AVERAGED_KERNEL + BIAS)
    np.testing.assert_allclose(live(tf.constant(INPUTS))["output_0"], INPUTS @ KERNEL + BIAS)
    restored.variables[1].variable.assign([1.5])  # the bias is shared: the EMA arm sees the change
    np.testing.assert_allclose(ema(tf.constant(INPUTS))["output_0"], INPUTS @ AVERAGED_KERNEL + 1.5)
    assert len({id(v) for v in assembly.root.variables}) == 3  # live kernel, live bias, averaged kernel
    assert assembly.unread_averages == ()
    assert assembly.functions[SIGNATURE_DEFAULT] is ema


@pytest.mark.parametrize(("name", "factory"), FAMILIES, ids=[name for name, _ in FAMILIES])
def test_the_model_is_traced_once_and_saved_once(name, factory, tmp_path):
    fresh = _fresh(factory)
    assembly = assemble(_restored(fresh), {0: tf.Variable(AVERAGED_KERNEL)})
    ema_ops = {op.type for op in assembly.signatures[SIGNATURE_EMA].graph.get_operations()}
    assert "MatMul" not in ema_ops and "StatefulPartitionedCall" in ema_ops

    def bodies_with_the_model(signatures) -> int:
        """How many saved functions hold the model's MatMul (a tf.Module's own tf.function is saved too)."""
        path = tmp_path / "-".join(signatures)
        tf.saved_model.save(assembly.root, str(path), signatures={k: assembly.signatures[k] for k in signatures})
        saved = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
        library = saved.meta_graphs[0].graph_def.library.function
        return sum(any(node.op == "MatMul" for node in function.node_def) for function in library)

    assert bodies_with_the_model([SIGNATURE_LIVE, SIGNATURE_EMA]) == bodies_with_the_model([SIGNATURE_LIVE])
    served = tf.saved_model.load(str(tmp_path / f"{SIGNATURE_LIVE}-{SIGNATURE_EMA}")).signatures[SIGNATURE_EMA]
    outputs = served(**{key: tf.constant(INPUTS) for key in served.structured_input_signature[1]})
    np.testing.assert_allclose(outputs["output_0"], INPUTS @ AVERAGED_KERNEL + BIAS)


def test_an_average_the_serving_function_never_reads_is_named():
    fresh = _fresh(FAMILIES[0][1])
    unused = tf.Variable([3.0])
    assembly = assemble(_restored(fresh, unused), {0: tf.Variable(AVERAGED_KERNEL), 2: tf.Variable([4.0])})
    assert assembly.unread_averages == ("unused",)
