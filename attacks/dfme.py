"""Data-free model extraction (Truong et al., "Data-Free Model Extraction", CVPR 2021).

No data at all: a generator ``G(z)`` proposes inputs, the student learns to match the victim on them, and
the generator learns to propose inputs on which student and victim disagree. The disagreement is the l1
distance between logits; the victim's are recovered from its probabilities as ``log p`` centred to zero mean
over classes (softmax forgets a constant, so the student's are centred too).

The victim is a black box, so the generator's gradient through it is estimated by forward differences: for
``m`` random unit directions ``u``, ``grad L(a) ~ (d / m) sum_u (L(a + mu u) - L(a)) / mu * u``, then
backpropagated through ``G``. Here ``a`` is the generator's output before its sigmoid (inputs are
``sigmoid(a)``, always inside ``[0, 1]``), so perturbed queries stay valid without clipping. Every
finite-difference point is a query: a generator step spends ``batch * (m + 1)`` queries, a student step
``batch``. Each iteration is one generator step and ``student_steps`` student steps, as in the paper.

Label-only answers carry no logits: the disagreement becomes the student's cross-entropy against the
answered label (one-hot), for both players. The attack uses the surrogate's architecture as the student and
trains it in the adversarial loop itself, not through ``heistlab.training.train_classifier``; a student with
batch norm (ResNet-20) updates its running statistics in its own steps and is evaluated with them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from heistlab.attacks.base import Attack, AttackResult, Surrogate, affordable, check_budget, query_in_batches

from heistlab.api import Oracle
from heistlab.training import apply_training_step, init_params, value_and_grad_training


class Generator(nn.Module):
    """Latent noise to pre-sigmoid inputs: an MLP whose last layer has one unit per input value."""

    output_size: int
    hidden: Sequence[int] = (256, 256)

    @nn.compact
    def __call__(self, z):
        x = z
        for width in self.hidden:
            x = nn.relu(nn.LayerNorm()(nn.Dense(width)(x)))
        return nn.Dense(self.output_size)(x)


def centred_log_probabilities(answers: jax.Array, floor: float) -> jax.Array:
    """Logits recovered from probabilities up to softmax's shift: ``log max(p, floor)`` minus its mean."""
    logs = jnp.log(jnp.maximum(answers, floor))
    return logs - logs.mean(axis=-1, keepdims=True)


def disagreement(student_logits: jax.Array, targets: jax.Array, soft: bool) -> jax.Array:
    """Per-example loss: l1 between centred logits (soft), or cross-entropy against one-hot labels."""
    if soft:
        centred = student_logits - student_logits.mean(axis=-1, keepdims=True)
        return jnp.abs(centred - targets).mean(axis=-1)
    return -(targets * jax.nn.log_softmax(student_logits)).sum(axis=-1)


@functools.lru_cache(maxsize=16)
def generator_ascent(generator: nn.Module, optimizer: optax.GradientTransformation):
    """The generator's compiled step: it ascends the attack's loss L on its outputs, descending on -L with the
    estimated dL/d(input) (forward differences through the victim) chained back through G."""

    @jax.jit
    def step(generator_params, opt_state, z, input_gradient):
        _, pullback = jax.vjp(lambda params: generator.apply(params, z), generator_params)
        (gradient,) = pullback(-input_gradient)
        updates, opt_state = optimizer.update(gradient, opt_state, generator_params)
        return optax.apply_updates(generator_params, updates), opt_state

    return step


def _programs(student: nn.Module, generator: Generator, student_lr: float, generator_lr: float, soft: bool):
    """Jitted pieces of one DFME iteration, compiled once per models and settings."""
    student_optimizer, generator_optimizer = optax.adam(student_lr), optax.adam(generator_lr)

    @jax.jit
    def propose(generator_params, z):
        return generator.apply(generator_params, z)

    @jax.jit
    def student_losses(student_params, inputs, targets):
        return disagreement(student.apply(student_params, inputs), targets, soft)

    generator_step = generator_ascent(generator, generator_optimizer)

    @jax.jit
    def student_step(student_params, opt_state, inputs, targets, weights):
        def loss_of_logits(logits):
            per_example = disagreement(logits, targets, soft)
            return jnp.sum(weights * per_example) / jnp.maximum(weights.sum(), 1.0)

        value, gradient, updated = value_and_grad_training(student, student_params, inputs, loss_of_logits)
        student_params, opt_state = apply_training_step(
            student_optimizer, student_params, opt_state, gradient, updated
        )
        return student_params, opt_state, value

    return student_optimizer, generator_optimizer, propose, student_losses, generator_step, student_step


def random_directions(key: jax.Array, batch: int, directions: int, size: int) -> np.ndarray:
    """``(batch, directions, size)`` directions drawn uniformly from the unit sphere."""
    normal = np.asarray(jax.random.normal(key, (batch, directions, size)), np.float64)
    return normal / np.linalg.norm(normal, axis=-1, keepdims=True)


def forward_difference_gradient(
    losses_at_base: np.ndarray, losses_at_steps: np.ndarray, directions: np.ndarray, step: float
) -> np.ndarray:
    """DFME's zeroth-order estimate ``(d / m) sum_u (L(a + mu u) - L(a)) / mu * u`` for each example."""
    size, count = directions.shape[-1], directions.shape[1]
    slopes = (losses_at_steps - losses_at_base[:, None]) / step
    return (size / count) * np.einsum("bm,bmd->bd", slopes, directions)


def dfme(
    budget: int = 20000,
    batch_size: int = 16,
    directions: int = 1,
    step: float = 1e-3,
    student_steps: int = 5,
    student_lr: float = 3e-3,
    generator_lr: float = 1e-3,
    latent_size: int = 32,
    generator_hidden: Sequence[int] = (256, 256),
    floor: float = 1e-8,
) -> Attack:
    """Builds DFME: ``directions`` is the paper's m (1 in its code), ``step`` its mu, ``student_steps`` its
    n_S (5); every finite-difference point counts against ``budget``."""
    check_budget("dfme", budget)
    for name, value in (
        ("batch_size", batch_size),
        ("directions", directions),
        ("student_steps", student_steps),
        ("latent_size", latent_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"dfme: {name} must be an integer >= 1, got {value!r}")
    for name, value in (("step", step), ("student_lr", student_lr), ("generator_lr", generator_lr)):
        if not (isinstance(value, int | float) and value > 0):
            raise ValueError(f"dfme: {name} must be a number > 0, got {value!r}")
    if not (isinstance(floor, int | float) and 0 < floor < 1):
        raise ValueError(f"dfme: floor must be a number in (0, 1), got {floor!r}")
    generator_hidden = tuple(generator_hidden)
    if not generator_hidden or any(not isinstance(width, int) or width < 1 for width in generator_hidden):
        raise ValueError(f"dfme: generator_hidden must be positive integers, got {generator_hidden!r}")

    def run(oracle: Oracle, pool: np.ndarray, surrogate: Surrogate, key: jax.Array) -> AttackResult:
        input_shape = tuple(oracle.input_shape)
        size = math.prod(input_shape)
        soft = oracle.output != "labels"
        generator = Generator(output_size=size, hidden=generator_hidden)
        student_opt, generator_opt, propose, student_losses, generator_step, student_step = _programs(
            surrogate.model, generator, float(student_lr), float(generator_lr), soft
        )
        student_key, generator_key, loop_key = jax.random.split(key, 3)
        student_params = init_params(surrogate.model, input_shape, student_key)
        generator_params = generator.init(generator_key, jnp.zeros((1, latent_size)))
        student_state = student_opt.init(student_params)
        generator_state = generator_opt.init(generator_params)

        def as_inputs(pre_sigmoid: np.ndarray) -> np.ndarray:
            return (1.0 / (1.0 + np.exp(-pre_sigmoid))).reshape(-1, *input_shape).astype(np.float32)

        def as_targets(answers: np.ndarray) -> np.ndarray:
            if soft:
                return np.asarray(centred_log_probabilities(jnp.asarray(answers), floor))
            return np.eye(oracle.num_classes, dtype=np.float32)[answers]

        def ask(inputs: np.ndarray) -> np.ndarray:
            """Targets for the served prefix of ``inputs`` (shorter when the API refused a batch)."""
            served, answers = query_in_batches(oracle, inputs, batch_size)
            if len(served) == 0:
                return np.zeros((0, oracle.num_classes), np.float32)
            return as_targets(answers)

        spent, history, iteration, refused = 0, [], 0, False
        while not refused and affordable(oracle, budget - spent) > 0:
            keys = jax.random.split(jax.random.fold_in(loop_key, iteration), student_steps + 2)
            record = {"round": iteration, "generator_loss": None, "student_loss": None}
            if affordable(oracle, budget - spent) >= batch_size * (directions + 1):
                z = jax.random.normal(keys[0], (batch_size, latent_size))
                base = np.asarray(propose(generator_params, z), np.float64)
                units = random_directions(keys[1], batch_size, directions, size)
                stepped = base[:, None, :] + step * units
                inputs = as_inputs(np.concatenate([base, stepped.reshape(-1, size)]))
                targets = ask(inputs)
                spent += len(targets)
                if len(targets) < len(inputs):
                    break
                losses = np.asarray(student_losses(student_params, inputs, targets), np.float64)
                at_base, at_steps = losses[:batch_size], losses[batch_size:].reshape(batch_size, directions)
                gradient = forward_difference_gradient(at_base, at_steps, units, step)
                generator_params, generator_state = generator_step(
                    generator_params, generator_state, z, jnp.asarray(gradient, jnp.float32)
                )
                record["generator_loss"] = float(at_base.mean())
            for student_index in range(student_steps):
                count = min(batch_size, affordable(oracle, budget - spent))
                if count == 0:
                    break
                z = jax.random.normal(keys[2 + student_index], (batch_size, latent_size))
                inputs = as_inputs(np.asarray(propose(generator_params, z), np.float64))
                targets = ask(inputs[:count])
                spent += len(targets)
                if len(targets) < count:
                    refused = True
                    break
                padded = np.zeros((batch_size, targets.shape[1]), np.float32)
                padded[:count] = targets
                weights = (np.arange(batch_size) < count).astype(np.float32)
                student_params, student_state, loss = student_step(
                    student_params, student_state, inputs, padded, weights
                )
                record["student_loss"] = float(loss)
            record["queries"] = spent
            history.append(record)
            iteration += 1
        if spent == 0:
            raise RuntimeError("dfme: the API served no queries, so the student learned nothing")
        return AttackResult(student_params, spent, tuple(history))

    return Attack("dfme", budget, run, keeps_queries=False)
