"""ActiveThief (Pal et al., "ActiveThief: Model Extraction Using Active Learning and Unannotated Public
Data", AAAI 2020).

The attacker queries a random seed set from its unlabelled pool, trains a substitute, and then, for a number
of iterations, lets the substitute choose the next ``k`` pool samples to query and retrains on everything
answered so far. The budget is ``seed_size + k * iterations``. Selection strategies:

- ``random``: ``k`` unqueried samples uniformly (the baseline);
- ``uncertainty``: the ``k`` samples whose substitute prediction has the highest entropy;
- ``k_center``: greedy farthest-point selection in the substitute's probability space, each pick the sample
  whose nearest already-queried (or already-picked) sample is farthest away (Sener and Savarese's core set).

Each sample is queried at most once; the attack stops early when its pool is exhausted.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from heistlab.api import Oracle
from heistlab.attacks.base import (
    Attack,
    AttackResult,
    Surrogate,
    affordable,
    check_budget,
    check_labels,
    query_in_batches,
    training_targets,
)
from heistlab.attacks.knockoff import squared_distances
from heistlab.training import predict_proba, train_classifier

Selector = Callable[[np.ndarray, np.ndarray, int, np.random.Generator], np.ndarray]


def select_random(candidates: np.ndarray, queried: np.ndarray, count: int, rng: np.random.Generator):
    """``count`` candidate positions drawn uniformly without replacement."""
    return rng.permutation(len(candidates))[:count]


def select_uncertain(candidates: np.ndarray, queried: np.ndarray, count: int, rng: np.random.Generator):
    """The ``count`` candidates whose predicted distribution has the largest entropy."""
    entropy = -np.sum(candidates * np.log(np.clip(candidates, 1e-12, 1.0)), axis=-1)
    return np.argsort(-entropy, kind="stable")[:count]


def select_k_center(candidates: np.ndarray, queried: np.ndarray, count: int, rng: np.random.Generator):
    """Greedy k-center: repeatedly take the candidate farthest from every queried and taken point."""
    nearest = np.min(squared_distances(candidates, queried), axis=1)
    chosen = []
    for _ in range(min(count, len(candidates))):
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, squared_distances(candidates, candidates[pick : pick + 1])[:, 0])
        nearest[pick] = -1.0
    return np.asarray(chosen, np.int64)


STRATEGIES: dict[str, Selector] = {
    "random": select_random,
    "uncertainty": select_uncertain,
    "k_center": select_k_center,
}


def activethief(
    budget: int = 1000,
    seed_size: int = 200,
    per_round: int = 100,
    strategy: str = "k_center",
    labels: str = "soft",
    query_batch: int = 256,
) -> Attack:
    """Builds ActiveThief: ``seed_size`` random queries, then ``per_round`` (the paper's k) chosen ones per
    iteration until ``budget`` is spent (the paper's example: 200 + 100 x 10)."""
    check_budget("activethief", budget)
    for name, value in (("seed_size", seed_size), ("per_round", per_round), ("query_batch", query_batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"activethief: {name} must be an integer >= 1, got {value!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"activethief: strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    check_labels("activethief", labels)
    select = STRATEGIES[strategy]

    def run(oracle: Oracle, pool: np.ndarray, surrogate: Surrogate, key: jax.Array) -> AttackResult:
        sample_key, train_key = jax.random.split(key)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(sample_key)))

        order = rng.permutation(len(pool))
        seed_indices = order[: affordable(oracle, min(seed_size, budget))]
        inputs, answers = query_in_batches(oracle, pool[seed_indices], query_batch)
        if len(inputs) == 0:
            raise RuntimeError("activethief: the API served no seed queries, so there is nothing to train on")
        queried = seed_indices[: len(inputs)]
        targets = training_targets(oracle, answers, labels)
        params = train_classifier(surrogate.model, inputs, targets, train_key, surrogate.train)
        history = [{"round": 0, "queries": len(inputs), "known": len(inputs), "strategy": "random"}]
        while True:
            unqueried = np.setdiff1d(np.arange(len(pool)), queried)
            count = min(affordable(oracle, budget - len(inputs)), per_round, len(unqueried))
            if count == 0:
                break
            candidates = predict_proba(surrogate.model, params, pool[unqueried]).astype(np.float64)
            known = predict_proba(surrogate.model, params, inputs).astype(np.float64)
            picked = unqueried[select(candidates, known, count, rng)]
            new_inputs, new_answers = query_in_batches(oracle, pool[picked], query_batch)
            if len(new_inputs) == 0:
                break
            queried = np.concatenate([queried, picked[: len(new_inputs)]])
            inputs = np.concatenate([inputs, new_inputs])
            targets = np.concatenate([targets, training_targets(oracle, new_answers, labels)])
            round_key = jax.random.fold_in(train_key, len(history))
            params = train_classifier(surrogate.model, inputs, targets, round_key, surrogate.train)
            history.append(
                {
                    "round": len(history),
                    "queries": len(new_inputs),
                    "known": len(inputs),
                    "strategy": strategy,
                }
            )
        return AttackResult(params, len(inputs), tuple(history))

    return Attack("activethief", budget, run)
