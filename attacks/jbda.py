"""Jacobian-based dataset augmentation (Papernot et al., "Practical Black-Box Attacks against Machine
Learning", AsiaCCS 2017).

Start from a small seed set labelled by the victim (top-1 only: the attack needs labels, nothing more), train
a substitute, then each round add ``x + lambda_r * sign(d F_y(x) / dx)`` for every known ``x`` with its victim
label ``y``, where ``F`` is the substitute and ``lambda_r = lambda * (-1) ** (r // flip_every)`` flips sign
periodically (the paper's periodic step size). The set doubles each round until the budget is spent.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from heistlab.api import Oracle
from heistlab.attacks.base import (
    Attack,
    AttackResult,
    Surrogate,
    affordable,
    check_budget,
    hard_targets,
    query_in_batches,
)
from heistlab.training import capacity_for, pad_rows, train_classifier


@functools.lru_cache(maxsize=16)
def _jacobian_sign(model: nn.Module):
    def label_logit(params, x, label):
        return model.apply(params, x[None])[0, label]

    gradient = jax.vmap(jax.grad(label_logit, argnums=1), in_axes=(None, 0, 0))
    return jax.jit(lambda params, inputs, labels: jnp.sign(gradient(params, inputs, labels)))


def jacobian_sign(model: nn.Module, params, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    capacity = capacity_for(len(inputs))
    signs = _jacobian_sign(model)(params, pad_rows(inputs, capacity), pad_rows(labels, capacity))
    return np.asarray(signs)[: len(inputs)]


def jbda(
    budget: int = 1000,
    seed_size: int = 150,
    rounds: int = 6,
    step: float = 0.1,
    flip_every: int = 3,
    query_batch: int = 256,
) -> Attack:
    """Builds JBDA with the paper's defaults: 150 seeds, 6 rounds, lambda 0.1, sign flip every 3 rounds."""
    check_budget("jbda", budget)
    for name, value in (("seed_size", seed_size), ("flip_every", flip_every), ("query_batch", query_batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"jbda: {name} must be an integer >= 1, got {value!r}")
    if not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"jbda: rounds must be an integer >= 0, got {rounds!r}")
    if not step > 0:
        raise ValueError(f"jbda: step (lambda) must be > 0, got {step!r}")

    def run(oracle: Oracle, pool: np.ndarray, surrogate: Surrogate, key: jax.Array) -> AttackResult:
        keys = jax.random.split(key, rounds + 2)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(keys[-1])))
        seeds = pool[rng.permutation(len(pool))[: affordable(oracle, min(seed_size, budget))]]
        inputs, answers = query_in_batches(oracle, seeds, query_batch)
        if len(inputs) == 0:
            raise RuntimeError("jbda: the API served no seed queries, so there is nothing to train on")
        targets = hard_targets(oracle, answers)
        params = train_classifier(surrogate.model, inputs, targets, keys[0], surrogate.train)
        history = [{"round": 0, "queries": len(inputs), "known": len(inputs)}]
        for round_index in range(rounds):
            spendable = affordable(oracle, budget - len(inputs))
            if spendable == 0:
                break
            signed_step = step * (-1) ** (round_index // flip_every)
            labels = targets.argmax(axis=-1)
            grown = inputs + signed_step * jacobian_sign(surrogate.model, params, inputs, labels)
            grown = np.clip(grown, 0.0, 1.0).astype(np.float32)
            if len(grown) > spendable:
                grown = grown[rng.permutation(len(grown))[:spendable]]
            new_inputs, new_answers = query_in_batches(oracle, grown, query_batch)
            if len(new_inputs) == 0:
                break
            inputs = np.concatenate([inputs, new_inputs])
            targets = np.concatenate([targets, hard_targets(oracle, new_answers)])
            params = train_classifier(
                surrogate.model, inputs, targets, keys[round_index + 1], surrogate.train, params=params
            )
            history.append({"round": round_index + 1, "queries": len(new_inputs), "known": len(inputs)})
        return AttackResult(params, len(inputs), tuple(history))

    return Attack("jbda", budget, run)
