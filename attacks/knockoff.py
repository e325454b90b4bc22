"""Knockoff Nets (Orekondy et al., "Knockoff Nets: Stealing Functionality of Black-Box Models", CVPR 2019).

Random strategy (the default): the attacker samples its pool uniformly, queries the victim on each sample,
and trains a knockoff on the answers: the served probability vectors (``labels='soft'``) or their top-1
(``labels='hard'``). When the budget exceeds the pool, the pool is walked again in a new random order, as
sampling from a finite pool does.

Adaptive strategy: a gradient bandit (Sutton and Barto, section 2.8) chooses where in the pool to sample. The
paper's arms are nodes of the pool's label hierarchy; the attacker here does not know the pool's labels, so
the arms are k-means clusters of the pool. Each round draws ``round_size`` arms from the policy
``softmax(H)``, takes an unqueried sample from each, queries the batch and scores every answer with the
paper's rewards, each in [0, 1]: ``certainty`` (margin between the top two answered scores), ``diversity``
(how far the answer exceeds the mean of the recent answers, summed over classes) and ``loss`` (the
knockoff's cross-entropy against the answer, over log C). Preferences move by
``H += step * sum_s (r_s - mean reward) (onehot(a_s) - softmax(H))``, and the knockoff is refit every
``refit_every`` rounds, not once per sample as in the paper; the result is trained afresh on every answer.
Within a round, arms whose samples are all queried are masked out; once the whole pool is queried it is
walked again.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from heistlab.api import Oracle
from heistlab.attacks.base import (
    Attack,
    AttackResult,
    Surrogate,
    TransferSet,
    affordable,
    check_budget,
    check_labels,
    query_in_batches,
    query_then_train,
    training_targets,
)
from heistlab.training import init_params, predict_proba, train_classifier

STRATEGIES = ("random", "adaptive")
REWARDS = ("certainty", "diversity", "loss")


def sample_pool(pool_size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` pool indices: whole random permutations of the pool, the last one cut short."""
    permutations = [rng.permutation(pool_size) for _ in range(-(-count // pool_size))]
    return np.concatenate(permutations)[:count]


def knockoff(
    budget: int = 1000,
    labels: str = "soft",
    query_batch: int = 256,
    strategy: str = "random",
    clusters: int = 20,
    round_size: int = 32,
    refit_every: int = 4,
    bandit_step: float = 0.05,
    rewards: Sequence[str] = REWARDS,
    diversity_window: int = 256,
) -> Attack:
    """Builds Knockoff Nets spending at most ``budget`` queries, by the ``random`` or ``adaptive`` strategy.

    The remaining arguments configure the adaptive strategy only: ``clusters`` (the bandit's arms),
    ``round_size`` (samples drawn and queried per round), ``refit_every`` (rounds between knockoff refits),
    ``bandit_step`` (the gradient bandit's step), ``rewards`` (any of certainty, diversity, loss, summed)
    and ``diversity_window`` (answers averaged by the diversity reward).
    """
    check_budget("knockoff", budget)
    check_labels("knockoff", labels)
    if strategy not in STRATEGIES:
        raise ValueError(f"knockoff: strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    for name, value in (
        ("query_batch", query_batch),
        ("clusters", clusters),
        ("round_size", round_size),
        ("refit_every", refit_every),
        ("diversity_window", diversity_window),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"knockoff: {name} must be an integer >= 1, got {value!r}")
    if not bandit_step > 0:
        raise ValueError(f"knockoff: bandit_step must be > 0, got {bandit_step!r}")
    rewards = tuple(rewards)
    unknown = [name for name in rewards if name not in REWARDS]
    if not rewards or unknown:
        raise ValueError(
            f"knockoff: rewards must be a non-empty subset of {', '.join(REWARDS)}; got {rewards!r}"
        )

    def collect(oracle: Oracle, pool: np.ndarray, surrogate: Surrogate, key: jax.Array) -> TransferSet:
        sample_key, train_key = jax.random.split(key)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(sample_key)))
        chosen = pool[sample_pool(len(pool), affordable(oracle, budget), rng)]
        inputs, answers = query_in_batches(oracle, chosen, query_batch)
        if len(inputs) == 0:
            raise RuntimeError("knockoff: the API served no queries, so there is nothing to train on")
        soft = labels == "soft" and oracle.output != "labels"
        targets = training_targets(oracle, answers, labels)
        return TransferSet(inputs, targets, train_key, ({"round": 0, "queries": len(inputs), "soft": soft},))

    def run_adaptive(oracle: Oracle, pool: np.ndarray, surrogate: Surrogate, key: jax.Array) -> AttackResult:
        sample_key, train_key, init_key = jax.random.split(key, 3)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(sample_key)))
        arms = cluster_pool(pool, clusters, rng)
        unqueried = np.ones(len(pool), bool)
        preferences = np.zeros(arms.max() + 1)
        mean_reward, rewarded = 0.0, 0
        params = init_params(surrogate.model, tuple(oracle.input_shape), init_key)
        inputs, targets, history = [], [], []
        while (count := affordable(oracle, budget - sum(map(len, inputs)))) > 0:
            if not unqueried.any():
                unqueried[:] = True
            picks, picked_arms = draw_from_arms(preferences, arms, unqueried, min(count, round_size), rng)
            served, answers = query_in_batches(oracle, pool[picks], query_batch)
            if len(served) == 0:
                break
            unqueried[picks[: len(served)]] = False
            new_targets = training_targets(oracle, answers, labels)
            recent = np.concatenate([*targets, new_targets])[-diversity_window:]
            predicted = predict_proba(surrogate.model, params, served)
            reward = sum(REWARD_FUNCTIONS[name](new_targets, recent, predicted) for name in rewards)
            preferences, policy = bandit_update(
                preferences, picked_arms[: len(served)], reward, mean_reward, bandit_step
            )
            mean_reward = (mean_reward * rewarded + reward.sum()) / (rewarded + len(reward))
            rewarded += len(reward)
            inputs.append(served)
            targets.append(new_targets)
            if len(inputs) % refit_every == 0:
                params = train_classifier(
                    surrogate.model,
                    np.concatenate(inputs),
                    np.concatenate(targets),
                    jax.random.fold_in(train_key, len(inputs)),
                    surrogate.train,
                    params=params,
                )
            history.append(
                {
                    "round": len(history),
                    "queries": len(served),
                    "mean_reward": float(reward.mean()),
                    "policy_entropy": float(-(policy * np.log(policy + 1e-12)).sum()),
                }
            )
        if not inputs:
            raise RuntimeError("knockoff: the API served no queries, so there is nothing to train on")
        all_inputs, all_targets = np.concatenate(inputs), np.concatenate(targets)
        params = train_classifier(surrogate.model, all_inputs, all_targets, train_key, surrogate.train)
        return AttackResult(params, len(all_inputs), tuple(history))

    if strategy == "random":
        return query_then_train("knockoff", budget, collect)
    return Attack("knockoff", budget, run_adaptive)


def cluster_pool(
    pool: np.ndarray, clusters: int, rng: np.random.Generator, iterations: int = 50
) -> np.ndarray:
    """Each pool sample's k-means cluster (the bandit's arm): k-means++ seeding, then Lloyd's iterations."""
    flat = pool.reshape(len(pool), -1).astype(np.float64)
    centres = flat[[int(rng.integers(len(flat)))]]
    for _ in range(min(clusters, len(flat)) - 1):
        nearest = squared_distances(flat, centres).min(axis=1)
        if nearest.sum() == 0:
            break
        centres = np.concatenate([centres, flat[[int(rng.choice(len(flat), p=nearest / nearest.sum()))]]])
    assignment = squared_distances(flat, centres).argmin(axis=1)
    for _ in range(iterations):
        sums = np.zeros_like(centres)
        np.add.at(sums, assignment, flat)
        sizes = np.bincount(assignment, minlength=len(centres))[:, None]
        centres = np.where(sizes > 0, sums / np.maximum(sizes, 1), centres)
        updated = squared_distances(flat, centres).argmin(axis=1)
        if np.array_equal(updated, assignment):
            break
        assignment = updated
    return np.unique(assignment, return_inverse=True)[1].astype(np.int64)


def squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    squared = (points**2).sum(1)[:, None] + (centres**2).sum(1)[None, :] - 2.0 * points @ centres.T
    return np.maximum(squared, 0.0)


def draw_from_arms(
    preferences: np.ndarray, arms: np.ndarray, available: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct available pool indices, each from an arm drawn from ``softmax(preferences)``.

    An arm with no available sample left is masked out of the policy for the rest of the round.
    """
    available = available.copy()
    left = np.bincount(arms[available], minlength=len(preferences))
    picks, picked_arms = [], []
    for _ in range(min(count, int(available.sum()))):
        policy = masked_softmax(preferences, left > 0)
        arm = int(rng.choice(len(policy), p=policy))
        index = int(rng.choice(np.flatnonzero(available & (arms == arm))))
        available[index] = False
        left[arm] -= 1
        picks.append(index)
        picked_arms.append(arm)
    return np.asarray(picks, np.int64), np.asarray(picked_arms, np.int64)


def masked_softmax(preferences: np.ndarray, mask: np.ndarray) -> np.ndarray:
    shifted = np.where(mask, preferences - preferences[mask].max(), -np.inf)
    weights = np.exp(shifted)
    return weights / weights.sum()


def bandit_update(
    preferences: np.ndarray, arms: np.ndarray, reward: np.ndarray, baseline: float, step: float
) -> tuple[np.ndarray, np.ndarray]:
    """One batched gradient-bandit step; returns the new preferences and the policy they were taken under.

    Each sample ``s`` pulls arm ``a_s`` and adds ``step * (r_s - baseline) * (onehot(a_s) - policy)``.
    """
    policy = masked_softmax(preferences, np.ones(len(preferences), bool))
    advantage = reward - baseline
    pulled = np.bincount(arms, weights=advantage, minlength=len(preferences))
    return preferences + step * (pulled - advantage.sum() * policy), policy


def certainty_reward(answers: np.ndarray, recent: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Margin between the top two answered scores (1 for a one-hot answer)."""
    top_two = np.sort(answers, axis=-1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


def diversity_reward(answers: np.ndarray, recent: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """How far each answer exceeds the mean of the recent answers, summed over classes."""
    return np.maximum(answers - recent.mean(axis=0), 0.0).sum(axis=-1)


def loss_reward(answers: np.ndarray, recent: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The knockoff's cross-entropy against each answer, over log C (a uniform guess's loss), capped at 1."""
    loss = -(answers * np.log(np.clip(predicted, 1e-12, 1.0))).sum(axis=-1)
    return np.minimum(loss / np.log(answers.shape[-1]), 1.0)


REWARD_FUNCTIONS = {"certainty": certainty_reward, "diversity": diversity_reward, "loss": loss_reward}
