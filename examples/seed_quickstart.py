"""The EMA workflow from training to serving, end to end, on generated data.

1. Train a linear classifier with a `tf.train.ExponentialMovingAverage` updated after every optimizer step.
2. Save the live weights to CKPT_DIR/ckpt-N and the shadows to CKPT_DIR/ema/ckpt-N in lockstep with
   `ema_export.training.EmaCheckpointer`, so the two halves of a step are never separated.
3. Export the newest complete pair with `ema_export.export` as one SavedModel: serve_live, serve_ema,
   serving_default.
4. Serve it with the embedded TF Serving-compatible server, and A/B-compare the two signatures over gRPC on
   held-out data with the TensorFlow-free client (the same calls work against real TF Serving).

Run it with `make demo`, or `python examples/seed_quickstart.py [OUTPUT_DIR]` (default: ./demo-out).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ema_export.console import hide_native_logs, wants_verbose  # noqa: E402 - imports no TensorFlow

if not wants_verbose(sys.argv[1:]):
    hide_native_logs()  # TensorFlow's start-up log lines, before TensorFlow is imported

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ema_export  # noqa: E402
from ema_export.training import EmaCheckpointer  # noqa: E402
from serving import ServingClient  # noqa: E402
from serving.ab import CompareOptions, compare  # noqa: E402
from serving.server import start_server  # noqa: E402

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

    features, labels = make_data(2000, seed=2)
    np.savez(out_root / "heldout.npz", inputs=features, labels=labels)
    with start_server(model_name="classifier", model_base_path=str(models_dir.resolve()), port=0) as server:
        server.wait_until_available(timeout=60)
        print(f"serving {models_dir} on 127.0.0.1:{server.port} (TF Serving's gRPC API)")
        with ServingClient(f"127.0.0.1:{server.port}") as client:
            report = compare(client, "classifier", {"inputs": features}, labels=labels,
                             options=CompareOptions(batch_size=250))
        for name, arm in report.arms.items():
            print(f"  {name:<12} accuracy {arm.accuracy:.3f}   latency p50 {arm.latency_ms.p50:.1f} ms "
                  f"p99 {arm.latency_ms.p99:.1f} ms   ({arm.n} examples)")
        difference = report.accuracy_diff
        print(f"  agreement {report.agreement:.3f}, EMA - live accuracy {difference.estimate:+.3f} "
              f"(95% CI {difference.low:+.3f} to {difference.high:+.3f}), McNemar exact p = {report.mcnemar_p:.3g}")
    command = _console_script("ema-serving")
    print(f"try it yourself: {command} serve --model-name classifier --model-base-path {models_dir} --port 8500\n"
          f"                 {command} compare --target localhost:8500 --model classifier "
          f"--data {out_root / 'heldout.npz'} --labels labels")


def _console_script(name: str) -> str:
    """The command as this environment installed it (`.venv/bin/ema-serving` under `make demo`)."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        try:
            return str(beside_python.relative_to(Path.cwd()))
        except ValueError:
            return str(beside_python)
    return name


if __name__ == "__main__":
    arguments = [argument for argument in sys.argv[1:] if not argument.startswith("-")]
    main(Path(arguments[0]) if arguments else Path("demo-out"))
