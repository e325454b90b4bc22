"""Training and inference shared by victims and every extraction attack's surrogate.

``train_classifier`` minimises softmax cross-entropy against target *distributions* (one-hot rows for hard
labels, served probabilities for soft labels) with Adam. Data are padded to a power-of-two capacity and the
step count is a traced value, so training sets that grow round by round (JBDA, ActiveThief) reuse one compiled
program per capacity bucket instead of compiling per size.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any


class TrainConfig(NamedTuple):
    """Optimisation settings: full passes over the data, minibatch size, Adam's learning rate."""

    epochs: int = 50
    batch_size: int = 64
    learning_rate: float = 1e-3

    def validated(self) -> TrainConfig:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"train.epochs must be an integer >= 1, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"train.batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"train.learning_rate must be > 0, got {self.learning_rate!r}")
        return self


def capacity_for(count: int, minimum: int = 64) -> int:
    """The power-of-two bucket that holds ``count`` rows (at least ``minimum``)."""
    return max(minimum, 1 << max(0, count - 1).bit_length())


def pad_rows(array: np.ndarray, capacity: int) -> np.ndarray:
    padding = [(0, capacity - len(array))] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, padding)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]


DEFAULT_TRAINING = TrainConfig()


@functools.lru_cache(maxsize=64)
def _training_program(model: nn.Module, batch_size: int, learning_rate: float):
    optimizer = optax.adam(learning_rate)

    def loss_fn(params, inputs, targets, weights):
        log_probs = jax.nn.log_softmax(model.apply(params, inputs))
        per_example = -jnp.sum(targets * log_probs, axis=-1)
        return jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1.0)

    def step(carry, step_index, data):
        params, opt_state = carry
        inputs, targets, count, steps_per_epoch, key = data
        capacity = inputs.shape[0]
        epoch, position = step_index // steps_per_epoch, (step_index % steps_per_epoch) * batch_size
        shuffle_keys = jax.random.uniform(jax.random.fold_in(key, epoch), (capacity,))
        order = jnp.argsort(jnp.where(jnp.arange(capacity) < count, shuffle_keys, 2.0))
        rows = jax.lax.dynamic_slice(order, (position,), (batch_size,))
        weights = ((position + jnp.arange(batch_size)) < count).astype(jnp.float32)
        grads = jax.grad(loss_fn)(params, inputs[rows], targets[rows], weights)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def run_all(params, inputs, targets, count, steps_per_epoch, total_steps, key):
        data = (inputs, targets, count, steps_per_epoch, key)
        carry = (params, optimizer.init(params))
        params, _ = jax.lax.fori_loop(0, total_steps, lambda i, c: step(c, i, data), carry)
        return params

    @jax.jit
    def run_one(carry, step_index, inputs, targets, count, steps_per_epoch, key):
        return step(carry, step_index, (inputs, targets, count, steps_per_epoch, key))

    return optimizer, run_all, run_one


def init_params(model: nn.Module, input_shape: tuple[int, ...], key: jax.Array) -> Params:
    return model.init(key, jnp.zeros((1, *input_shape), jnp.float32))


def train_classifier(
    model: nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    key: jax.Array,
    config: TrainConfig = DEFAULT_TRAINING,
    params: Params | None = None,
) -> Params:
    """Fits ``model`` to ``targets`` (``(N, classes)`` distributions) and returns the trained parameters.

    Starts from ``params`` when given (fine-tuning), else from a fresh initialisation drawn from ``key``.
    """
    config = config.validated()
    count = len(inputs)
    if count == 0:
        raise ValueError("cannot train on an empty data set")
    init_key, shuffle_key = jax.random.split(key)
    if params is None:
        params = init_params(model, inputs.shape[1:], init_key)
    capacity = capacity_for(count + config.batch_size)
    padded_inputs = jnp.asarray(pad_rows(np.asarray(inputs, np.float32), capacity))
    padded_targets = jnp.asarray(pad_rows(np.asarray(targets, np.float32), capacity))
    steps_per_epoch = math.ceil(count / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    optimizer, run_all, run_one = _training_program(model, config.batch_size, float(config.learning_rate))
    dynamic = (jnp.int32(count), jnp.int32(steps_per_epoch))
    if model.compiled_loop:
        return run_all(params, padded_inputs, padded_targets, *dynamic, jnp.int32(total_steps), shuffle_key)
    carry = (params, optimizer.init(params))
    for step_index in range(total_steps):
        carry = run_one(carry, jnp.int32(step_index), padded_inputs, padded_targets, *dynamic, shuffle_key)
    return carry[0]


@functools.lru_cache(maxsize=64)
def _probability_program(model: nn.Module):
    return jax.jit(lambda params, inputs: jax.nn.softmax(model.apply(params, inputs)))


def predict_proba(model: nn.Module, params: Params, inputs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Class probabilities for ``inputs``, evaluated in padded power-of-two chunks (few compilations)."""
    program = _probability_program(model)
    outputs = []
    for start in range(0, len(inputs), chunk):
        block = np.asarray(inputs[start : start + chunk], np.float32)
        padded = pad_rows(block, capacity_for(len(block), minimum=8))
        outputs.append(np.asarray(program(params, padded))[: len(block)])
    if not outputs:
        raise ValueError("cannot predict on an empty batch")
    return np.concatenate(outputs)


def predict_labels(model: nn.Module, params: Params, inputs: np.ndarray) -> np.ndarray:
    return predict_proba(model, params, inputs).argmax(axis=-1).astype(np.int32)
