"""Real producers of optimizer-slot EMA checkpoints, for the tests of the `optimizer-slot` layout.

Model Garden's `ExponentialMovingAverage` (tf-models-official 2.20, `official/modeling/optimization/ema_optimizer.py`)
is the real class, trained under a distribution strategy as Model Garden's trainer runs it; `make install` installs
it without its dependencies (see the Makefile). TF Addons' `MovingAverage` does not install beside TF 2.21, so this
module rebuilds it, from its documented behaviour, on the same tf-keras legacy OptimizerV2 slot machinery (`add_slot`,
slot tracking, checkpoint keys): the checkpoints the tests export are written by TensorFlow exactly as that wrapper
would have them written. `EmaCheckpointing` is Model Garden's eval action that writes the inverted checkpoints.

Every producer trains a few real steps with gradients before it checkpoints, so the averages are genuine. The TF
Addons decay defaults to 0.9 so that four steps move the averages visibly away from the weights; Model Garden's
dynamic decay, `min(0.99, (1 + step) / (10 + step))`, is still far below its 0.99 then.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from support import models as tm

AVERAGE_SLOT = "average"
TFA_INNER_NAME = "awg_optimizer"
MODEL_GARDEN_INNER_NAME = "ema_base_optimizer"  # ema_optimizer.py:110
EMA_CHECKPOINTS_SUBDIR = "ema_checkpoints"
EMA_CHECKPOINT_NAME = "average_weights"


class MovingAverage(tf_keras.optimizers.legacy.Optimizer):
    """TF Addons `MovingAverage` semantics: the inner optimizer steps, then each `average` slot moves towards it.

    The inner optimizer is tracked as `awg_optimizer` and shares this wrapper's step counter. A variable's slot is
    created on its first update holding the variable's value, and after every inner step becomes
    `decay * average + (1 - decay) * variable`.
    """

    def __init__(self, optimizer: tf_keras.optimizers.legacy.Optimizer, average_decay: float = 0.9,
                 name: str = "MovingAverage") -> None:
        super().__init__(name)
        self._optimizer = optimizer
        self._average_decay = average_decay
        self._track_trackable(optimizer, TFA_INNER_NAME)

    def _average_initial_value(self, variable: tf.Variable) -> tf.Tensor | str:
        return variable.read_value()

    def _create_slots(self, var_list: Sequence[tf.Variable]) -> None:
        self._optimizer._create_slots(var_list=var_list)
        for variable in var_list:
            self.add_slot(variable, AVERAGE_SLOT, self._average_initial_value(variable))

    def _create_hypers(self) -> None:
        self._optimizer._create_hypers()

    def _prepare(self, var_list: Sequence[tf.Variable]) -> dict:
        return self._optimizer._prepare(var_list)

    def apply_gradients(self, grads_and_vars, name: str | None = None, **kwargs) -> tf.Operation:
        self._optimizer._iterations = self.iterations  # one step counter for both, as the wrapper does
        return super().apply_gradients(grads_and_vars, name, **kwargs)

    def _resource_apply_dense(self, grad: tf.Tensor, variable: tf.Variable, apply_state: dict | None = None):
        step = self._optimizer._resource_apply_dense(grad, variable, apply_state)
        with tf.control_dependencies([step]):  # average the value after this step, not before it
            return self._update_average(self.get_slot(variable, AVERAGE_SLOT), variable)

    def _update_average(self, average: tf.Variable, variable: tf.Variable):
        return average.assign_sub((1.0 - self._average_decay) * (average - variable))

    def assign_average_vars(self, var_list: Sequence[tf.Variable]) -> None:
        """Overwrite the variables with their averages (TF Addons' way to save averaged weights)."""
        for variable in var_list:
            variable.assign(self.get_slot(variable, AVERAGE_SLOT))

    def get_config(self) -> dict:
        return {"name": self._name, "average_decay": self._average_decay}


class ColumnAverage(MovingAverage):
    """A wrapper that keeps something else under the slot name `average`: the moving average of each weight
    column's mean. Its slots have the shape of a bias, not of their variable, which an export must catch."""

    def _average_initial_value(self, variable: tf.Variable) -> tf.Tensor | str:
        return tf.reduce_mean(variable, axis=0) if variable.shape.rank > 1 else variable.read_value()

    def _update_average(self, average: tf.Variable, variable: tf.Variable):
        value = tf.reduce_mean(variable, axis=0) if variable.shape.rank > 1 else variable
        return average.assign_sub((1.0 - self._average_decay) * (average - value))


def model_garden_ema() -> Any:
    """Model Garden's `ExponentialMovingAverage` class (tf-models-official 2.20, installed by `make install`)."""
    module = pytest.importorskip("official.modeling.optimization.ema_optimizer",
                                 reason="tf-models-official is installed by `make install` (pip --no-deps)")
    return module.ExponentialMovingAverage


class EmaCheckpointing:
    """Model Garden's `EMACheckpointing` eval action (`official/core/actions.py:76-123` in tf-models-official 2.20):
    swap weights and averages, save, swap back.

    The action itself cannot be imported here: `official.core` imports `tensorflow_datasets`, which tf-models-official
    was installed without. Its body is these three calls on the real optimizer, under the distribution strategy Model
    Garden's trainer runs in (`swap_weights` refuses to run outside a cross-replica context,
    `official/modeling/optimization/ema_optimizer.py:172-178`). The checkpoint is the trainer's own (`global_step`,
    `model`, `optimizer`), saved to `<model_dir>/ema_checkpoints/average_weights-<step>`: there the model holds the
    averages and the `average` slots hold the raw weights.
    """

    def __init__(self, model_dir: str | os.PathLike, optimizer: Any, checkpoint: tf.train.Checkpoint,
                 strategy: tf.distribute.Strategy, max_to_keep: int = 1) -> None:
        self._optimizer = optimizer
        self._strategy = strategy
        self._manager = tf.train.CheckpointManager(checkpoint, os.path.join(model_dir, EMA_CHECKPOINTS_SUBDIR),
                                                   max_to_keep=max_to_keep, checkpoint_name=EMA_CHECKPOINT_NAME)

    def __call__(self) -> str:
        with self._strategy.scope():
            self._optimizer.swap_weights()
            try:
                return self._manager.save(checkpoint_number=self._optimizer.iterations)
            finally:
                self._optimizer.swap_weights()


class StandardizedLinearModule(tm.LinearModule):
    """The linear model on centred inputs: `(x - input_mean) @ weights + biases`.

    `input_mean` is a non-trainable running statistic, updated while training like BatchNorm's moving mean.
    """

    def __init__(self) -> None:
        super().__init__()
        self.input_mean = tf.Variable(tf.zeros([tm.NUM_FEATURES]), trainable=False, name="input_mean")

    @tf.function(input_signature=[tf.TensorSpec([None, tm.NUM_FEATURES], tf.float32, name="inputs")])
    def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.matmul(inputs - self.input_mean, self.weights) + self.biases


def standardized_linear_numpy(inputs: np.ndarray, weights: np.ndarray, biases: np.ndarray,
                              input_mean: np.ndarray) -> np.ndarray:
    return tm.linear_numpy(inputs - input_mean, weights, biases)


@dataclass
class Trajectory:
    """The trainable values by variable name before training and after each step, to check the averages against."""

    initial: dict[str, np.ndarray]
    steps: list[dict[str, np.ndarray]]


def _values(variables: Sequence[tf.Variable]) -> dict[str, np.ndarray]:
    return {variable.name.split(":")[0]: variable.numpy() for variable in variables}


def train(module: tm.LinearModule, optimizer: Any, num_steps: int = 4, seed: int = 0,
          strategy: tf.distribute.Strategy | None = None) -> Trajectory:
    """Fit the module to a random linear target by mean squared error, one batch per step.

    The weights start from random values (not zeros) so every variable moves and differs from its average. With a
    `strategy`, each step runs through `strategy.run`, as Model Garden's trainer runs its train step.
    """
    rng = np.random.default_rng(seed)
    for variable in module.trainable_variables:
        variable.assign(rng.standard_normal(variable.shape).astype(np.float32))
    target_weights = rng.standard_normal((tm.NUM_FEATURES, tm.NUM_CLASSES)).astype(np.float32)
    trajectory = Trajectory(_values(module.trainable_variables), [])

    def step(inputs: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(module(inputs) - tf.matmul(inputs, target_weights)))
        variables = module.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

    for _ in range(num_steps):
        inputs = rng.standard_normal((8, tm.NUM_FEATURES)).astype(np.float32) + 1.0
        if isinstance(module, StandardizedLinearModule):
            module.input_mean.assign(0.5 * module.input_mean + 0.5 * inputs.mean(axis=0))
        if strategy is None:
            step(tf.constant(inputs))
        else:
            strategy.run(step, args=(tf.constant(inputs),))
        trajectory.steps.append(_values(module.trainable_variables))
    return trajectory


def sgd() -> tf_keras.optimizers.legacy.Optimizer:
    """The inner optimizer: SGD with momentum, so the checkpoint also holds a slot that is not an average."""
    return tf_keras.optimizers.legacy.SGD(learning_rate=0.05, momentum=0.9)


@dataclass
class TfaRun:
    """What a TF Addons-style training run left: its checkpoint, and the objects that wrote it."""

    prefix: str
    module: tm.LinearModule
    optimizer: MovingAverage
    trajectory: Trajectory


def write_tfa_checkpoint(ckpt_dir: str | os.PathLike, optimizer: MovingAverage | None = None,
                         attach_at_root: bool = True, num_steps: int = 4) -> TfaRun:
    """Train `LinearModule` with a TF Addons-style wrapper and checkpoint it with its optimizer.

    `attach_at_root` saves `Checkpoint(weights=..., biases=..., optimizer=...)`, otherwise
    `Checkpoint(model=..., optimizer=...)`.
    """
    module = tm.LinearModule()
    optimizer = optimizer or MovingAverage(sgd())
    trajectory = train(module, optimizer, num_steps)
    if attach_at_root:
        checkpoint = tf.train.Checkpoint(weights=module.weights, biases=module.biases, optimizer=optimizer)
    else:
        checkpoint = tf.train.Checkpoint(model=module, optimizer=optimizer)
    prefix = tf.train.CheckpointManager(checkpoint, str(ckpt_dir), max_to_keep=3).save()
    return TfaRun(prefix, module, optimizer, trajectory)


@dataclass
class ModelGardenRun:
    """What a Model Garden-style training run left in its model directory."""

    model_dir: Path
    regular: str
    inverted: str
    trajectory: Trajectory


def write_model_garden_run(model_dir: str | os.PathLike, trainable_weights_only: bool = True,
                           num_steps: int = 4) -> ModelGardenRun:
    """Train with Model Garden's `ExponentialMovingAverage`, then save as its trainer does: the regular checkpoint
    `<model_dir>/ckpt-<step>` and, from the eval action, the inverted `ema_checkpoints/average_weights-<step>`.

    Model, optimizer and steps live in a one-device strategy, as in Model Garden's trainer (its swap needs one).
    """
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        module = StandardizedLinearModule() if not trainable_weights_only else tm.LinearModule()
        optimizer = model_garden_ema()(sgd(), trainable_weights_only=trainable_weights_only)
        optimizer.shadow_copy(module)
    trajectory = train(module, optimizer, num_steps, strategy=strategy)
    checkpoint = tf.train.Checkpoint(global_step=optimizer.iterations, model=module, optimizer=optimizer)
    regular = tf.train.CheckpointManager(checkpoint, str(model_dir), max_to_keep=3).save(
        checkpoint_number=optimizer.iterations)
    inverted = EmaCheckpointing(model_dir, optimizer, checkpoint, strategy)()
    return ModelGardenRun(Path(model_dir), regular, inverted, trajectory)
