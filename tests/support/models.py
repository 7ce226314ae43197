"""Tiny models with known weights, and real training/EMA checkpoints of them, shared by the tests.

The checkpoints are written by the real producers (`tf.train.Checkpoint`, `tf.train.ExponentialMovingAverage`), with
the averages then set to known values so every served output can be checked against numpy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow as tf

NUM_FEATURES = 4
NUM_CLASSES = 3

# Known, distinct live and EMA values for the seed's linear model.
LIVE_W = np.arange(NUM_FEATURES * NUM_CLASSES, dtype=np.float32).reshape(NUM_FEATURES, NUM_CLASSES) / 10.0
LIVE_B = np.array([0.5, -0.5, 0.25], dtype=np.float32)
EMA_W = (LIVE_W[::-1] * 0.5).copy()
EMA_B = np.array([-0.1, 0.2, 0.3], dtype=np.float32)


class LinearModule(tf.Module):
    """The seed article's model: logits = x @ weights + biases, with a serving input signature."""

    def __init__(self) -> None:
        super().__init__(name="linear")
        self.weights = tf.Variable(tf.zeros([NUM_FEATURES, NUM_CLASSES]), name="weights")
        self.biases = tf.Variable(tf.zeros([NUM_CLASSES]), name="biases")

    @tf.function(input_signature=[tf.TensorSpec([None, NUM_FEATURES], tf.float32, name="inputs")])
    def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.matmul(inputs, self.weights) + self.biases


REGRESSION_LIVE = (np.array([[0.5], [-1.0], [0.25], [2.0]], np.float32), np.array([0.1], np.float32))
REGRESSION_EMA = (np.array([[0.45], [-0.9], [0.3], [1.8]], np.float32), np.array([0.0], np.float32))
"""Known live and EMA (weights, biases) of `RegressionModule`."""


class RegressionModule(tf.Module):
    """LinearModule's pattern with a single output column: a regression head."""

    def __init__(self) -> None:
        super().__init__(name="regression")
        self.weights = tf.Variable(tf.zeros([NUM_FEATURES, 1]), name="weights")
        self.biases = tf.Variable(tf.zeros([1]), name="biases")

    @tf.function(input_signature=[tf.TensorSpec([None, NUM_FEATURES], tf.float32, name="inputs")])
    def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.matmul(inputs, self.weights) + self.biases


def linear_numpy(inputs: np.ndarray, weights: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """The linear model computed independently of TensorFlow."""
    return inputs.astype(np.float32) @ weights + biases


def write_seed_checkpoints(
    ckpt_dir: str | os.PathLike,
    live=(LIVE_W, LIVE_B),
    ema=(EMA_W, EMA_B),
) -> tuple[str, str]:
    """Write the seed layout: `ckpt_dir/ckpt-1` (weights, biases) and `ckpt_dir/ema/ckpt-1` (`ema_weights` dict).

    Returns the two checkpoint prefixes.
    """
    ckpt_dir = Path(ckpt_dir)
    weights = tf.Variable(live[0], name="weights")
    biases = tf.Variable(live[1], name="biases")
    average = tf.train.ExponentialMovingAverage(decay=0.99)
    average.apply([weights, biases])
    average.average(weights).assign(ema[0])
    average.average(biases).assign(ema[1])
    live_manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(weights=weights, biases=biases), str(ckpt_dir), max_to_keep=3
    )
    ema_manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(ema_weights={v.name: average.average(v) for v in (weights, biases)}),
        str(ckpt_dir / "ema"),
        max_to_keep=3,
    )
    return live_manager.save(), ema_manager.save()


# --- Keras 3 models: Dense -> BatchNorm -> ReLU -> Dense, built three ways -------------------------------------

HIDDEN = 5


def build_sequential():
    import keras

    return keras.Sequential(
        [keras.Input((NUM_FEATURES,), name="features"), keras.layers.Dense(HIDDEN),
         keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Dense(NUM_CLASSES)],
        name="classifier",
    )


def build_functional():
    import keras

    inputs = keras.Input((NUM_FEATURES,), name="features")
    hidden = keras.layers.Dense(HIDDEN)(inputs)
    hidden = keras.layers.ReLU()(keras.layers.BatchNormalization()(hidden))
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(hidden), name="classifier")


def build_subclassed():
    import keras

    class Classifier(keras.Model):
        def __init__(self):
            super().__init__(name="classifier")
            self.hidden = keras.layers.Dense(HIDDEN)
            self.norm = keras.layers.BatchNormalization()
            self.head = keras.layers.Dense(NUM_CLASSES)

        def call(self, inputs, training=False):
            return self.head(keras.activations.relu(self.norm(self.hidden(inputs), training=training)))

    return Classifier()


KERAS_BUILDERS = {"sequential": build_sequential, "functional": build_functional, "subclassed": build_subclassed}


def write_keras_checkpoints(build, ckpt_dir, seed: int = 0, ema_key=lambda v: v.value.name, as_list=False,
                            average_all=False):
    """Train-side: give a Keras model known weights and BN statistics, keep a real EMA of its trainable variables
    with known shadow values, and save `ckpt_dir/ckpt-1` (`Checkpoint(model=...)`) and `ckpt_dir/ema/ckpt-1`.

    Returns the checkpoint keys holding, in model order, the live trainable values, the live non-trainable values,
    the shadows of the trainable ones and (with `average_all`) of the non-trainable ones, found by value in the files.
    """
    model = build()
    if not model.built:
        model(np.zeros((1, NUM_FEATURES), np.float32))
    rng = np.random.default_rng(seed)
    for variable in model.variables:
        value = rng.standard_normal(variable.shape).astype(np.float32)
        if "variance" in variable.path:
            value = np.abs(value) + 0.5
        variable.assign(value)
    averaged = model.variables if average_all else model.trainable_variables  # all: BatchNorm statistics too
    tf_variables = [v.value for v in averaged]
    average = tf.train.ExponentialMovingAverage(decay=0.9)
    average.apply(tf_variables)
    for variable in tf_variables:
        average.average(variable).assign(variable * 0.5 + 0.25)
    shadows = [average.average(v) for v in tf_variables]
    container = shadows if as_list else {ema_key(v): average.average(v.value) for v in averaged}
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(ckpt_dir), 3).save()
    tf.train.CheckpointManager(tf.train.Checkpoint(ema_weights=container), str(Path(ckpt_dir) / "ema"), 3).save()
    live_prefix = tf.train.latest_checkpoint(str(ckpt_dir))
    ema_prefix = tf.train.latest_checkpoint(str(Path(ckpt_dir) / "ema"))
    return ([_key_holding(live_prefix, v.numpy()) for v in model.trainable_variables],
            [_key_holding(live_prefix, v.numpy()) for v in model.non_trainable_variables],
            [_key_holding(ema_prefix, average.average(v.value).numpy()) for v in model.trainable_variables],
            [_key_holding(ema_prefix, average.average(v.value).numpy()) for v in model.non_trainable_variables]
            if average_all else [])


def _key_holding(prefix, value):
    """The checkpoint entry whose stored value is exactly `value` (the tests' values are random, hence unique), or
    None when the checkpoint lost it (an EMA dict whose keys collided)."""
    reader = tf.train.load_checkpoint(prefix)
    keys = [key for key in reader.get_variable_to_shape_map()
            if key != "_CHECKPOINTABLE_OBJECT_GRAPH" and np.array_equal(reader.get_tensor(key), value)]
    assert len(keys) <= 1, keys
    return keys[0] if keys else None


def mlp_numpy(inputs, kernel1, bias1, gamma, beta, mean, variance, kernel2, bias2, epsilon=1e-3):
    """Dense -> BatchNorm (inference) -> ReLU -> Dense, in numpy."""
    hidden = inputs @ kernel1 + bias1
    hidden = (hidden - mean) / np.sqrt(variance + epsilon) * gamma + beta
    return np.maximum(hidden, 0.0) @ kernel2 + bias2


def expected_mlp_outputs(ckpt_dir, keys, inputs, averaged_statistics=False):
    """(live, ema) outputs of the Keras MLP from the values stored in its two checkpoints."""
    live_reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(ckpt_dir)))
    ema_reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(Path(ckpt_dir) / "ema")))
    trainable, non_trainable, shadows, statistic_shadows = keys
    live_statistics = [live_reader.get_tensor(key) for key in non_trainable]
    ema_statistics = [ema_reader.get_tensor(key) for key in statistic_shadows] if averaged_statistics \
        else live_statistics

    def run(reader, names, statistics):
        k1, b1, gamma, beta, k2, b2 = (reader.get_tensor(key) for key in names)
        return mlp_numpy(inputs, k1, b1, gamma, beta, *statistics, k2, b2)

    return run(live_reader, trainable, live_statistics), run(ema_reader, shadows, ema_statistics)
