"""Why EMA weights matter, on real data: handwritten digits with a share of the training labels flipped.

What `make demo` runs. Every step is a real command a user would run:

1. Train a small Keras network on scikit-learn's bundled digits (8x8 images, 10 classes; no download) after
   flipping a fixed share of the training labels to another class at random. The optimizer keeps chasing the wrong
   labels of the last few batches, so the live weights wander; their exponential moving average wanders much less.
   `ema_export.training.EmaCheckpointer` keeps the average and saves both halves of every step together. At every
   saved step the live and the averaged weights are scored on the clean held-out set: `training_log.json`.
2. Export the newest complete pair with the `ema-export` command line: one SavedModel, serve_live + serve_ema.
3. Serve it with `ema-serving serve` in a separate process on a free port, wait until `ema-serving status` says
   AVAILABLE, then A/B the two signatures over gRPC on the clean held-out set with
   `ema-serving compare --report OUT/report.html`, which prints the table and writes the page.
4. Stop the server whatever happened (an error, Ctrl-C, SIGTERM).

Run it with `make demo`, or `python examples/digits_noisy_labels.py [OUTPUT_DIR]` (default: ./demo-out).
The settings below are the ones the README's numbers come from; `--noise`, `--learning-rate`, `--decay` and
`--steps` change them (README: what happens at other settings).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ema_export.console import hide_native_logs, wants_verbose  # imports no TensorFlow

STARTED = time.monotonic()  # before TensorFlow's import, so "the whole demo took" means the whole of it

if __name__ == "__main__" and not wants_verbose(sys.argv[1:]):
    hide_native_logs()  # TensorFlow's start-up log lines, before TensorFlow is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_PIXELS, NUM_CLASSES = 64, 10
INPUT_NAME = "pixels"
MODEL_NAME = "digits"
EXAMPLES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Settings:
    """One training run. The defaults are the demo's: chosen so EMA's effect is visible, see the README."""

    noise: float = 0.4  # share of training labels flipped to another class
    learning_rate: float = 0.1
    decay: float = 0.995
    steps: int = 1500
    batch_size: int = 32
    save_every: int = 50
    seed: int = 0


def build_model() -> keras.Model:
    """The network `ema-export --model digits_noisy_labels:build_model` rebuilds: 64 pixels -> 10 logits."""
    return keras.Sequential(
        [
            keras.Input((NUM_PIXELS,), name=INPUT_NAME),
            keras.layers.Dense(64, activation="relu", name="hidden"),
            keras.layers.Dense(NUM_CLASSES, name="logits"),
        ],
        name="digits",
    )


def load_data(settings: Settings) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], np.ndarray]:
    """(train inputs, noisy train labels), (held-out inputs, clean labels), and which train labels were flipped."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    inputs = (digits.data / 16.0).astype(np.float32)  # pixel intensities are 0..16
    train_x, test_x, train_y, test_y = train_test_split(
        inputs, digits.target, test_size=0.35, stratify=digits.target, random_state=settings.seed)
    rng = np.random.default_rng(settings.seed)
    flipped = rng.random(train_y.size) < settings.noise
    # A flipped label is any *other* class, uniformly: adding 1..9 modulo 10 never lands on the true class.
    noisy_y = np.where(flipped, (train_y + rng.integers(1, NUM_CLASSES, train_y.size)) % NUM_CLASSES, train_y)
    return (train_x, noisy_y.astype(np.int64)), (test_x, test_y.astype(np.int64)), flipped


def _accuracy(logits: tf.Tensor, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def train(ckpt_dir: Path, settings: Settings) -> dict:
    """Train with an EMA, save live+EMA pairs every `save_every` steps, and return the training log."""
    from ema_export.training import EmaCheckpointer

    keras.utils.set_random_seed(settings.seed)
    (train_x, train_y), (test_x, test_y), flipped = load_data(settings)
    model = build_model()
    optimizer = keras.optimizers.SGD(learning_rate=settings.learning_rate, momentum=0.9)
    checkpointer = EmaCheckpointer(ckpt_dir, model, decay=settings.decay, max_to_keep=3, optimizer=optimizer)
    shadows = list(checkpointer.shadows.values())  # in model.trainable_variables' order
    dataset = (tf.data.Dataset.from_tensor_slices((train_x, train_y))
               .shuffle(len(train_x), seed=settings.seed).repeat().batch(settings.batch_size))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(inputs: tf.Tensor, targets: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            loss = loss_fn(targets, model(inputs, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    def ema_logits(inputs: np.ndarray) -> tf.Tensor:
        # The averaged weights in place of the trainable ones, without touching the live model.
        logits, _ = model.stateless_call([s.value() for s in shadows],
                                         [v.value for v in model.non_trainable_variables], inputs)
        return logits

    records = []
    for step, (inputs, targets) in enumerate(dataset.take(settings.steps), start=1):
        train_step(inputs, targets)
        checkpointer.update()  # after the weights moved
        if step % settings.save_every == 0 or step == settings.steps:
            checkpointer.save(step)
            records.append({"step": step, "live": _accuracy(model(test_x), test_y),
                            "ema": _accuracy(ema_logits(test_x), test_y)})
    return {
        "metric": "accuracy",
        "evaluated_on": f"{len(test_y)} clean held-out digits",
        "arms": {"live": "serve_live", "ema": "serve_ema"},
        "settings": asdict(settings),
        "num_train": len(train_y),
        "num_flipped": int(flipped.sum()),
        "records": records,
    }


# ------------------------------------------------------------------------------------------------ export, serve, A/B
def command(name: str) -> list[str]:
    """The console script as this environment installed it (`.venv/bin/ema-serving` under `make demo`)."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"Error: the {name} command is not installed. Install the project (make install), then "
                         f"run this again. Received: no {name} beside {sys.executable} or on PATH.")
    return [found]


def _short(argument: str) -> str:
    """Console scripts by name, paths relative to the current folder: as the reader would type them."""
    if argument.startswith(str(Path(sys.executable).parent)):
        return Path(argument).name
    if os.path.isabs(argument) and Path(argument).is_relative_to(Path.cwd()):
        return str(Path(argument).relative_to(Path.cwd()))
    return argument


def _shown(arguments: list[str]) -> str:
    return "$ " + " ".join(_short(argument) for argument in arguments)


def run(arguments: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run one command, showing it first; stop the demo with its error output when it fails."""
    print(_shown(arguments), flush=True)
    # Python's sys.stderr, not descriptor 2: hide_native_logs pointed the descriptor (which children inherit) away.
    completed = subprocess.run(arguments, stderr=sys.stderr, check=False, **kwargs)
    if completed.returncode != 0:
        raise SystemExit(f"Error: {Path(arguments[0]).name} exited with {completed.returncode}; see above.")
    return completed


def export(ckpt_dir: Path, models_dir: Path) -> None:
    # The factory is this file's build_model: make this folder importable for the exporter.
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(EXAMPLES_DIR),
                                                                            os.environ.get("PYTHONPATH")])))
    run([*command("ema-export"), str(ckpt_dir), str(models_dir), "--model", "digits_noisy_labels:build_model"],
        env=environment)


def free_port() -> int:
    """A port nobody listens on now. Another process could take it before the server binds it; the server would
    then fail at start-up, which `wait_until_available` reports."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(models_dir: Path, port: int, log_path: Path) -> Iterator[subprocess.Popen]:
    """`ema-serving serve` in a separate process, stopped on the way out whatever happens (error, Ctrl-C, SIGTERM)."""
    arguments = [*command("ema-serving"), "serve", "--model-name", MODEL_NAME, "--model-base-path",
                 str(models_dir.resolve()), "--host", "127.0.0.1", "--port", str(port)]  # a demo stays local
    print(_shown(arguments) + f" > {_short(str(log_path))} 2>&1 &", flush=True)
    with open(log_path, "w") as log:
        # Its own session: a Ctrl-C in the terminal reaches only the demo, which then stops the server in order.
        server = subprocess.Popen(arguments, stdout=log, stderr=log, start_new_session=True)
    try:
        yield server
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """SIGTERM (the server drains in-flight requests and exits 0), then SIGKILL if it takes too long."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    print(f"stopped the server (pid {server.pid}, exit code {server.returncode})", flush=True)


def wait_until_available(server: subprocess.Popen, target: str, log_path: Path, timeout_s: float = 120.0) -> None:
    """Poll `ema-serving status` until a version of the model is AVAILABLE."""
    arguments = [*command("ema-serving"), "status", "--target", target, "--model", MODEL_NAME, "--json",
                 "--timeout", "5"]
    print(_shown(arguments) + "   # until AVAILABLE", flush=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"Error: the server exited with {server.returncode} before the model was available; "
                             f"its output:\n{log_path.read_text()[-3000:]}")
        completed = subprocess.run(arguments, capture_output=True, text=True, check=False)
        if completed.returncode == 0:
            states = [version["state"] for version in json.loads(completed.stdout)["versions"]]
            if "AVAILABLE" in states:
                return
        time.sleep(0.5)
    raise SystemExit(f"Error: model {MODEL_NAME} was not AVAILABLE on {target} within {timeout_s:.0f} s.")


def main(out_root: Path, settings: Settings) -> None:
    ckpt_dir, models_dir = out_root / "training", out_root / "models"
    for stale in (ckpt_dir, models_dir):  # a demo run starts from scratch: version 1, steps from 0
        shutil.rmtree(stale, ignore_errors=True)
    print(f"training on scikit-learn's digits with {settings.noise:.0%} of the training labels flipped "
          f"(SGD lr {settings.learning_rate}, EMA decay {settings.decay}, {settings.steps} steps)", flush=True)
    log = train(ckpt_dir, settings)
    log_path = out_root / "training_log.json"
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    last = log["records"][-1]
    print(f"  {log['num_flipped']} of {log['num_train']} training labels flipped; held-out accuracy at step "
          f"{last['step']}: live {last['live']:.3f}, EMA {last['ema']:.3f} ({time.monotonic() - STARTED:.0f} s)")
    _, (test_x, test_y), _ = load_data(settings)
    heldout = out_root / "heldout.npz"
    np.savez(heldout, **{INPUT_NAME: test_x, "labels": test_y})

    export(ckpt_dir, models_dir)
    port = free_port()
    target = f"127.0.0.1:{port}"
    server_log = out_root / "server.log"
    with serving(models_dir, port, server_log) as server:
        wait_until_available(server, target, server_log)
        report = out_root / "report.html"
        run([*command("ema-serving"), "compare", "--target", target, "--model", MODEL_NAME, "--data", str(heldout),
             "--labels", "labels", "--batch-size", "16", "--report", str(report), "--manifest", str(models_dir),
             "--training-log", str(log_path)])
    print(f"open {report} in a browser; the whole demo took {time.monotonic() - STARTED:.0f} s")


def _arguments(argv: list[str]) -> tuple[Path, Settings]:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_root", nargs="?", default="demo-out", type=Path, help="output folder (demo-out)")
    parser.add_argument("--noise", type=float, default=defaults.noise, help="share of training labels flipped")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--decay", type=float, default=defaults.decay, help="EMA decay")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
    parser.add_argument("--save-every", type=int, default=defaults.save_every, help="steps between saved pairs")
    parser.add_argument("-v", "--verbose", action="store_true", help="show TensorFlow's native log lines")
    options = parser.parse_args(argv)
    settings = Settings(noise=options.noise, learning_rate=options.learning_rate, decay=options.decay,
                        steps=options.steps, save_every=options.save_every)
    return options.out_root, settings


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so the server is stopped on every way out.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    try:
        main(*_arguments(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
