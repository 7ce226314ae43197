"""The EMA workflow from training to serving, end to end, on generated data.

1. Train a linear classifier with a `tf.train.ExponentialMovingAverage` updated after every optimizer step.
2. Save the live weights to CKPT_DIR/ckpt-N and the shadows to CKPT_DIR/ema/ckpt-N in lockstep with
   `ema_export.training.EmaCheckpointer`, so the two halves of a step are never separated.
3. Export the newest complete pair with `ema_export.export` as one SavedModel: serve_live, serve_ema,
   serving_default.
4. Load the export in-process and compare the two signatures on held-out data.

Run it with `make demo`, or `python examples/seed_quickstart.py [OUTPUT_DIR]` (default: ./demo-out).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ema_export  # noqa: E402
from ema_export.names import SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE  # noqa: E402
from ema_export.training import EmaCheckpointer  # noqa: E402

NUM_FEATURES, NUM_CLASSES = 20, 3


class LinearClassifier(tf.Module):
    """logits = inputs @ weights + biases, with the serving signature the exporter needs."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = tf.Variable(tf.random.normal([NUM_FEATURES, NUM_CLASSES], stddev=0.1), name="weights")
        self.biases = tf.Variable(tf.zeros([NUM_CLASSES]), name="biases")

    @tf.function(input_signature=[tf.TensorSpec([None, NUM_FEATURES], tf.float32, name="inputs")])
    def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.matmul(inputs, self.weights) + self.biases


def make_data(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three noisy Gaussian blobs: a task where weight averaging visibly smooths a noisy optimizer."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).normal(size=(NUM_CLASSES, NUM_FEATURES)) * 0.6
    labels = rng.integers(0, NUM_CLASSES, size=num_examples)
    features = centers[labels] + rng.normal(size=(num_examples, NUM_FEATURES))
    return features.astype(np.float32), labels.astype(np.int64)


def train(ckpt_dir: Path, steps: int = 300, save_every: int = 100) -> None:
    tf.random.set_seed(0)
    model = LinearClassifier()
    variables = [model.weights, model.biases]
    optimizer = tf.keras.optimizers.SGD(learning_rate=0.5)  # deliberately noisy
    # Owns the EMA (shadows start at the current values) and saves both halves of a step together.
    checkpointer = EmaCheckpointer(ckpt_dir, model, decay=0.99, max_to_keep=3, optimizer=optimizer)
    features, labels = make_data(4096, seed=1)
    dataset = tf.data.Dataset.from_tensor_slices((features, labels)).shuffle(4096, seed=0).repeat().batch(16)

    @tf.function
    def train_step(inputs: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=model(inputs)))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    for step, (inputs, targets) in enumerate(dataset.take(steps), start=1):
        train_step(inputs, targets)
        checkpointer.update()  # after the weights moved
        if step % save_every == 0:
            live, shadows = checkpointer.save(step)
    print(f"saved live weights to {live} and their averages to {shadows}")


def main(out_root: Path) -> None:
    ckpt_dir, models_dir = out_root / "training", out_root / "models"
    train(ckpt_dir)

    result = ema_export.export(ckpt_dir, models_dir, model=LinearClassifier)
    print(f"exported version {result.version} to {result.version_dir} (step {result.sources.training.step})")
    for item in result.fold.largest_drifts():
        print(f"  {item.name}: EMA is {item.relative_l2:.3f} (relative L2) from the live value")
    for check in result.verification.checks:
        print(f"  verified {check.signature}/{check.output}: max |diff| {check.max_abs_diff:.2g}")

    loaded = tf.saved_model.load(str(result.version_dir))
    features, labels = make_data(2000, seed=2)
    for signature in (SIGNATURE_LIVE, SIGNATURE_EMA, SIGNATURE_DEFAULT):
        logits = loaded.signatures[signature](inputs=tf.constant(features))["output_0"].numpy()
        print(f"  {signature:<16} held-out accuracy {np.mean(np.argmax(logits, axis=1) == labels):.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-out"))
