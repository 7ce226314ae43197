"""LoRA fine-tunes with `use_ema=True`: Keras files hold merged kernels, not the variables, and are refused.

`enable_lora` freezes a layer's kernel and trains two adapters, so the optimizer averages the adapters. Keras saves a
LoRA layer's kernel with the live adapters merged in and zeroes the adapters on load (`Dense.save_own_variables` /
`load_own_variables`, and the same in `EinsumDense`, `Embedding`, `BaseConv`): a `.keras` or `.weights.h5` file holds
neither the frozen base kernel nor the adapters, so the averaged weights cannot be rebuilt from it. Folding the
averaged adapters onto the merged kernel counted the LoRA delta twice, with exit 0. A `tf.train.Checkpoint` of the same
model holds every variable and exports exactly.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import ema_export
from ema_export.errors import RestoreError

pytestmark = pytest.mark.slow

FEATURES = 4
X = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0], [4.0, 0.25, -0.5, -1.0]], np.float32)
TOKENS = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 1, 2]], np.int32)

LORA_MODULE = '''
import keras

def dense():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="features")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))

def dense_lora():
    model = dense()
    model.get_layer("hidden").enable_lora(2)
    return model
'''


def _build(kind: str) -> keras.Model:
    """A tiny model with one layer of `kind` that LoRA (or quantization, then LoRA) is enabled on."""
    keras.utils.set_random_seed(0)
    if kind == "embedding":
        inputs = keras.Input((4,), dtype="int32", name="tokens")
        adapted = keras.layers.Embedding(10, 3, name="adapted")
        hidden = keras.layers.Flatten()(adapted(inputs))
    else:
        inputs = keras.Input((4,), name="features")
        if kind == "conv1d":
            adapted = keras.layers.Conv1D(3, 2, name="adapted")
            hidden = keras.layers.Flatten()(adapted(keras.layers.Reshape((4, 1))(inputs)))
        elif kind == "einsum_dense":
            adapted = keras.layers.EinsumDense("ab,bc->ac", output_shape=8, bias_axes="c", name="adapted")
            hidden = adapted(inputs)
        else:
            adapted = keras.layers.Dense(8, name="adapted")
            hidden = adapted(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.ReLU()(hidden)))
    if kind == "int8_dense":
        model.quantize("int8")  # QLoRA: LoRA on an int8 kernel; Keras re-quantizes the merged kernel on save
    model.get_layer("adapted").enable_lora(2)
    return model


def _inputs(kind: str) -> np.ndarray:
    return TOKENS if kind == "embedding" else X


def _train(model: keras.Model, kind: str) -> keras.Model:
    model.compile(optimizer=keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5), loss="mse")
    rng = np.random.default_rng(0)
    for _ in range(4):
        inputs = (rng.integers(0, 10, (8, 4)).astype(np.int32) if kind == "embedding"
                  else rng.standard_normal((8, FEATURES)).astype(np.float32))
        model.train_on_batch(inputs, rng.standard_normal((8, 2)).astype(np.float32))
    return model


def _serve(version_dir: Path, signature: str, name: str, inputs: np.ndarray) -> np.ndarray:
    function = tf.saved_model.load(str(version_dir)).signatures[signature]
    return function(**{name: tf.constant(inputs)})["output_0"].numpy()


@pytest.mark.parametrize("kind", ["dense", "einsum_dense", "embedding", "conv1d", "int8_dense"])
def test_a_keras_file_of_a_lora_layer_is_refused_and_nothing_is_written(kind, tmp_path):
    model = _train(_build(kind), kind)
    model.save(tmp_path / "model.keras")
    model.save_weights(tmp_path / "model.weights.h5")
    for source, factory in ((tmp_path / "model.keras", None), (tmp_path / "model.weights.h5", lambda: _build(kind))):
        with pytest.raises(RestoreError) as error:
            ema_export.export(source, tmp_path / "out", model=factory)
        message = str(error.value)
        assert f"{source} does not hold 2 trainable variables" in message
        assert "adapted/lora_" in message
        assert "saves LoRA layers with the adapters merged into the weights they adapt" in message
        assert "tf.train.Checkpoint(model=..., optimizer=...)" in message
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_same_lora_fine_tune_from_a_tf_checkpoint_serves_what_training_computed(tmp_path):
    model = _train(_build("dense"), "dense")
    assert [v.path for v in model.trainable_variables] == [
        "adapted/bias", "adapted/lora_kernel_a", "adapted/lora_kernel_b", "head/kernel", "head/bias"]
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=model.optimizer), str(tmp_path / "run"),
                               1).save()
    raw = np.asarray(model(X, training=False))
    model.optimizer.finalize_variable_values(model.trainable_variables)
    averaged = np.asarray(model(X, training=False))
    assert np.abs(raw - averaged).max() > 1e-3

    result = ema_export.export(tmp_path / "run", tmp_path / "out", model=lambda: _build("dense"))
    np.testing.assert_allclose(_serve(result.version_dir, "serve_live", "features", X), raw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_serve(result.version_dir, "serve_ema", "features", X), averaged, rtol=1e-5, atol=1e-5)
    assert {item.name for item in result.fold.folded} >= {"adapted/lora_kernel_a", "adapted/lora_kernel_b"}


def test_cli_refuses_a_lora_keras_file_in_one_short_line(tmp_path):
    (tmp_path / "lora_models.py").write_text(LORA_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import lora_models
    finally:
        sys.path.remove(str(tmp_path))
    model = _train(lora_models.dense_lora(), "dense")
    model.save(tmp_path / "model.keras")
    result = subprocess.run([sys.executable, "-c", "from ema_export.cli import main; main()", "model.keras", "out"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: model.keras does not hold 2 trainable variables")
    assert len(lines[0]) <= 300 + len("Error: ")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_a_kerashub_lora_fine_tune_is_refused_from_its_file_and_exported_from_a_checkpoint(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")

    def classifier() -> keras.Model:
        keras.utils.set_random_seed(1)
        backbone = keras_hub.models.BertBackbone(vocabulary_size=20, num_layers=1, num_heads=2, hidden_dim=8,
                                                 intermediate_dim=16, max_sequence_length=4)
        backbone.enable_lora(rank=2)
        return keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2, preprocessor=None, dropout=0.0)

    def batch(seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"token_ids": rng.integers(1, 20, (8, 4)).astype(np.int32),
                "segment_ids": np.zeros((8, 4), np.int32), "padding_mask": np.ones((8, 4), np.int32)}

    model = classifier()
    optimizer = keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for step in range(4):
        model.train_on_batch(batch(step), np.arange(8) % 2)
    assert any("lora_kernel_a" in v.path for v in model.trainable_variables)
    model.save_weights(tmp_path / "model.weights.h5")
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=optimizer), str(tmp_path / "run"), 1).save()
    probe = batch(99)
    raw = np.asarray(model(probe, training=False))
    optimizer.finalize_variable_values(model.trainable_variables)
    averaged = np.asarray(model(probe, training=False))

    with pytest.raises(RestoreError, match="saves LoRA layers with the adapters merged into the weights they adapt"):
        ema_export.export(tmp_path / "model.weights.h5", tmp_path / "out", model=classifier)
    result = ema_export.export(tmp_path / "run", tmp_path / "out", model=classifier)
    function = tf.saved_model.load(str(result.version_dir)).signatures["serve_ema"]
    served = function(**{key: tf.constant(value) for key, value in probe.items()})["output_0"].numpy()
    np.testing.assert_allclose(served, averaged, rtol=1e-5, atol=1e-5)
    assert np.abs(raw - averaged).max() > 1e-6


KERAS_LAYERS_CHECKED = {
    # Layers whose saving or loading is their own, and what a file of them holds (Keras 3.15, KerasHub 0.32):
    "keras.src.layers.core.dense.Dense": "variables; with LoRA the merged kernel (refused)",
    "keras.src.layers.core.einsum_dense.EinsumDense": "variables; with LoRA the merged kernel (refused)",
    "keras.src.layers.core.embedding.Embedding": "variables; with LoRA the merged embeddings (refused)",
    "keras.src.layers.convolutional.base_conv.BaseConv": "variables; with LoRA the merged kernel (refused)",
    "keras.src.layers.preprocessing.index_lookup.IndexLookup": "tf-idf weights as a copy; nothing trainable",
    "keras.src.layers.preprocessing.text_vectorization.TextVectorization": "its lookup's, as above",
    "keras.src.layers.preprocessing.feature_space.FeatureSpace": "nothing",
    "keras.src.utils.torch_utils.TorchModuleWrapper": "a torch state_dict (torch backend only)",
}


def test_every_keras_layer_that_saves_its_own_way_is_one_we_checked():
    """A Keras release that adds a `save_own_variables` override fails here, so its files are looked at before they
    are trusted (the restore refuses any trainable variable without an entry of its own either way)."""
    from keras.src.layers.layer import Layer

    def overriding(root: type) -> set[str]:
        found = set()
        for subclass in root.__subclasses__():
            if "save_own_variables" in vars(subclass) and subclass.__module__.startswith("keras.src."):
                found.add(f"{subclass.__module__}.{subclass.__qualname__}")
            found |= overriding(subclass)
        return found

    import keras.src.utils.torch_utils  # noqa: F401  (imported lazily by Keras; the census must see it)

    assert overriding(Layer) == set(KERAS_LAYERS_CHECKED)
    assert inspect.getsource(Layer.save_own_variables).count("store[") == 1  # the base stores the variables themselves
