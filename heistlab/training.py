"""Training and inference shared by victims and every extraction attack's surrogate.

``train_classifier`` minimises softmax cross-entropy against target *distributions* (one-hot rows for hard
labels, served probabilities for soft labels) with Adam. Data are padded to a power-of-two capacity and the
step count is a traced value, so training sets that grow round by round (JBDA, ActiveThief) reuse one compiled
program per capacity bucket instead of compiling per size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from heistlab import progress
from heistlab.models import trains_in_compiled_loop

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


def capacity_for(count: int, minimum: int = 64, steps_per_octave: int = 1) -> int:
    """The bucket that holds ``count`` rows (at least ``minimum``): the next power of two, or with
    ``steps_per_octave`` > 1 the next of that many evenly spaced sizes up to it (256, 320, 384, 448, 512
    for 4), so less padding for a few more compiled programs."""
    power = max(minimum, 1 << max(0, count - 1).bit_length())
    half = power // 2
    if steps_per_octave == 1 or count <= half:
        return power
    step = max(1, half // steps_per_octave)
    return half + -(-(count - half) // step) * step


def pad_rows(array: np.ndarray, capacity: int) -> np.ndarray:
    padding = [(0, capacity - len(array))] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, padding)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]


DEFAULT_TRAINING = TrainConfig()


def epoch_order(key: jax.Array, epoch: jax.Array, count: jax.Array, capacity: int) -> jax.Array:
    """Epoch ``epoch``'s shuffle of ``capacity`` padded rows: the ``count`` real rows first."""
    shuffle_keys = jax.random.uniform(jax.random.fold_in(key, epoch), (capacity,))
    return jnp.argsort(jnp.where(jnp.arange(capacity) < count, shuffle_keys, 2.0))


# Models stepped from Python run this many steps per dispatch, unrolled in one program (no lax loop, which
# slows XLA-CPU convolutions). 28x28 CNN, batch 128: 6.0 ms per step one at a time, 4.9 ms four at a time.
STEPS_PER_CALL = 4


class TrainingProgram(NamedTuple):
    """The compiled pieces of one (model, batch size, learning rate) training loop.

    ``run_all`` nests the steps of an epoch inside a loop over epochs, so each epoch's shuffle (a sort of
    the whole capacity) is computed once, not once per step. Models stepped from Python get the epoch's
    ``order`` from ``epoch_program`` and call ``run_chunk`` (``STEPS_PER_CALL`` steps) and ``run_one``.
    """

    optimizer: optax.GradientTransformation
    run_all: Callable
    run_one: Callable
    run_chunk: Callable


# Where a compiled training loop that reports its epochs sends each finished epoch (a progress bar's advance).
_epoch_listeners: list[Callable[[int], None]] = []


def _epoch_finished() -> None:
    if _epoch_listeners:
        _epoch_listeners[-1](1)


@functools.lru_cache(maxsize=64)
def _training_program(
    model: nn.Module, batch_size: int, learning_rate: float, report_epochs: bool = False
) -> TrainingProgram:
    """Adam on minibatches of a padded data set: the whole loop, one step, and ``STEPS_PER_CALL`` steps.

    With ``report_epochs`` the whole loop calls back to the host after each epoch (a progress bar's count);
    the parameters it computes are the same.
    """
    optimizer = optax.adam(learning_rate)

    def loss_fn(params, inputs, targets, weights):
        log_probs = jax.nn.log_softmax(model.apply(params, inputs))
        per_example = -jnp.sum(targets * log_probs, axis=-1)
        return jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1.0)

    def step(carry, position_in_epoch, order, inputs, targets, count):
        params, opt_state = carry
        position = position_in_epoch * batch_size
        rows = jax.lax.dynamic_slice(order, (position,), (batch_size,))
        weights = ((position + jnp.arange(batch_size)) < count).astype(jnp.float32)
        grads = jax.grad(loss_fn)(params, inputs[rows], targets[rows], weights)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def run_all(params, inputs, targets, count, steps_per_epoch, epochs, key):
        def epoch(index, carry):
            order = epoch_order(key, index, count, inputs.shape[0])
            one_step = lambda position, c: step(c, position, order, inputs, targets, count)
            carry = jax.lax.fori_loop(0, steps_per_epoch, one_step, carry)
            if report_epochs:
                jax.debug.callback(_epoch_finished, ordered=True)
            return carry

        params, _ = jax.lax.fori_loop(0, epochs, epoch, (params, optimizer.init(params)))
        return params

    @jax.jit
    def run_one(carry, position_in_epoch, order, inputs, targets, count):
        return step(carry, position_in_epoch, order, inputs, targets, count)

    @jax.jit
    def run_chunk(carry, first_position, order, inputs, targets, count):
        for offset in range(STEPS_PER_CALL):
            carry = step(carry, first_position + offset, order, inputs, targets, count)
        return carry

    return TrainingProgram(optimizer, run_all, run_one, run_chunk)


epoch_program = jax.jit(epoch_order, static_argnames="capacity")


@functools.lru_cache(maxsize=64)
def _init_program(model: nn.Module, input_shape: tuple[int, ...]):
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, *input_shape), jnp.float32)))


def init_params(model: nn.Module, input_shape: tuple[int, ...], key: jax.Array) -> Params:
    return _init_program(model, tuple(input_shape))(key)


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
    shown = progress.interactive()
    description = f"training {type(model).__name__} (epochs)"
    if trains_in_compiled_loop(model, inputs.shape[1:]):
        program = _training_program(model, config.batch_size, float(config.learning_rate), shown)
        dynamic = (np.int32(count), np.int32(steps_per_epoch), np.int32(config.epochs))
        if not shown:
            return program.run_all(params, padded_inputs, padded_targets, *dynamic, shuffle_key)
        with progress.counter(description, config.epochs) as advance:
            _epoch_listeners.append(advance)
            try:  # the bar counts epochs as the device finishes them
                return jax.block_until_ready(
                    program.run_all(params, padded_inputs, padded_targets, *dynamic, shuffle_key)
                )
            finally:
                _epoch_listeners.pop()
    program = _training_program(model, config.batch_size, float(config.learning_rate))
    carry, rows = (params, program.optimizer.init(params)), np.int32(count)
    chunked = steps_per_epoch - steps_per_epoch % STEPS_PER_CALL
    with progress.counter(description, config.epochs) as advance:
        for epoch in range(config.epochs):
            order = epoch_program(shuffle_key, np.int32(epoch), rows, capacity)
            for position in range(0, chunked, STEPS_PER_CALL):
                carry = program.run_chunk(
                    carry, np.int32(position), order, padded_inputs, padded_targets, rows
                )
            for position in range(chunked, steps_per_epoch):
                carry = program.run_one(carry, np.int32(position), order, padded_inputs, padded_targets, rows)
            if shown:  # the bar counts finished epochs, not dispatched ones
                jax.block_until_ready(carry)
            advance(1)
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
