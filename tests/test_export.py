"""The exporter end to end on real checkpoints: served outputs against numpy, storage, versions, manifest."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import ema_export
from ema_export.errors import FoldError, RestoreError, VersionExistsError, VersionServedError
from ema_export.manifest import read_manifest
from ema_export.names import (
    ASSETS_EXTRA_DIR,
    MANIFEST_FILENAME,
    SIGNATURE_DEFAULT,
    SIGNATURE_EMA,
    SIGNATURE_LIVE,
    WARMUP_FILENAME,
)
from ema_export.private_apis import fresh_fingerprint
from ema_export.write import alias_signature
from support import models as tm
from support.exporting import read_in_parts, written_in_shards

pytestmark = pytest.mark.slow  # every test runs a full export
X = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0], [4.0, 0.25, -0.5, -1.0]], np.float32)


def serve(version_dir, signature, inputs, input_name="inputs"):
    loaded = tf.saved_model.load(str(version_dir))
    return loaded.signatures[signature](**{input_name: tf.constant(inputs)})["output_0"].numpy()


def stored_variables(version_dir):
    return [key for key, _ in tf.train.list_variables(str(version_dir / "variables" / "variables"))
            if key != "_CHECKPOINTABLE_OBJECT_GRAPH"]


@pytest.fixture
def seed_ckpt(tmp_path):
    tm.write_seed_checkpoints(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_seed_module_serves_live_and_ema_values(seed_ckpt, tmp_path):
    result = ema_export.export(seed_ckpt, tmp_path / "models", model=tm.LinearModule)

    assert result.version == 1 and result.version_dir == tmp_path / "models" / "1"
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_LIVE, X), tm.linear_numpy(X, tm.LIVE_W, tm.LIVE_B),
                               rtol=1e-6)
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X), tm.linear_numpy(X, tm.EMA_W, tm.EMA_B),
                               rtol=1e-6)
    np.testing.assert_array_equal(serve(result.version_dir, SIGNATURE_DEFAULT, X),
                                  serve(result.version_dir, SIGNATURE_EMA, X))
    # Live and averaged copies, each once.
    assert len(stored_variables(result.version_dir)) == 4
    assert {item.name for item in result.fold.folded} == {"weights", "biases"}
    assert result.attachment == "checkpoint root"


def test_manifest_records_sources_drift_and_verification(seed_ckpt, tmp_path):
    result = ema_export.export(seed_ckpt, tmp_path / "models", model=tm.LinearModule)
    manifest = read_manifest(result.version_dir)

    assert manifest == json.loads((result.version_dir / ASSETS_EXTRA_DIR / MANIFEST_FILENAME).read_text())
    assert manifest["sources"]["training_checkpoint"].endswith("ckpt/ckpt-1")
    assert manifest["sources"]["ema_checkpoint"].endswith("ckpt/ema/ckpt-1")
    assert any(path.endswith("ckpt-1.index") for path in manifest["sources"]["training_files"])
    assert manifest["layout"]["name"] == "ema-checkpoint"
    drift = {item["name"]: item["relative_l2"] for item in manifest["variables"]["folded"]}
    expected = np.linalg.norm(tm.EMA_W - tm.LIVE_W) / np.linalg.norm(tm.LIVE_W)
    assert drift["weights"] == pytest.approx(expected, rel=1e-6)
    assert manifest["verification"]["passed"] is True
    assert {c["signature"] for c in manifest["verification"]["checks"]} == {SIGNATURE_LIVE, SIGNATURE_EMA,
                                                                          SIGNATURE_DEFAULT}
    assert manifest["versions"]["tensorflow"] == tf.__version__
    assert manifest["signatures"]["default_serves"] == SIGNATURE_EMA
    assert (result.version_dir / ASSETS_EXTRA_DIR / WARMUP_FILENAME).stat().st_size > 0


def test_warmup_records_are_predict_requests_for_both_arms(seed_ckpt, tmp_path):
    from tensorflow_serving.apis import prediction_log_pb2

    result = ema_export.export(seed_ckpt, tmp_path / "models", model=tm.LinearModule)
    records = tf.data.TFRecordDataset(str(result.version_dir / ASSETS_EXTRA_DIR / WARMUP_FILENAME))
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in records]
    assert [log.predict_log.request.model_spec.signature_name for log in logs] == [SIGNATURE_LIVE, SIGNATURE_EMA]
    assert tf.make_ndarray(logs[0].predict_log.request.inputs["inputs"]).shape[1] == tm.NUM_FEATURES


@pytest.mark.parametrize("kind", sorted(tm.KERAS_BUILDERS))
def test_keras_models_fold_trainables_and_share_batchnorm_statistics(kind, tmp_path):
    build = tm.KERAS_BUILDERS[kind]
    signature = None
    if kind == "subclassed":
        # Keras 3 gives a subclassed model's sublayer variables one tf.Variable name ("classifier/kernel" twice), so
        # training must key the EMA dict by the unique `v.path`. Paths carry auto-generated layer names; the export
        # normally runs in a new process, and clearing the session gives the fresh model the names it would get there.
        keras.backend.clear_session()
        keys = tm.write_keras_checkpoints(build, tmp_path / "ckpt", ema_key=lambda v: v.path)
        keras.backend.clear_session()
        signature = ["features:float32:[None,4]"]
    else:
        keys = tm.write_keras_checkpoints(build, tmp_path / "ckpt", seed=len(kind))

    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=build, input_signature=signature)

    live, ema = tm.expected_mlp_outputs(tmp_path / "ckpt", keys, X)
    assert not np.allclose(live, ema)
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_LIVE, X, "features"), live, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X, "features"), ema, rtol=1e-5, atol=1e-5)
    # A second batch size through the reloaded signature.
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X[:1], "features"), ema[:1], rtol=1e-5,
                               atol=1e-5)
    # The session-based loader TF Serving uses runs it too (a SavedModel tracking a Keras 3 model object fails there).
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        meta_graph = tf.compat.v1.saved_model.load(session, ["serve"], str(result.version_dir))
        signature = meta_graph.signature_def[SIGNATURE_EMA]
        served = session.run(signature.outputs["output_0"].name, {signature.inputs["features"].name: X})
    np.testing.assert_allclose(served, ema, rtol=1e-5, atol=1e-5)
    assert len(result.fold.folded) == 6
    assert sorted(item.path.rsplit("/", 1)[-1] for item in result.fold.kept_live) == ["moving_mean",
                                                                                         "moving_variance"]
    # 8 live variables, 6 averaged copies, BatchNorm statistics stored once and shared by both arms.
    assert len(stored_variables(result.version_dir)) == 8 + 6
    assert result.attachment == "model"


@pytest.mark.parametrize("policy", ["live", "ema"])
def test_bn_stats_policy_for_averaged_batchnorm_statistics(tmp_path, policy):
    keys = tm.write_keras_checkpoints(tm.build_sequential, tmp_path / "ckpt", average_all=True)
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.build_sequential, bn_stats=policy)
    _, ema = tm.expected_mlp_outputs(tmp_path / "ckpt", keys, X, averaged_statistics=policy == "ema")
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X, "features"), ema, rtol=1e-5, atol=1e-5)
    assert len(result.fold.folded) == (8 if policy == "ema" else 6)
    assert result.manifest["policies"]["bn_stats"] == policy
    if policy == "live":
        assert all("--bn-stats live" in item.reason for item in result.fold.kept_live)


def signature_defs(version_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel.FromString((version_dir / "saved_model.pb").read_bytes())
    return saved_model.meta_graphs[0].signature_def


def test_serving_default_is_an_exact_alias_of_its_arm(seed_ckpt, tmp_path):
    result = ema_export.export(seed_ckpt, tmp_path / "models", model=tm.LinearModule)
    defs = signature_defs(result.version_dir)
    assert defs[SIGNATURE_DEFAULT] == defs[SIGNATURE_EMA] != defs[SIGNATURE_LIVE]


def test_the_exported_fingerprint_describes_the_edited_saved_model(seed_ckpt, tmp_path):
    result = ema_export.export(seed_ckpt, tmp_path / "models", model=tm.LinearModule)
    written = tf.saved_model.experimental.read_fingerprint(str(result.version_dir))
    assert written == tf.saved_model.experimental.Fingerprint.from_proto(fresh_fingerprint(result.version_dir))


def test_aliasing_a_signature_rewrites_the_fingerprint_tensorflow_wrote(tmp_path):
    module = tf.Module()
    module.scale = tf.Variable(2.0)
    spec = tf.TensorSpec([None], tf.float32, name="x")
    module.live = tf.function(lambda x: {"output_0": x * module.scale}, input_signature=[spec])
    module.ema = tf.function(lambda x: {"output_0": x + module.scale}, input_signature=[spec])
    arms = {SIGNATURE_LIVE: module.live.get_concrete_function(), SIGNATURE_EMA: module.ema.get_concrete_function()}
    tf.saved_model.save(module, str(tmp_path), signatures=arms)
    before = tf.saved_model.experimental.read_fingerprint(str(tmp_path))
    alias_signature(tmp_path, SIGNATURE_DEFAULT, SIGNATURE_EMA)
    after = tf.saved_model.experimental.read_fingerprint(str(tmp_path))
    assert after == tf.saved_model.experimental.Fingerprint.from_proto(fresh_fingerprint(tmp_path))
    assert after.saved_model_checksum != before.saved_model_checksum
    assert after.signature_def_hash != before.signature_def_hash
    assert after.checkpoint_hash == before.checkpoint_hash  # the variables were not touched
    defs = signature_defs(tmp_path)
    assert defs[SIGNATURE_DEFAULT] == defs[SIGNATURE_EMA] != defs[SIGNATURE_LIVE]
    loaded = tf.saved_model.load(str(tmp_path))
    assert loaded.signatures[SIGNATURE_DEFAULT](x=tf.constant([1.0]))["output_0"].numpy().tolist() == [3.0]


def test_default_signature_can_serve_live(seed_ckpt, tmp_path):
    result = ema_export.export(seed_ckpt, tmp_path / "models", model=tm.LinearModule, default_signature="live")
    defs = signature_defs(result.version_dir)
    assert defs[SIGNATURE_DEFAULT] == defs[SIGNATURE_LIVE]
    np.testing.assert_array_equal(serve(result.version_dir, SIGNATURE_DEFAULT, X),
                                  serve(result.version_dir, SIGNATURE_LIVE, X))
    assert result.manifest["signatures"]["default_serves"] == SIGNATURE_LIVE


def test_versions_increment_and_are_never_replaced_without_overwrite(seed_ckpt, tmp_path):
    out = tmp_path / "models"
    assert ema_export.export(seed_ckpt, out, model=tm.LinearModule).version == 1
    assert ema_export.export(seed_ckpt, out, model=tm.LinearModule).version == 2
    (out / "1" / "marker").write_text("old")
    with pytest.raises(VersionExistsError, match="--overwrite"):
        ema_export.export(seed_ckpt, out, model=tm.LinearModule, version=1)
    assert (out / "1" / "marker").exists()
    with pytest.raises(VersionServedError, match="never reloads the same number.*Publish a new number instead"):
        ema_export.export(seed_ckpt, out, model=tm.LinearModule, version=1, overwrite=True)
    assert (out / "1" / "marker").exists()
    assert ema_export.export(seed_ckpt, out, model=tm.LinearModule, version=1, overwrite=True, force=True).version == 1
    assert not (out / "1" / "marker").exists()
    assert ema_export.export(seed_ckpt, out, model=tm.LinearModule, version=7).version == 7
    assert sorted(p.name for p in out.iterdir()) == ["1", "2", "7"]


def test_list_of_shadows_is_matched_through_recorded_names(tmp_path):
    keys = tm.write_keras_checkpoints(tm.build_sequential, tmp_path / "ckpt", as_list=True)
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.build_sequential)
    _, ema = tm.expected_mlp_outputs(tmp_path / "ckpt", keys, X)
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X, "features"), ema, rtol=1e-5, atol=1e-5)
    assert all(item.shadow_key.startswith("ema_weights/") for item in result.fold.folded)


def test_keras3_short_names_are_a_duplicate_claim(tmp_path):
    tm.write_keras_checkpoints(tm.build_sequential, tmp_path / "ckpt", ema_key=lambda v: v.name)
    with pytest.raises(FoldError) as error:
        ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.build_sequential)
    assert "duplicate claim" in str(error.value) and "'kernel'" in str(error.value)
    assert "v.path" in str(error.value)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_keras3_subclassed_variable_names_collide_and_are_reported(tmp_path):
    tm.write_keras_checkpoints(tm.build_subclassed, tmp_path / "ckpt")
    with pytest.raises(FoldError) as error:
        ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=tm.build_subclassed,
                          input_signature=["features:float32:[None,4]"])
    message = str(error.value)
    assert "duplicate claim" in message and "the name of 2 variables" in message
    assert "missing shadow for" in message


def test_wrong_architecture_is_a_restore_error(seed_ckpt, tmp_path):
    with pytest.raises(RestoreError, match="no value"):
        ema_export.export(seed_ckpt, tmp_path / "models", model=tm.build_sequential)


def test_architecture_from_model_keras_in_checkpoint_dir(tmp_path):
    keys = tm.write_keras_checkpoints(tm.build_functional, tmp_path / "ckpt")
    tm.build_functional().save(tmp_path / "ckpt" / "model.keras")
    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models")
    _, ema = tm.expected_mlp_outputs(tmp_path / "ckpt", keys, X)
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X, "features"), ema, rtol=1e-5, atol=1e-5)
    assert "model.keras" in result.model_source


def test_prefixes_can_be_given_directly(tmp_path):
    live_prefix, ema_prefix = tm.write_seed_checkpoints(tmp_path / "elsewhere")
    tm.write_seed_checkpoints(tmp_path / "ckpt", live=(tm.LIVE_W * 3, tm.LIVE_B), ema=(tm.EMA_W * 3, tm.EMA_B))
    result = ema_export.export(live_prefix, tmp_path / "models", model=tm.LinearModule, ema_checkpoint=ema_prefix)
    assert result.sources.training.prefix == live_prefix and result.sources.ema.prefix == ema_prefix
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X), tm.linear_numpy(X, tm.EMA_W, tm.EMA_B),
                               rtol=1e-6)


class LinearWithUnusedScale(tm.LinearModule):
    """A trainable variable the serving function never reads (a training-only temperature, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = tf.Variable(tf.zeros([]), name="scale")


def test_an_average_the_serving_function_never_reads_is_a_manifest_warning(tmp_path):
    module = LinearWithUnusedScale()
    for variable, value in zip((module.weights, module.biases, module.scale), (tm.LIVE_W, tm.LIVE_B, 2.0)):
        variable.assign(value)
    average = tf.train.ExponentialMovingAverage(decay=0.99)
    average.apply([module.weights, module.biases, module.scale])
    for variable, value in zip((module.weights, module.biases, module.scale), (tm.EMA_W, tm.EMA_B, 1.5)):
        average.average(variable).assign(value)
    tf.train.Checkpoint(weights=module.weights, biases=module.biases, scale=module.scale).save(
        str(tmp_path / "ckpt" / "ckpt"))
    shadows = {v.name: average.average(v) for v in (module.weights, module.biases, module.scale)}
    tf.train.Checkpoint(ema_weights=shadows).save(str(tmp_path / "ckpt" / "ema" / "ckpt"))

    result = ema_export.export(tmp_path / "ckpt", tmp_path / "models", model=LinearWithUnusedScale)

    assert [w for w in result.manifest["warnings"] if "not read by the serving function" in w] == [
        "1 averaged variable(s) are not read by the serving function, so their averages change no answer: scale"]
    np.testing.assert_allclose(serve(result.version_dir, SIGNATURE_EMA, X), tm.linear_numpy(X, tm.EMA_W, tm.EMA_B),
                               rtol=1e-6)


def test_an_export_whose_live_values_are_restored_in_parts_gives_the_same_answers(seed_ckpt, tmp_path, monkeypatch):
    """The restore stage's parallel read end to end, on a tiny model read as a large one (a part per variable): the
    export verifies and every signature answers exactly as an export restored through tf.train.Checkpoint."""
    whole = ema_export.export(seed_ckpt, tmp_path / "whole", model=tm.LinearModule)
    reads = read_in_parts(monkeypatch)
    in_parts = ema_export.export(seed_ckpt, tmp_path / "parts", model=tm.LinearModule)

    assert [variables for _, variables in reads] == [2] and in_parts.verification.passed
    _assert_same_answers(in_parts, whole)


def test_an_export_whose_variables_are_written_by_two_writers_verifies_and_serves(seed_ckpt, tmp_path, monkeypatch):
    """The parallel write end to end: the variables written by ema-export's own writer threads while verification
    imports the graph in a worker thread, a sharded checkpoint, TF Serving's load of it, and the same answers as a
    one-shard export."""
    single = ema_export.export(seed_ckpt, tmp_path / "single", model=tm.LinearModule)
    written_in_shards(monkeypatch)  # a tiny model, written as a large one
    sharded = ema_export.export(seed_ckpt, tmp_path / "sharded", model=tm.LinearModule)

    names = sorted(path.name for path in (sharded.version_dir / "variables").iterdir())
    assert names == ["variables.data-00000-of-00003", "variables.data-00001-of-00003",
                     "variables.data-00002-of-00003", "variables.index"]
    assert sharded.verification.passed
    _assert_same_answers(sharded, single)


def _assert_same_answers(ours, theirs) -> None:
    """Every signature of two exports of the seed module answers a batch identically (through tf.saved_model.load)."""
    loaded, reference = (tf.saved_model.load(str(result.version_dir)) for result in (ours, theirs))
    inputs = tf.constant(np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4))
    for signature in (SIGNATURE_LIVE, SIGNATURE_EMA, SIGNATURE_DEFAULT):
        served, expected = (model.signatures[signature] for model in (loaded, reference))
        key = next(iter(served.structured_input_signature[1]))
        np.testing.assert_array_equal(served(**{key: inputs})["output_0"], expected(**{key: inputs})["output_0"])
