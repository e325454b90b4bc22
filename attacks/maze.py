"""MAZE (Kariyappa, Prakash and Qureshi, "MAZE: Data-Free Model Stealing Attack Using Zeroth-Order Gradient
Estimation", CVPR 2021).

Like DFME (``attacks.dfme``, whose generator and forward-difference estimator it shares), MAZE needs no
data: a generator ``G(z)`` proposes inputs on which the clone and the victim disagree, and the clone learns
to agree with the victim there. MAZE's disagreement is the KL divergence ``KL(victim(x) || clone(x))``
between their output distributions. The victim is a black box, so the generator's gradient of that loss
through it is estimated by forward differences along ``m`` random unit directions (10 in the paper, step
``mu = 1e-3``): ``grad L(a) ~ (d / m) sum_u (L(a + mu u) - L(a)) / mu * u``, then backpropagated through G.

Each iteration is ``generator_steps`` generator steps, ``clone_steps`` clone steps on fresh generated queries,
and ``replay_steps`` clone steps on batches drawn from a replay buffer holding every clone-step query and its
answer so far: experience replay, the paper's remedy for the clone forgetting regions the generator has moved
away from. Every finite-difference point is a query: a generator step spends ``batch * (m + 1)``, a clone
step ``batch``, a replay step none.

Differences from the paper, named: the perturbation is taken before the generator's sigmoid (inputs are
``sigmoid(a)``, as in ``attacks.dfme``) so every perturbed query is a valid input without clipping; the
generator is an MLP; the replay buffer keeps every clone-step query (at digits scale memory is no concern);
the clone is trained with Adam.
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
from heistlab.attacks.base import Attack, AttackResult, Surrogate, affordable, check_budget
from heistlab.attacks.dfme import Generator, GeneratorPlayer, check_generator_settings, padded, served_targets
from heistlab.training import init_params


def kl_to_victim(clone_logits: jax.Array, victim_log_probs: jax.Array) -> jax.Array:
    """Per-example ``KL(victim || clone) = sum_c p_c (log p_c - log q_c)``, from the victim's
    log-probabilities and the clone's logits."""
    clone_log_probs = jax.nn.log_softmax(clone_logits)
    return jnp.sum(jnp.exp(victim_log_probs) * (victim_log_probs - clone_log_probs), axis=-1)


def victim_log_probabilities(answers: np.ndarray, floor: float) -> np.ndarray:
    """Served scores as log-probabilities: renormalised (top-k answers) and floored before the log."""
    answers = np.maximum(np.asarray(answers, np.float64), floor)
    return np.log(answers / answers.sum(axis=-1, keepdims=True)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _programs(clone: nn.Module, clone_lr: float):
    """The clone's jitted pieces of one MAZE iteration, compiled once per model and learning rate."""
    clone_optimizer = optax.adam(clone_lr)

    @jax.jit
    def losses(clone_params, inputs, victim_log_probs):
        return kl_to_victim(clone.apply(clone_params, inputs), victim_log_probs)

    @jax.jit
    def clone_step(clone_params, opt_state, inputs, victim_log_probs, weights):
        def loss(params):
            per_example = kl_to_victim(clone.apply(params, inputs), victim_log_probs)
            return jnp.sum(weights * per_example) / jnp.maximum(weights.sum(), 1.0)

        value, gradient = jax.value_and_grad(loss)(clone_params)
        updates, opt_state = clone_optimizer.update(gradient, opt_state, clone_params)
        return optax.apply_updates(clone_params, updates), opt_state, value

    return clone_optimizer, losses, clone_step


class ReplayBuffer:
    """Every clone-step query with its answer and the iteration that paid for it; sampled uniformly."""

    def __init__(self):
        self.inputs: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.rounds: list[np.ndarray] = []

    def add(self, inputs: np.ndarray, targets: np.ndarray, iteration: int) -> None:
        self.inputs.append(inputs)
        self.targets.append(targets)
        self.rounds.append(np.full(len(inputs), iteration))

    def __len__(self) -> int:
        return sum(len(block) for block in self.inputs)

    def sample(self, key: jax.Array, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``count`` stored (inputs, targets, iterations) drawn uniformly with replacement."""
        inputs, targets = np.concatenate(self.inputs), np.concatenate(self.targets)
        self.inputs, self.targets = [inputs], [targets]
        self.rounds = [np.concatenate(self.rounds)]
        chosen = np.asarray(jax.random.randint(key, (count,), 0, len(inputs)))
        return inputs[chosen], targets[chosen], self.rounds[0][chosen]


def minimum_budget(batch_size: int, directions: int) -> int:
    """One generator step and one clone step: below it the generator never learns."""
    return batch_size * (directions + 1) + batch_size


def maze(
    budget: int = 20000,
    batch_size: int = 16,
    directions: int = 10,
    step: float = 1e-3,
    generator_steps: int = 1,
    clone_steps: int = 5,
    replay_steps: int = 5,
    clone_lr: float = 3e-3,
    generator_lr: float = 1e-3,
    latent_size: int = 32,
    generator_hidden: Sequence[int] = (256, 256),
    floor: float = 1e-8,
) -> Attack:
    """Builds MAZE: ``directions`` is the paper's m (10), ``step`` its mu (1e-3); every finite-difference
    point counts against ``budget``, which must pay for one generator step and one clone step at least.

    Raises:
      ValueError: naming the setting out of range, or a budget below ``minimum_budget``.
    """
    check_budget("maze", budget)
    generator_hidden = check_generator_settings(
        "maze",
        [
            ("batch_size", batch_size, 1),
            ("directions", directions, 1),
            ("generator_steps", generator_steps, 1),
            ("clone_steps", clone_steps, 1),
            ("replay_steps", replay_steps, 0),
            ("latent_size", latent_size, 1),
        ],
        [("step", step), ("clone_lr", clone_lr), ("generator_lr", generator_lr)],
        floor,
        generator_hidden,
    )
    least = minimum_budget(batch_size, directions)
    if budget < least:
        raise ValueError(
            f"maze: budget={budget} cannot pay for one generator step and one clone step (batch_size * "
            f"(directions + 1) + batch_size = {least} queries); accepted: budget >= {least}, or a smaller "
            "batch_size or fewer directions"
        )

    def run(oracle: Oracle, pool: np.ndarray, surrogate: Surrogate, key: jax.Array) -> AttackResult:
        if oracle.output == "labels":
            raise ValueError(
                "maze needs probabilities (its loss is the KL divergence between output distributions), but "
                "the API serves labels only (api.output=labels); accepted: api.output=probabilities or top_k"
            )
        input_shape = tuple(oracle.input_shape)
        clone_opt, losses, clone_step = _programs(surrogate.model, float(clone_lr))
        clone_key, generator_key, loop_key = jax.random.split(key, 3)
        clone_params = init_params(surrogate.model, input_shape, clone_key)
        clone_state = clone_opt.init(clone_params)
        generator = Generator(output_size=math.prod(input_shape), hidden=generator_hidden)
        player = GeneratorPlayer(
            generator, float(generator_lr), generator_key, batch_size, latent_size, input_shape
        )
        replay = ReplayBuffer()
        as_targets = functools.partial(victim_log_probabilities, floor=floor)
        ask = functools.partial(served_targets, oracle, batch_size=batch_size, as_targets=as_targets)

        spent, history, iteration, stopped = 0, [], 0, False
        while not stopped and affordable(oracle, budget - spent) > 0:
            draws = 2 * generator_steps + clone_steps + replay_steps
            keys = iter(jax.random.split(jax.random.fold_in(loop_key, iteration), draws))
            record = {"round": iteration, "generator_loss": None, "clone_loss": None, "replay_oldest": None}
            for _ in range(generator_steps):
                if affordable(oracle, budget - spent) < batch_size * (directions + 1):
                    break
                losses_of = functools.partial(losses, clone_params)  # the generator ascends the KL
                served, loss = player.ascend((next(keys), next(keys)), directions, step, ask, losses_of)
                spent += served
                if loss is None:
                    stopped = True
                    break
                record["generator_loss"] = loss
            for _ in range(clone_steps):
                count = 0 if stopped else min(batch_size, affordable(oracle, budget - spent))
                if count == 0:
                    break
                inputs, targets = player.queries(next(keys), count, ask)
                spent += len(targets)
                if len(targets) == 0:
                    stopped = True
                    break
                replay.add(inputs[: len(targets)], targets, iteration)
                clone_params, clone_state, loss = clone_step(
                    clone_params, clone_state, inputs, *padded(targets, batch_size)
                )
                record["clone_loss"] = float(loss)
                stopped = len(targets) < count
            for _ in range(replay_steps if len(replay) else 0):
                inputs, targets, paid_in = replay.sample(next(keys), batch_size)
                weights = np.ones(batch_size, np.float32)
                clone_params, clone_state, _ = clone_step(clone_params, clone_state, inputs, targets, weights)
                oldest = int(paid_in.min())
                if record["replay_oldest"] is None or oldest < record["replay_oldest"]:
                    record["replay_oldest"] = oldest
            record["queries"] = spent
            history.append(record)
            iteration += 1
        if spent == 0:
            raise RuntimeError("maze: the API served no queries, so the clone learned nothing")
        return AttackResult(clone_params, spent, tuple(history))

    return Attack("maze", budget, run, keeps_queries=True, needs_scores=True)
