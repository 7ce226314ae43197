"""What Keras 3 training code really writes, exported: KerasHub task models, fit() callbacks, mixed precision.

Each test trains with the real producer (Keras's own callbacks, a KerasHub model built from a config, a
`LossScaleOptimizer`), computes the raw and averaged outputs inside the training process with Keras itself, and
compares them with what the export serves.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import ema_export
from support.exporting import read_in_parts, written_in_shards

keras_hub = pytest.importorskip("keras_hub")

pytestmark = pytest.mark.slow

SEQUENCE_LENGTH = 6


def bert_classifier() -> keras.Model:
    """A tiny KerasHub BERT classifier from a config (no preset download): inputs are the dict
    `{"token_ids", "segment_ids", "padding_mask"}`, declared in that (non-sorted) order."""
    keras.utils.set_random_seed(1)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=20, num_layers=1, num_heads=2, hidden_dim=8,
                                             intermediate_dim=16, max_sequence_length=SEQUENCE_LENGTH)
    return keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2, preprocessor=None, dropout=0.0)


def text_batch(size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"token_ids": rng.integers(1, 20, (size, SEQUENCE_LENGTH)).astype(np.int32),
            "segment_ids": np.zeros((size, SEQUENCE_LENGTH), np.int32),
            "padding_mask": np.ones((size, SEQUENCE_LENGTH), np.int32)}


def train_bert(ckpt_dir) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Fit a few steps with use_ema=True and checkpoint during training; returns (raw, EMA) outputs on a probe."""
    model = bert_classifier()
    optimizer = keras.optimizers.Adam(0.01, use_ema=True, ema_momentum=0.5)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for step in range(4):
        model.train_on_batch(text_batch(8, step), np.arange(8) % 2)
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=optimizer), str(ckpt_dir), 2).save()
    probe = text_batch(3, 99)
    raw = np.asarray(model(probe, training=False))
    optimizer.finalize_variable_values(model.trainable_variables)  # Keras's own copy of the averages into the model
    return raw, np.asarray(model(probe, training=False)), probe


def serve(version_dir, signature: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    function = tf.saved_model.load(str(version_dir)).signatures[signature]
    return function(**{name: tf.constant(value) for name, value in inputs.items()})["output_0"].numpy()


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    """One KerasHub training run shared by the tests that export it (building and fitting BERT is the slow part)."""
    directory = tmp_path_factory.mktemp("bert") / "run"
    raw, averaged, probe = train_bert(directory)
    return directory, raw, averaged, probe


def test_kerashub_dict_inputs_export_and_serve_by_name(bert_run, tmp_path):
    run, raw, averaged, probe = bert_run
    assert not np.allclose(raw, averaged)
    result = ema_export.export(run, tmp_path / "out", model=bert_classifier)
    signature = tf.saved_model.load(str(result.version_dir)).signatures["serve_ema"]
    assert sorted(signature.structured_input_signature[1]) == ["padding_mask", "segment_ids", "token_ids"]
    np.testing.assert_allclose(serve(result.version_dir, "serve_live", probe), raw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(serve(result.version_dir, "serve_ema", probe), averaged, rtol=1e-5, atol=1e-5)

    # --input-signature names the dict's keys, in any order.
    specs = [f"{key}:int32:[None,{SEQUENCE_LENGTH}]" for key in ("padding_mask", "token_ids", "segment_ids")]
    given = ema_export.export(run, tmp_path / "out", model=bert_classifier, input_signature=specs)
    function = tf.saved_model.load(str(given.version_dir)).signatures["serve_ema"]
    assert function.structured_input_signature[1]["token_ids"].shape.as_list() == [None, SEQUENCE_LENGTH]
    np.testing.assert_allclose(serve(given.version_dir, "serve_ema", probe), averaged, rtol=1e-5, atol=1e-5)

    with pytest.raises(ema_export.EmaExportError, match="dict of inputs keyed token_ids, segment_ids, padding_mask"):
        ema_export.export(run, tmp_path / "out2", model=bert_classifier, input_signature=["inputs:int32:[None,6]"])


def test_kerashub_model_restored_in_parts_and_written_in_shards_serves_the_same(bert_run, tmp_path, monkeypatch):
    """The restore's parallel read and the write's own checkpoint writer on a real Keras 3 model written by fit
    (BERT read and written as if it were large: a part per variable, two writer threads): every weight gets its
    value, both arms serve what the trained model computed."""
    run, raw, averaged, probe = bert_run
    reads = read_in_parts(monkeypatch)
    written = written_in_shards(monkeypatch)
    result = ema_export.export(run, tmp_path / "out", model=bert_classifier)
    assert len(reads) == 1 and reads[0][1] > 20  # every weight of the model, each in a part of its own
    assert len(written) == 2 and sum(count for _, count in written) > 2 * 20  # both arms' weights, over two threads
    data = sorted(path.name for path in (result.version_dir / "variables").glob("variables.data-*"))
    assert data == [f"variables.data-0000{i}-of-00003" for i in range(3)]
    np.testing.assert_allclose(serve(result.version_dir, "serve_live", probe), raw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(serve(result.version_dir, "serve_ema", probe), averaged, rtol=1e-5, atol=1e-5)


# --- 1 and 6: SwapEMAWeights(swap_on_epoch=True) + ModelCheckpoint, per-epoch files ---------------------------------

import json  # noqa: E402

from click.testing import CliRunner  # noqa: E402

from ema_export.cli import cli  # noqa: E402
from ema_export.errors import LayoutError  # noqa: E402
from support import models as tm  # noqa: E402
from support.producers import keras_ema as kp  # noqa: E402


def mlp_from_file(path, trainable: list[np.ndarray]) -> np.ndarray:
    statistics = [kp.h5_values(path)[key] for key in kp.MLP_STATISTICS]
    return kp.mlp_outputs(trainable, statistics)


@pytest.fixture(scope="module")
def swapped_run(tmp_path_factory):
    """One fit() with SwapEMAWeights(swap_on_epoch=True) + ModelCheckpoint for 3 epochs, shared (read only)."""
    directory = tmp_path_factory.mktemp("swapped") / "run"
    _, truth = kp.fit_with_swapped_checkpoints(directory, tm.build_functional, epochs=3)
    return directory, truth


def test_swap_ema_weights_checkpoints_are_refused_then_swapped_back_with_inverted(swapped_run, tmp_path):
    run, truth = swapped_run
    assert sorted(p.name for p in run.iterdir()) == ["model-01.keras", "model-02.keras", "model-03.keras"]
    middle = run / "model-02.keras"
    # What Keras really wrote: the model holds the epoch's averages (to within the swap's rounding).
    np.testing.assert_allclose(kp.h5_values(middle)["layers/dense/vars/0"], truth[1][1][0], rtol=1e-6, atol=1e-6)

    with pytest.raises(LayoutError, match="is an inverted EMA checkpoint") as refused:
        ema_export.export(middle, tmp_path / "out")
    assert "model-03.keras, the newest file of its series, holds its averages twice" in str(refused.value)
    assert "--inverted" in str(refused.value)
    # The same file chosen from the directory with --step (item 6): refused the same way.
    with pytest.raises(LayoutError, match="model-02.keras is an inverted EMA checkpoint"):
        ema_export.export(run, tmp_path / "out", step=2)

    result = ema_export.export(middle, tmp_path / "out", inverted=True)  # architecture from the file itself
    assert result.manifest["policies"]["inverted"] is True
    assert "arms swapped back (--inverted)" in result.manifest["layout"]["reason"]
    raw, averages = truth[1]
    np.testing.assert_allclose(kp.serve(result.version_dir, "serve_live"), mlp_from_file(middle, raw),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kp.serve(result.version_dir, "serve_ema"), mlp_from_file(middle, averages),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(mlp_from_file(middle, raw), mlp_from_file(middle, averages), atol=1e-3)

    # The directory itself: the newest file by its number (the finalized last epoch), said so (item 6).
    newest = ema_export.export(run, tmp_path / "out")
    assert newest.sources.training.prefix.endswith("model-03.keras")
    assert "newest by the number in its name, of 3 Keras files" in newest.sources.training.chosen_by
    assert any("averages equal their weights exactly" in warning for warning in newest.warnings)


def test_checkpoints_without_the_swap_are_not_taken_for_inverted(tmp_path):
    model = kp.compiled(tm.build_functional, keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5))
    x, y = kp.fit_arrays(4)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
              callbacks=[keras.callbacks.ModelCheckpoint(str(tmp_path / "run" / "ckpt-{epoch}.weights.h5"),
                                                         save_weights_only=True)])
    result = ema_export.export(tmp_path / "run", tmp_path / "out", model=lambda: kp.compiled(
        tm.build_functional, keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5)))
    assert result.sources.training.prefix.endswith("ckpt-2.weights.h5")
    assert not result.warnings


def test_cli_inverted_is_recorded_and_not_inverted_exports_as_is(swapped_run, tmp_path):
    middle = swapped_run[0] / "model-01.keras"
    swapped = CliRunner().invoke(cli, [str(middle), str(tmp_path / "out"), "--inverted", "--json"])
    assert swapped.exit_code == 0, swapped.output
    assert json.loads(swapped.stdout)["policies"]["inverted"] is True
    as_is = CliRunner().invoke(cli, [str(middle), str(tmp_path / "out"), "--not-inverted", "--json"])
    assert as_is.exit_code == 0, as_is.output
    live_swapped = kp.serve(tmp_path / "out" / "1", "serve_live")
    np.testing.assert_allclose(kp.serve(tmp_path / "out" / "2", "serve_ema"), live_swapped, rtol=1e-5, atol=1e-5)


# --- 4: a --model of another width, and a Keras file trained without use_ema ------------------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

WIDE_MODULE = '''
import keras
from support import models as tm

def wide():
    inputs = keras.Input((tm.NUM_FEATURES,), name="features")
    hidden = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Dense(16)(inputs)))
    return keras.Model(inputs, keras.layers.Dense(tm.NUM_CLASSES)(hidden), name="classifier")
'''


def run_command(*args, cwd) -> subprocess.CompletedProcess:
    """The installed command line, in its own process: what a user's terminal shows, stderr included."""
    tests = str(Path(__file__).parent)
    return subprocess.run([sys.executable, "-c", "from ema_export.cli import main; main()", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{cwd}:{tests}"})


def test_wrong_width_model_is_one_restore_error_line_and_nothing_else(tmp_path):
    (tmp_path / "wide_models.py").write_text(WIDE_MODULE)
    model = kp.train_on_batches(kp.compiled(tm.build_functional))
    model.save(tmp_path / "model.keras")
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=model.optimizer), str(tmp_path / "tf"),
                               1).save()
    for source in (tmp_path / "model.keras", tmp_path / "tf"):
        result = run_command(source, tmp_path / "out", "--model", "wide_models:wide", "--json", cwd=tmp_path)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("Error: 7 of 8 model variables have another shape than in ")
        assert "[4, 16] in the model, [4, 5] in the checkpoint" in lines[0] and " more" in lines[0]
        assert len(lines[0]) <= len("Error: ") + 330  # about 300: the first problem is never cut below 80
        assert "pass the --model that was trained" in lines[0]
        assert json.loads(result.stdout)["type"] == "RestoreError"


def test_keras_file_without_use_ema_leads_with_the_cause(tmp_path):
    model = kp.train_on_batches(kp.compiled(tm.build_functional, keras.optimizers.Adam(0.05)))
    model.save(tmp_path / "model.keras")
    with pytest.raises(LayoutError) as error:
        ema_export.export(tmp_path / "model.keras", tmp_path / "out")
    assert str(error.value).startswith(f"No EMA shadows in {tmp_path / 'model.keras'}: its optimizer config says "
                                       "Adam use_ema=False")
    assert "Layouts tried" not in str(error.value)


# --- 3: mixed precision, a LossScaleOptimizer's averages under optimizer/inner_optimizer/vars -------------------------


def test_mixed_precision_keras_file_serves_its_averages(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = kp.train_on_batches(kp.compiled(tm.build_functional))
        assert type(model.optimizer).__name__ == "LossScaleOptimizer"
        model.save(tmp_path / "model.keras")
        raw = np.asarray(model(kp.X, training=False), np.float32)
        model.optimizer.inner_optimizer.finalize_variable_values(model.trainable_variables)
        averaged = np.asarray(model(kp.X, training=False), np.float32)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert any(key.startswith("optimizer/inner_optimizer/vars/") for key in kp.h5_values(tmp_path / "model.keras"))

    result = ema_export.export(tmp_path / "model.keras", tmp_path / "out")  # rebuilt in mixed precision
    assert "optimizer/inner_optimizer/vars" in result.fold.folded[0].shadow_key
    np.testing.assert_allclose(kp.serve(result.version_dir, "serve_live"), raw, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(kp.serve(result.version_dir, "serve_ema"), averaged, rtol=1e-2, atol=1e-2)
    assert not any("mixed precision" in warning for warning in result.warnings)

    float32 = ema_export.export(tmp_path / "model.keras", tmp_path / "out", model=tm.build_functional)
    assert any("trained in mixed precision (mixed_float16)" in warning and "computes in float32" in warning
               for warning in float32.warnings)


# --- 9: unnamed inputs serve under one name, whichever way the model was rebuilt -----------------------------------


def unnamed_inputs_model() -> keras.Model:
    inputs = keras.Input((tm.NUM_FEATURES,))  # no name: Keras numbers it per process
    return keras.Model(inputs, keras.layers.Dense(tm.NUM_CLASSES)(inputs))


def test_unnamed_inputs_serve_under_the_same_name_from_file_or_factory(tmp_path):
    for _ in range(3):
        unnamed_inputs_model()  # advance Keras's name counters, as a training script does
    model = kp.train_on_batches(kp.compiled(unnamed_inputs_model))
    (tmp_path / "run").mkdir()
    model.save(tmp_path / "run" / "model.keras")
    names = []
    for source in (None, unnamed_inputs_model):
        result = ema_export.export(tmp_path / "run" / "model.keras", tmp_path / "out", model=source)
        function = tf.saved_model.load(str(result.version_dir)).signatures["serve_ema"]
        names.append(sorted(function.structured_input_signature[1]))
    assert names == [["inputs"], ["inputs"]]
