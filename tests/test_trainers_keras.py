"""What Keras 3 training code really writes, exported: KerasHub task models, fit() callbacks, mixed precision.

Each test trains with the real producer (Keras's own callbacks, a KerasHub model built from a config, a
`LossScaleOptimizer`), computes the raw and averaged outputs inside the training process with Keras itself, and
compares them with what the export serves.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras

import ema_export

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


def test_kerashub_dict_inputs_export_and_serve_by_name(tmp_path):
    raw, averaged, probe = train_bert(tmp_path / "run")
    assert not np.allclose(raw, averaged)
    result = ema_export.export(tmp_path / "run", tmp_path / "out", model=bert_classifier)
    signature = tf.saved_model.load(str(result.version_dir)).signatures["serve_ema"]
    assert sorted(signature.structured_input_signature[1]) == ["padding_mask", "segment_ids", "token_ids"]
    np.testing.assert_allclose(serve(result.version_dir, "serve_live", probe), raw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(serve(result.version_dir, "serve_ema", probe), averaged, rtol=1e-5, atol=1e-5)


def test_kerashub_input_signature_names_the_dict_keys(tmp_path):
    raw, averaged, probe = train_bert(tmp_path / "run")
    specs = [f"{key}:int32:[None,{SEQUENCE_LENGTH}]" for key in ("padding_mask", "token_ids", "segment_ids")]
    result = ema_export.export(tmp_path / "run", tmp_path / "out", model=bert_classifier, input_signature=specs)
    function = tf.saved_model.load(str(result.version_dir)).signatures["serve_ema"]
    assert function.structured_input_signature[1]["token_ids"].shape.as_list() == [None, SEQUENCE_LENGTH]
    np.testing.assert_allclose(serve(result.version_dir, "serve_ema", probe), averaged, rtol=1e-5, atol=1e-5)

    with pytest.raises(ema_export.EmaExportError, match="dict of inputs keyed token_ids, segment_ids, padding_mask"):
        ema_export.export(tmp_path / "run", tmp_path / "out2", model=bert_classifier,
                          input_signature=["inputs:int32:[None,6]"])
