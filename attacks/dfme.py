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

from heistlab.api import Oracle
from heistlab.attacks.base import Attack, AttackResult, Surrogate, affordable, check_budget, query_in_batches
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


def _programs(student: nn.Module, student_lr: float, soft: bool):
    """The student's jitted pieces of one DFME iteration: its optimiser, per-example losses and step."""
    student_optimizer = optax.adam(student_lr)

    @jax.jit
    def student_losses(student_params, inputs, targets):
        return disagreement(student.apply(student_params, inputs), targets, soft)

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

    return student_optimizer, student_losses, student_step


@functools.lru_cache(maxsize=16)
def generator_programs(generator: Generator, learning_rate: float):
    """The generator's Adam optimiser, its jitted forward pass and its ascent step."""
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def propose(generator_params, z):
        return generator.apply(generator_params, z)

    return optimizer, propose, generator_ascent(generator, optimizer)


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


def perturbed_points(base: np.ndarray, key: jax.Array, directions: int, step: float):
    """The forward-difference points around each row of ``base``: ``(units, base + step * units)``, with
    ``units`` of shape ``(batch, directions, size)``."""
    units = random_directions(key, len(base), directions, base.shape[-1])
    return units, base[:, None, :] + step * units


def sigmoid_inputs(pre_sigmoid: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """Pre-sigmoid generator outputs as API inputs: ``sigmoid(a)``, always inside ``[0, 1]``."""
    return (1.0 / (1.0 + np.exp(-pre_sigmoid))).reshape(-1, *input_shape).astype(np.float32)


def served_targets(oracle: Oracle, inputs: np.ndarray, batch_size: int, as_targets) -> np.ndarray:
    """``as_targets(answers)`` for the served prefix of ``inputs`` (shorter when the API refused a batch)."""
    served, answers = query_in_batches(oracle, inputs, batch_size)
    if len(served) == 0:
        return np.zeros((0, oracle.num_classes), np.float32)
    return as_targets(answers)


def padded(targets: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``targets`` zero-padded to ``batch_size`` rows (one compiled step for every batch), and weights that
    are 1 on its rows and 0 on the padding."""
    rows = np.zeros((batch_size, targets.shape[1]), np.float32)
    rows[: len(targets)] = targets
    return rows, (np.arange(batch_size) < len(targets)).astype(np.float32)


class GeneratorPlayer:
    """The generator of DFME and of MAZE (Kariyappa et al., CVPR 2021), with its parameters and optimiser
    state: it proposes batches of inputs and ascends the attack's loss through the black-box victim by
    forward differences (see the module docstring)."""

    def __init__(self, generator: Generator, learning_rate: float, key, batch_size, latent_size, input_shape):
        self.optimizer, self.propose, self.ascent = generator_programs(generator, learning_rate)
        self.params = generator.init(key, jnp.zeros((1, latent_size)))
        self.state = self.optimizer.init(self.params)
        self.batch_size, self.latent_size, self.input_shape = batch_size, latent_size, input_shape

    def latent(self, key: jax.Array) -> jax.Array:
        return jax.random.normal(key, (self.batch_size, self.latent_size))

    def generate(self, key: jax.Array) -> np.ndarray:
        """A batch of inputs generated from latent noise drawn with ``key``."""
        pre_sigmoid = np.asarray(self.propose(self.params, self.latent(key)), np.float64)
        return sigmoid_inputs(pre_sigmoid, self.input_shape)

    def queries(self, key: jax.Array, count: int, ask) -> tuple[np.ndarray, np.ndarray]:
        """A generated batch and ``ask``'s targets for its first ``count`` rows (fewer when refused)."""
        inputs = self.generate(key)
        return inputs, ask(inputs[:count])

    def ascend(self, keys, directions: int, step: float, ask, losses_of) -> tuple[int, float | None]:
        """One generator step: a generated batch and ``directions`` forward-difference points around each
        row, all asked; ``losses_of(inputs, targets)`` is the per-example loss it ascends. ``keys``: the
        latent noise's and the directions'. Returns the queries served and the loss's mean over the batch,
        or None (no step taken) when the API served less than all."""
        z_key, direction_key = keys
        z = self.latent(z_key)
        base = np.asarray(self.propose(self.params, z), np.float64)
        units, stepped = perturbed_points(base, direction_key, directions, step)
        inputs = sigmoid_inputs(np.concatenate([base, stepped.reshape(-1, base.shape[-1])]), self.input_shape)
        targets = ask(inputs)
        if len(targets) < len(inputs):
            return len(targets), None
        losses = np.asarray(losses_of(inputs, targets), np.float64)
        batch = self.batch_size
        at_base, at_steps = losses[:batch], losses[batch:].reshape(batch, directions)
        gradient = forward_difference_gradient(at_base, at_steps, units, step)
        self.params, self.state = self.ascent(self.params, self.state, z, jnp.asarray(gradient, jnp.float32))
        return len(targets), float(at_base.mean())


def check_generator_settings(attack: str, integers, numbers, floor, generator_hidden) -> tuple[int, ...]:
    """Refuses, naming ``attack`` and the setting: an entry of ``integers`` ``(name, value, least)`` that is
    not an integer >= least, of ``numbers`` ``(name, value)`` not a finite number > 0, a ``floor`` outside
    (0, 1) or an empty or non-positive ``generator_hidden``; returns the latter as a tuple."""
    for name, value, least in integers:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{attack}: {name} must be an integer >= {least}, got {value!r}")
    for name, value in numbers:
        if isinstance(value, bool) or not (isinstance(value, int | float) and 0 < value < math.inf):
            raise ValueError(f"{attack}: {name} must be a finite number > 0, got {value!r}")
    if not (isinstance(floor, int | float) and 0 < floor < 1):
        raise ValueError(f"{attack}: floor must be a number in (0, 1), got {floor!r}")
    generator_hidden = tuple(generator_hidden)
    if not generator_hidden or any(not isinstance(width, int) or width < 1 for width in generator_hidden):
        raise ValueError(f"{attack}: generator_hidden must be positive integers, got {generator_hidden!r}")
    return generator_hidden


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
    generator_hidden = check_generator_settings(
        "dfme",
        [
            ("batch_size", batch_size, 1),
            ("directions", directions, 1),
            ("student_steps", student_steps, 1),
            ("latent_size", latent_size, 1),
        ],
        [("step", step), ("student_lr", student_lr), ("generator_lr", generator_lr)],
        floor,
        generator_hidden,
    )

    def run(oracle: Oracle, pool: np.ndarray, surrogate: Surrogate, key: jax.Array) -> AttackResult:
        input_shape = tuple(oracle.input_shape)
        soft = oracle.output != "labels"
        student_opt, student_losses, student_step = _programs(surrogate.model, float(student_lr), soft)
        student_key, generator_key, loop_key = jax.random.split(key, 3)
        student_params = init_params(surrogate.model, input_shape, student_key)
        student_state = student_opt.init(student_params)
        generator = Generator(output_size=math.prod(input_shape), hidden=generator_hidden)
        player = GeneratorPlayer(
            generator, float(generator_lr), generator_key, batch_size, latent_size, input_shape
        )

        def as_targets(answers: np.ndarray) -> np.ndarray:
            if soft:
                return np.asarray(centred_log_probabilities(jnp.asarray(answers), floor))
            return np.eye(oracle.num_classes, dtype=np.float32)[answers]

        ask = functools.partial(served_targets, oracle, batch_size=batch_size, as_targets=as_targets)
        spent, history, iteration, refused = 0, [], 0, False
        while not refused and affordable(oracle, budget - spent) > 0:
            keys = jax.random.split(jax.random.fold_in(loop_key, iteration), student_steps + 2)
            record = {"round": iteration, "generator_loss": None, "student_loss": None}
            if affordable(oracle, budget - spent) >= batch_size * (directions + 1):
                losses_of = functools.partial(student_losses, student_params)
                served, record["generator_loss"] = player.ascend(keys[:2], directions, step, ask, losses_of)
                spent += served
                if record["generator_loss"] is None:
                    break
            for student_index in range(student_steps):
                count = min(batch_size, affordable(oracle, budget - spent))
                if count == 0:
                    break
                inputs, targets = player.queries(keys[2 + student_index], count, ask)
                spent += len(targets)
                if len(targets) < count:
                    refused = True
                    break
                student_params, student_state, loss = student_step(
                    student_params, student_state, inputs, *padded(targets, batch_size)
                )
                record["student_loss"] = float(loss)
            record["queries"] = spent
            history.append(record)
            iteration += 1
        if spent == 0:
            raise RuntimeError("dfme: the API served no queries, so the student learned nothing")
        return AttackResult(student_params, spent, tuple(history))

    return Attack("dfme", budget, run, keeps_queries=False)
