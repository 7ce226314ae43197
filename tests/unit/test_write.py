"""The write stage on a tiny model of each family: the files `tf.saved_model.save` writes, the graph before the
variables, large variables as shards written at once, and verification's TF Serving-style load in its two halves.

The model is `y = x @ w + b` with known weights (tests/unit/test_adapters.py); the EMA arm reads an averaged `w`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from ema_export.assemble import assemble
from ema_export.contracts import SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE
from ema_export.private_apis import SavedModelInParts, SavedTensor, fresh_fingerprint
from ema_export.verify import TfServingLoad
from ema_export.write import (
    MAX_WRITERS,
    PARALLEL_WRITE_MIN_BYTES,
    balanced,
    write_in_shards,
    write_savedmodel,
    write_savedmodel_whole,
    writers_for,
)
from tests.unit.test_adapters import BIAS, FAMILIES, INPUTS, KERNEL, _fresh
from tests.unit.test_assemble import AVERAGED_KERNEL, _restored

EXPECTED = {SIGNATURE_LIVE: INPUTS @ KERNEL + BIAS, SIGNATURE_EMA: INPUTS @ AVERAGED_KERNEL + BIAS,
            SIGNATURE_DEFAULT: INPUTS @ AVERAGED_KERNEL + BIAS}


def _assembly(factory=FAMILIES[0][1]):
    return assemble(_restored(_fresh(factory)), {0: tf.Variable(AVERAGED_KERNEL)})


def _feed(assembly) -> dict[str, np.ndarray]:
    return {assembly.input_signature[0].name: INPUTS}


def _checkpoint(directory) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(directory / "variables" / "variables"))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()}


def _meta_graph(directory):
    return saved_model_pb2.SavedModel.FromString((directory / "saved_model.pb").read_bytes()).meta_graphs[0]


def _files(directory) -> set[str]:
    return {str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file()}


def _served(directory, assembly) -> dict[str, np.ndarray]:
    with TfServingLoad(directory) as load:
        served = load.run(_feed(assembly))
    return {name: outputs["output_0"] for name, (_, outputs) in served.items()}


def test_the_files_and_values_are_those_tf_saved_model_save_writes_and_serve_alike(tmp_path):
    assembly = _assembly()
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    write_savedmodel(assembly, ours)
    write_savedmodel_whole(assembly, theirs)  # tf.saved_model.save, then the alias: the fallback where save moved

    assert _files(ours) == _files(theirs)
    ours_values, theirs_values = _checkpoint(ours), _checkpoint(theirs)
    assert ours_values.keys() == theirs_values.keys()
    for key, value in theirs_values.items():
        if key != "_CHECKPOINTABLE_OBJECT_GRAPH":
            np.testing.assert_array_equal(ours_values[key], value, err_msg=key)
    ours_graph, theirs_graph = (_meta_graph(ours), _meta_graph(theirs))
    assert dict(ours_graph.signature_def) == dict(theirs_graph.signature_def)
    assert [node.WhichOneof("kind") for node in ours_graph.object_graph_def.nodes] == [
        node.WhichOneof("kind") for node in theirs_graph.object_graph_def.nodes]
    fingerprint = tf.saved_model.experimental.read_fingerprint(str(ours))  # written after the variables it checksums
    assert fingerprint == tf.saved_model.experimental.Fingerprint.from_proto(fresh_fingerprint(ours))
    for directory in (ours, theirs):
        for signature, output in _served(directory, assembly).items():
            np.testing.assert_allclose(output, EXPECTED[signature], err_msg=f"{directory.name} {signature}")


@pytest.mark.parametrize(("name", "factory"), FAMILIES, ids=[name for name, _ in FAMILIES])
def test_verification_loads_the_graph_while_the_variables_are_not_yet_written(name, factory, tmp_path):
    assembly = _assembly(factory)
    loads = []

    def graph_written():
        assert (tmp_path / "saved_model.pb").exists() and not (tmp_path / "variables").exists()
        loads.append(TfServingLoad(tmp_path))

    write_savedmodel(assembly, tmp_path, graph_written)
    with loads[0] as load:
        served = load.run(_feed(assembly))
    for signature, expected in EXPECTED.items():
        np.testing.assert_allclose(served[signature][1]["output_0"], expected, err_msg=signature)


def test_large_variables_are_shards_of_one_checkpoint_that_tf_serving_and_tf_load_read(tmp_path):
    assembly = _assembly()
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    sharded.mkdir(), single.mkdir()
    write_savedmodel(assembly, sharded, writers=2)
    write_savedmodel(assembly, single, writers=0)

    # two writers and the object graph's shard; the shards' temporary directory is gone
    assert sorted(path.name for path in (sharded / "variables").iterdir()) == [
        *(f"variables.data-0000{i}-of-00003" for i in range(3)), "variables.index"]
    assert sorted(path.name for path in (single / "variables").iterdir()) == [
        "variables.data-00000-of-00001", "variables.index"]
    sharded_values, single_values = _checkpoint(sharded), _checkpoint(single)
    assert sharded_values.keys() == single_values.keys()
    for key, value in single_values.items():  # the object graph included
        np.testing.assert_array_equal(sharded_values[key], value, err_msg=key)
    readers = [tf.train.load_checkpoint(str(directory / "variables" / "variables")) for directory in (sharded, single)]
    assert readers[0].get_variable_to_dtype_map() == readers[1].get_variable_to_dtype_map()
    assert readers[0].get_variable_to_shape_map() == readers[1].get_variable_to_shape_map()
    for signature, output in _served(sharded, assembly).items():
        np.testing.assert_allclose(output, EXPECTED[signature], err_msg=signature)
    loaded = tf.saved_model.load(str(sharded)).signatures[SIGNATURE_EMA]
    np.testing.assert_allclose(loaded(**{assembly.input_signature[0].name: tf.constant(INPUTS)})["output_0"],
                               EXPECTED[SIGNATURE_EMA])


def test_state_that_is_not_numbers_goes_to_tensorflow_s_shard_and_every_value_matches_tf_saved_model_save(tmp_path):
    """A module with variables of several dtypes and a mutable lookup table (string keys): the numbers are written by
    the writer threads, the table's strings and the object graph by `SaveV2`, and the merged checkpoint holds every
    key, dtype, shape and value `tf.saved_model.save` writes."""
    module = tf.Module()
    module.kernel = tf.Variable(np.arange(12, dtype=np.float32).reshape(3, 4))
    module.half = tf.Variable(tf.constant([0.5, -1.5], tf.bfloat16))
    module.step = tf.Variable(tf.constant(41, tf.int64))
    module.table = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, default_value=-1)
    module.table.insert(tf.constant(["ema", "live"]), tf.constant([1, 2], tf.int64))
    module.serve = tf.function(lambda x: {"y": tf.matmul(x, module.kernel)},
                               input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    signatures = {"serve": module.serve.get_concrete_function()}
    tf.saved_model.save(module, str(tmp_path / "reference"), signatures=signatures)
    ours = tmp_path / "ours"
    ours.mkdir()
    parts = SavedModelInParts(module, signatures)
    parts.write_graph(ours)
    given = []
    parts.write_variables(ours, lambda prefix, tensors: (given.append(len(tensors)),
                                                         write_in_shards(prefix, tensors, writers=2)))

    assert given, "the writer was given the tensors"
    assert sorted(path.name for path in (ours / "variables").glob("variables.data-*")) == [
        f"variables.data-0000{i}-of-00003" for i in range(3)]
    readers = [tf.train.load_checkpoint(str(directory / "variables" / "variables"))
               for directory in (ours, tmp_path / "reference")]
    assert readers[0].get_variable_to_dtype_map() == readers[1].get_variable_to_dtype_map()
    assert readers[0].get_variable_to_shape_map() == readers[1].get_variable_to_shape_map()
    for key in readers[1].get_variable_to_shape_map():
        np.testing.assert_array_equal(readers[0].get_tensor(key), readers[1].get_tensor(key), err_msg=key)
    table = {key: readers[0].get_tensor(key) for key in readers[0].get_variable_to_shape_map() if "table" in key}
    assert sorted(value.dtype.kind for value in table.values()) == ["O", "i"]  # the keys (strings) and the values
    assert int(tf.saved_model.load(str(ours)).step) == 41


def test_shards_are_balanced_by_bytes_largest_first():
    sizes = [40, 10, 30, 20, 20]  # float32 elements: 160, 40, 120, 80 and 80 bytes
    tensors = [SavedTensor(f"t{i}", "", tf.zeros([n])) for i, n in enumerate(sizes)]
    shards = balanced(tensors, 2)
    assert sorted([item.tensor.shape[0] for item in shard] for shard in shards) == [[30, 20, 10], [40, 20]]
    assert len(balanced(tensors, 8)) == 5  # never an empty shard


def test_writers_are_one_per_cpu_only_for_large_variables():
    large = [PARALLEL_WRITE_MIN_BYTES // 4] * 4
    assert writers_for(large, cpus=2) == 2
    assert writers_for(large, cpus=64) == MAX_WRITERS
    assert writers_for(large, cpus=1) == 1
    assert writers_for([PARALLEL_WRITE_MIN_BYTES // 4] * 3, cpus=2) == 0  # too little in all: TensorFlow's saver
    assert writers_for([PARALLEL_WRITE_MIN_BYTES // 4096] * 4096, cpus=2) == 2  # many small variables too
    assert writers_for(large) >= 1


def test_a_table_s_vocabulary_is_copied_and_its_init_op_runs_while_the_signatures_executor_is_built(tmp_path):
    """An asset (a lookup table's vocabulary file) goes into the export, and verification's load runs the init op
    that reads it, with the asset's path fed as TF Serving feeds it, before the signatures run."""
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("ema\nlive\n")
    module = tf.Module()
    module.table = tf.lookup.StaticHashTable(tf.lookup.TextFileInitializer(
        str(vocabulary), tf.string, tf.lookup.TextFileIndex.WHOLE_LINE, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER),
        default_value=-1)
    module.serve = tf.function(lambda words: {"ids": module.table.lookup(words)},
                               input_signature=[tf.TensorSpec([None], tf.string, name="words")])
    export = tmp_path / "export"
    export.mkdir()
    parts = SavedModelInParts(module, {SIGNATURE_LIVE: module.serve.get_concrete_function()})
    parts.write_graph(export)
    parts.write_variables(export)
    vocabulary.unlink()  # the export reads its own copy
    assert (export / "assets" / "vocabulary.txt").read_text() == "ema\nlive\n"
    with ThreadPoolExecutor(max_workers=1) as pool, TfServingLoad(export) as load:
        load.prepare_run(pool)
        load.restore()
        served = load.run({"words": np.array([b"live", b"ema", b"other"], object)})
    assert served[SIGNATURE_EMA] is None
    assert served[SIGNATURE_LIVE][1]["ids"].tolist() == [1, 0, -1]
