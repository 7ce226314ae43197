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
