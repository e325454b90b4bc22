"""Knockoff Nets, random strategy (Orekondy et al., "Knockoff Nets: Stealing Functionality of Black-Box
Models", CVPR 2019).

The attacker samples its pool uniformly, queries the victim on each sample, and trains a knockoff on the
answers: the served probability vectors (``labels='soft'``) or their top-1 (``labels='hard'``). When the
budget exceeds the pool, the pool is walked again in a new random order, as sampling from a finite pool does.
"""

from __future__ import annotations

import jax
import numpy as np

from attacks.base import (
    Attack,
    AttackResult,
    Surrogate,
    affordable,
    check_budget,
    hard_targets,
    query_in_batches,
)
from heistlab.api import Oracle
from heistlab.training import train_classifier

LABEL_KINDS = ("soft", "hard")


def sample_pool(pool_size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` pool indices: whole random permutations of the pool, the last one cut short."""
    permutations = [rng.permutation(pool_size) for _ in range(-(-count // pool_size))]
    return np.concatenate(permutations)[:count]


def knockoff(budget: int = 1000, labels: str = "soft", query_batch: int = 256) -> Attack:
    """Builds the random-strategy Knockoff Nets attack spending at most ``budget`` queries."""
    check_budget("knockoff", budget)
    if labels not in LABEL_KINDS:
        raise ValueError(f"knockoff: labels must be one of {', '.join(LABEL_KINDS)}; got {labels!r}")

    def run(oracle: Oracle, pool: np.ndarray, surrogate: Surrogate, key: jax.Array) -> AttackResult:
        sample_key, train_key = jax.random.split(key)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(sample_key)))
        chosen = pool[sample_pool(len(pool), affordable(oracle, budget), rng)]
        inputs, answers = query_in_batches(oracle, chosen, query_batch)
        if len(inputs) == 0:
            raise RuntimeError("knockoff: the API served no queries, so there is nothing to train on")
        soft = labels == "soft" and oracle.output != "labels"
        targets = oracle.targets(answers) if soft else hard_targets(oracle, answers)
        params = train_classifier(surrogate.model, inputs, targets, train_key, surrogate.train)
        return AttackResult(params, len(inputs), ({"round": 0, "queries": len(inputs), "soft": soft},))

    return Attack("knockoff", budget, run)
