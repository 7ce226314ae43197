"""Real producers of Keras optimizer EMA checkpoints, and readers that take values back out of the files written.

Producers train for a few steps with the optimizer's own `use_ema=True` and save the way training code does. The
readers go straight to the files (checkpoint entries by their recorded names, HDF5 datasets by path), independently
of the exporter, so tests compare served outputs with numpy on what was actually saved.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from support import models as tm

X = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0], [4.0, 0.25, -0.5, -1.0]], np.float32)
"""Serving inputs."""


def batches(num_batches: int = 4, batch_size: int = 8, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch_size, tm.NUM_FEATURES)).astype(np.float32),
             rng.standard_normal((batch_size, tm.NUM_CLASSES)).astype(np.float32)) for _ in range(num_batches)]


def compiled(build, optimizer=None):
    """A Keras model compiled the way training code compiles it (Adam with use_ema unless told otherwise)."""
    model = build()
    model.compile(optimizer=optimizer or keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5), loss="mse")
    return model


def train_on_batches(model, num_batches: int = 4):
    for inputs, targets in batches(num_batches):
        model.train_on_batch(inputs, targets)
    return model


def fit_arrays(num_batches: int = 4) -> tuple[np.ndarray, np.ndarray]:
    data = batches(num_batches)
    return np.concatenate([b[0] for b in data]), np.concatenate([b[1] for b in data])


def checkpoint_values(prefix: str) -> dict[str, np.ndarray]:
    """Every saved variable by the name recorded for it in the object graph (`full_name`), except names recorded
    more than once (a subclassed Keras model's `classifier/kernel`), which name no single value."""
    reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    keys: dict[str, list[str]] = {}
    for node in graph.nodes:
        for attribute in node.attributes:
            if attribute.name == "VARIABLE_VALUE":
                keys.setdefault(attribute.full_name, []).append(attribute.checkpoint_key)
    return {name: reader.get_tensor(found[0]) for name, found in keys.items() if len(found) == 1}


def keras_average_name(optimizer_name: str, variable_path: str) -> str:
    """Keras 3's documented name of the average of a variable: `<optimizer>/<path, / as _>_average`."""
    return f"{optimizer_name}/{variable_path.replace('/', '_')}_average"


def h5_values(path: str | Path) -> dict[str, np.ndarray]:
    """Every dataset of a `.weights.h5` file or of the `model.weights.h5` inside a `.keras` archive, by path."""
    values: dict[str, np.ndarray] = {}

    def collect(weights: h5py.File) -> None:
        weights.visititems(lambda name, item: values.__setitem__(name, np.asarray(item[()]))
                           if isinstance(item, h5py.Dataset) else None)

    if str(path).endswith(".keras"):
        with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as member, \
                h5py.File(member, "r") as weights:
            collect(weights)
    else:
        with h5py.File(path, "r") as weights:
            collect(weights)
    return values


MLP_LAYERS = ["layers/dense/vars/0", "layers/dense/vars/1", "layers/batch_normalization/vars/0",
              "layers/batch_normalization/vars/1", "layers/dense_1/vars/0", "layers/dense_1/vars/1"]
"""Where Keras files keep the MLP's trainable values, in `trainable_variables` order."""
MLP_STATISTICS = ["layers/batch_normalization/vars/2", "layers/batch_normalization/vars/3"]


def mlp_outputs(trainable: list[np.ndarray], statistics: list[np.ndarray], inputs: np.ndarray = X) -> np.ndarray:
    """The tiny MLP in numpy, from its six trainable values (model order) and its BatchNorm statistics."""
    kernel1, bias1, gamma, beta, kernel2, bias2 = trainable
    mean, variance = statistics
    return tm.mlp_numpy(inputs, kernel1, bias1, gamma, beta, mean, variance, kernel2, bias2)


def serve(version_dir, signature: str, inputs: np.ndarray = X, input_name: str = "features") -> np.ndarray:
    loaded = tf.saved_model.load(str(version_dir))
    return loaded.signatures[signature](**{input_name: tf.constant(inputs)})["output_0"].numpy()


def fit_with_swapped_checkpoints(directory, build, epochs: int = 3, filename: str = "model-{epoch:02d}.keras"):
    """Keras's documented way to checkpoint EMA weights: `SwapEMAWeights(swap_on_epoch=True)` before
    `ModelCheckpoint`. A callback placed before both records, at each epoch's end, the raw weights and averages as
    the optimizer holds them (before the swap), so tests know what each file should have held.

    Returns:
        The model and, per epoch, (raw trainable values, averages).
    """
    model = compiled(build, keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5))
    truth: list[tuple[list[np.ndarray], list[np.ndarray]]] = []

    def record(epoch, logs):
        truth.append(([v.numpy().copy() for v in model.trainable_variables],
                      [a.numpy().copy() for a in model.optimizer._model_variables_moving_average]))

    x, y = fit_arrays(4)
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False,
              callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=record),
                         keras.callbacks.SwapEMAWeights(swap_on_epoch=True),
                         keras.callbacks.ModelCheckpoint(str(Path(directory) / filename))])
    return model, truth
