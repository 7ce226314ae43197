"""The private TensorFlow, Keras and tf-keras interfaces ema-export relies on exist in the installed releases.

When an upgrade moves one of them, this test fails first and names it; the accessors then raise one
`PrivateApiError` in place of an AttributeError deep inside an export.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from ema_export.private_apis import (
    _TF_ASSETS,
    _TF_FINGERPRINT_WRITER,
    _TF_FINGERPRINTING,
    _TF_LOADER,
    _TF_SAVE,
    PrivateApiError,
    SavedModelInParts,
    _module_with,
    built_averages,
    fresh_fingerprint,
    keras_saving_lib,
    optimizer_averages,
    session_callable,
    tf1_loader,
    tf_keras_saving_lib,
)


def test_keras_and_tf_keras_saving_internals_are_present():
    assert callable(keras_saving_lib()._save_state) and callable(keras_saving_lib().load_weights_only)
    assert callable(tf_keras_saving_lib()._save_state) and callable(tf_keras_saving_lib()._load_state)


def test_a_keras_optimizer_s_averages_are_found_for_each_variable():
    variables = [keras.Variable([1.0, 2.0]), keras.Variable([[3.0]])]
    optimizer = keras.optimizers.SGD(use_ema=True)
    optimizer.build(variables)
    averages = optimizer_averages(optimizer, variables)
    assert [tuple(average.shape) for average in averages] == [(2,), (1, 1)]


@pytest.mark.parametrize(("optimizers", "variable"), [(keras.optimizers, keras.Variable),
                                                     (tf_keras.optimizers, tf.Variable)], ids=["keras", "tf_keras"])
def test_a_built_optimizer_s_averages_are_listed_in_the_order_it_was_built_on(optimizers, variable):
    variables = [variable([1.0, 2.0]), variable([[3.0]])]
    optimizer = optimizers.SGD(use_ema=True)
    optimizer.build(variables)
    averages = built_averages(optimizer)
    positions = {id(variable): position for position, variable in enumerate(optimizer.variables)}
    assert [tuple(average.shape) for average in averages] == [(2,), (1, 1)]
    assert all(id(average) in positions for average in averages)  # where the saved file keeps them


def test_a_moved_interface_is_one_error_naming_it():
    with pytest.raises(PrivateApiError, match="no _save_state_moved") as raised:
        _module_with("keras.src.saving.saving_lib", ("_save_state_moved",))
    assert "keras 3" in raised.value.hint
    with pytest.raises(PrivateApiError, match="_model_variables_moving_average"):
        optimizer_averages(object(), [])
    with pytest.raises(PrivateApiError, match="_model_variables_moving_average"):
        built_averages(object())


def test_tensorflow_s_fingerprint_is_computed_afresh_as_save_wrote_it(tmp_path):
    module = tf.Module()
    module.scale = tf.Variable(2.0)
    module.serve = tf.function(lambda x: {"y": x * module.scale}, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tmp_path), signatures={"serve": module.serve.get_concrete_function()})
    written = tf.saved_model.experimental.read_fingerprint(str(tmp_path))
    fresh = tf.saved_model.experimental.Fingerprint.from_proto(fresh_fingerprint(tmp_path))
    assert fresh == written and fresh.saved_model_checksum != 0


def test_a_moved_tensorflow_interface_is_one_error_naming_it_and_the_tested_releases():
    with pytest.raises(PrivateApiError, match="no CreateFingerprintDef_moved; .*fingerprint.pb") as raised:
        _module_with(_TF_FINGERPRINTING[0], ("CreateFingerprintDef_moved",), "it rewrites fingerprint.pb")
    assert "tensorflow 2.16-2.21" in raised.value.hint


def test_tensorflow_s_save_and_load_internals_are_present():
    for name, attributes in (_TF_SAVE, _TF_ASSETS, _TF_FINGERPRINT_WRITER, _TF_LOADER):
        assert all(callable(getattr(_module_with(name, attributes), attribute)) for attribute in attributes), name


def _scaling_module() -> tf.Module:
    module = tf.Module()
    module.scale = tf.Variable(2.0)
    module.serve = tf.function(lambda x: {"y": x * module.scale}, input_signature=[tf.TensorSpec([None], tf.float32)])
    return module


def test_a_savedmodel_written_in_parts_loads_like_one_tf_saved_model_save_wrote(tmp_path):
    module = _scaling_module()
    parts = SavedModelInParts(module, {"serve": module.serve.get_concrete_function()})
    assert "serve" in parts.saved_model.meta_graphs[0].signature_def
    parts.write_graph(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["assets", "saved_model.pb"]
    parts.write_variables(tmp_path)
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == ["assets", "fingerprint.pb", "saved_model.pb", "variables"]
    loaded = tf.saved_model.load(str(tmp_path))
    assert float(loaded.signatures["serve"](tf.constant([1.5]))["y"][0]) == 3.0


def test_the_saved_tensors_are_what_the_saver_writes_and_a_writer_gets_them(tmp_path):
    """`saved_tensors` lists exactly the keys TensorFlow's saver writes (the object graph included), each value the
    variable's own buffer; a writer given them leaves the checkpoint."""
    module = _scaling_module()
    module.table = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, default_value=-1)
    module.table.insert(tf.constant(["ema"]), tf.constant([1], tf.int64))
    parts = SavedModelInParts(module, {"serve": module.serve.get_concrete_function()})
    saved = parts.saved_tensors()
    tf.saved_model.save(module, str(tmp_path / "reference"), signatures={"serve": module.serve.get_concrete_function()})
    reference = tf.train.load_checkpoint(str(tmp_path / "reference" / "variables" / "variables"))
    assert sorted(item.key for item in saved) == sorted(reference.get_variable_to_shape_map())
    scale = next(item.tensor for item in saved if item.key.startswith("scale/"))
    assert float(scale) == 2.0 and all(item.slice_spec == "" for item in saved)

    received = []

    def writer(prefix, tensors):
        received.append(len(tensors))
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=[item.key for item in tensors],
                          shape_and_slices=[item.slice_spec for item in tensors],
                          tensors=[item.tensor for item in tensors])

    parts.write_graph(tmp_path / "ours")
    parts.write_variables(tmp_path / "ours", writer)
    assert received == [len(saved)]
    assert float(tf.saved_model.load(str(tmp_path / "ours")).signatures["serve"](tf.constant([1.5]))["y"][0]) == 3.0


def test_a_session_callable_is_built_at_once_and_the_loader_imports_without_restoring(tmp_path):
    module = _scaling_module()
    tf.saved_model.save(module, str(tmp_path), signatures={"serve": module.serve.get_concrete_function()})
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        loader = tf1_loader().SavedModelLoader(str(tmp_path))
        saver, _ = loader.load_graph(session.graph, ["serve"])
        with pytest.raises(tf.errors.InvalidArgumentError):  # a missing tensor is found now, not on the first run
            session_callable(session, [], ["no_such_tensor:0"], [])
        saver_def = saver.saver_def
        restore = session_callable(session, [saver_def.filename_tensor_name], [], [saver_def.restore_op_name])
        signature = loader.get_meta_graph_def_from_tags(["serve"]).signature_def["serve"]
        run = session_callable(session, [signature.inputs["x"].name], [signature.outputs["y"].name], [])
        restore(str(tmp_path / "variables" / "variables").encode())
        assert list(run(np.array([1.5], np.float32))[0]) == [3.0]
    with pytest.raises(PrivateApiError, match="_make_callable_from_options"):
        session_callable(object(), [], [], [])


def test_which_objects_save_state_of_their_own_is_what_tf_train_checkpoint_asks():
    import keras

    from ema_export.private_apis import saves_state_of_its_own

    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    assert saves_state_of_its_own(layer.kernel) and saves_state_of_its_own(tf.Variable(1.0))
    assert not saves_state_of_its_own(layer) and not saves_state_of_its_own(tf.Module())
    assert saves_state_of_its_own(tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, -1))
    assert not saves_state_of_its_own(object())
