"""CloudLeak (Yu, Yang, Zhang, Sun and Shi, "CloudLeak: Large-Scale Deep Learning Models Stealing Through
Adversarial Examples", NDSS 2020).

The attacker queries adversarial examples that lie near the decision boundary of its current substitute,
where one answer says more about the boundary than a random natural sample does. They are made by
FeatureFool: a pool input ``x_s`` is perturbed into ``x'`` whose representation in the substitute's internal
layer ``phi`` (the input of its last dense layer) moves towards a guide of another class ``t`` and away from
its own, by the paper's triplet (margin) loss::

    loss(x') = max(D(phi(x'), phi_t) - D(phi(x'), phi(x_s)) + M, 0),    D: Euclidean distance

Rounds: a seed set of ``seed_size`` random pool samples is queried and the substitute trained on the
answers; then each round crafts ``per_round`` FeatureFool queries from pool samples not yet used as sources,
queries them, and retrains the substitute on everything answered so far. The budget is spent exactly:
``seed_size`` natural queries, then rounds of at most ``per_round`` until ``budget`` (or the API's cap).

Differences from the paper:
- the paper minimises ``d(x', x_s) + alpha * loss`` with box-constrained L-BFGS; here the distance term is a
  hard budget instead: ``steps`` projected-gradient steps on ``loss`` inside an L-inf (signed steps) or L2
  ball of radius ``epsilon`` around ``x_s``, clipped to ``[0, 1]``;
- the target class ``t`` is the substitute's runner-up class for ``x_s`` (the nearest boundary), and the guide
  ``phi_t`` the mean representation of the answered queries whose top-1 answer is ``t`` (the paper picks a
  guide image); a source whose runner-up has no answered query yet takes the likeliest class that has one;
- ``M`` is relative: ``margin * D(phi(x_s), phi_t)``, since the substitute's feature scale changes as it
  retrains;
- the paper starts from a substitute pretrained on other data (transfer learning); here the seed set trains
  it from scratch.
"""

from __future__ import annotations

import functools
import math

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
    check_labels,
    hard_targets,
    query_in_batches,
    training_targets,
)
from heistlab.attacks.knockoff import sample_pool
from heistlab.training import predict_proba, train_classifier

NORMS = ("linf", "l2")
DISTANCE_FLOOR = 1e-12


def cloudleak(
    budget: int = 1000,
    seed_size: int = 100,
    per_round: int = 150,
    epsilon: float = 0.15,
    norm: str = "linf",
    steps: int = 10,
    margin: float = 0.5,
    labels: str = "soft",
    query_batch: int = 256,
) -> Attack:
    """Builds CloudLeak spending ``seed_size`` natural queries, then FeatureFool rounds of ``per_round``.

    Args:
      budget: the queries to spend in all; must exceed ``seed_size`` (the first round's minimum).
      seed_size: random pool samples queried first to train the first substitute.
      per_round: FeatureFool queries crafted, answered and learned from per round.
      epsilon: the perturbation budget around each source, in the ``norm`` (inputs are in [0, 1]).
      norm: ``linf`` or ``l2``.
      steps: projected-gradient steps per FeatureFool batch (step size ``2.5 * epsilon / steps``).
      margin: the triplet margin, relative to the source's distance from its guide.
      labels: ``soft`` (train on served scores) or ``hard`` (on their top-1).
      query_batch: rows per API call.

    Raises:
      ValueError: naming the argument and what is accepted.
    """
    check_budget("cloudleak", budget)
    check_labels("cloudleak", labels)
    for name, value in (("seed_size", seed_size), ("per_round", per_round), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"cloudleak: {name} must be an integer >= 1, got {value!r}")
    if isinstance(query_batch, bool) or not isinstance(query_batch, int) or query_batch < 1:
        raise ValueError(f"cloudleak: query_batch must be an integer >= 1, got {query_batch!r}")
    if budget <= seed_size:
        raise ValueError(
            f"cloudleak: budget={budget} leaves no FeatureFool queries after seed_size={seed_size}; "
            "accepted: a budget above seed_size, or a smaller seed_size"
        )
    if norm not in NORMS:
        raise ValueError(f"cloudleak: norm must be one of {', '.join(NORMS)}; got {norm!r}")
    if not (_is_finite_number(epsilon) and epsilon > 0):
        raise ValueError(f"cloudleak: epsilon must be a finite number > 0, got {epsilon!r}")
    if not (_is_finite_number(margin) and margin >= 0):
        raise ValueError(f"cloudleak: margin must be a finite number >= 0, got {margin!r}")

    def run(oracle: Oracle, pool: np.ndarray, surrogate: Surrogate, key: jax.Array) -> AttackResult:
        sample_key, train_key = jax.random.split(key)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(sample_key)))
        order = sample_pool(len(pool), len(pool) + budget, rng)
        seeds = pool[order[: affordable(oracle, seed_size)]]
        inputs, answers = query_in_batches(oracle, seeds, query_batch)
        if len(inputs) == 0:
            raise RuntimeError("cloudleak: the API served no queries, so there is nothing to train on")
        targets = training_targets(oracle, answers, labels)
        top1 = hard_targets(oracle, answers).argmax(axis=-1)
        params = train_classifier(surrogate.model, inputs, targets, train_key, surrogate.train)
        history = [{"round": 0, "queries": len(inputs), "natural": True}]
        next_source = len(seeds)
        while (count := affordable(oracle, min(per_round, budget - len(inputs)))) > 0:
            sources = pool[order[next_source : next_source + count]]
            next_source += count
            crafted = feature_fool(
                surrogate.model, params, sources, inputs, top1, epsilon, norm, steps, margin
            )
            served, new_answers = query_in_batches(oracle, crafted, query_batch)
            if len(served) == 0:
                break
            history.append(round_record(len(history), surrogate.model, params, sources, served))
            inputs = np.concatenate([inputs, served])
            targets = np.concatenate([targets, training_targets(oracle, new_answers, labels)])
            top1 = np.concatenate([top1, hard_targets(oracle, new_answers).argmax(axis=-1)])
            params = train_classifier(
                surrogate.model, inputs, targets, jax.random.fold_in(train_key, len(history)), surrogate.train
            )
        return AttackResult(params, len(inputs), tuple(history))

    return Attack("cloudleak", budget, run)


def round_record(index: int, model: nn.Module, params, sources: np.ndarray, crafted: np.ndarray) -> dict:
    """One round's queries and the substitute's mean margin on the sources and on what was queried."""
    return {
        "round": index,
        "queries": len(crafted),
        "natural": False,
        "source_margin": float(margins(predict_proba(model, params, sources[: len(crafted)])).mean()),
        "query_margin": float(margins(predict_proba(model, params, crafted)).mean()),
    }


def margins(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row: the distance from the decision boundary in output space."""
    top_two = np.sort(probs, axis=-1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


def representation(model: nn.Module, params, inputs: jax.Array) -> jax.Array:
    """``phi``: the input of the model's last dense layer (its penultimate dense layer's pre-activation),
    or the logits for a model with fewer than two dense layers."""
    logits, state = model.apply(
        params, inputs, capture_intermediates=lambda module, _: isinstance(module, nn.Dense)
    )
    dense = state["intermediates"]
    names = sorted(dense, key=lambda name: int(name.rpartition("_")[2] or 0))
    if len(names) < 2:
        return logits
    return dense[names[-2]]["__call__"][0]


def guide_features(
    model: nn.Module, params, answered: np.ndarray, top1: np.ndarray, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each class's mean representation over the answered queries whose top-1 answer is that class, and
    which classes have any."""
    features = np.asarray(representation(model, params, jnp.asarray(answered)))
    present = np.bincount(top1, minlength=classes) > 0
    sums = np.zeros((classes, features.shape[-1]), np.float32)
    np.add.at(sums, top1, features)
    return sums / np.maximum(np.bincount(top1, minlength=classes), 1)[:, None], present


def target_classes(probs: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per source, the likeliest class other than its top-1 among the classes that have a guide."""
    ranked = np.where(present[None], probs, -1.0)
    ranked[np.arange(len(probs)), probs.argmax(axis=-1)] = -2.0
    return ranked.argmax(axis=-1)


def feature_fool(
    model: nn.Module,
    params,
    sources: np.ndarray,
    answered: np.ndarray,
    top1: np.ndarray,
    epsilon: float,
    norm: str,
    steps: int,
    margin: float,
) -> np.ndarray:
    """FeatureFool queries from ``sources``: each moved, within ``epsilon`` in ``norm`` and inside [0, 1],
    towards the guide representation of its runner-up class (see the module docstring)."""
    probs = predict_proba(model, params, sources)
    classes = probs.shape[-1]
    guides, present = guide_features(model, params, answered, top1, classes)
    targets = target_classes(probs, present)
    program = _feature_fool_program(model, norm, steps)
    return np.asarray(
        program(params, jnp.asarray(sources), jnp.asarray(guides[targets]), epsilon, margin),
        np.float32,
    )


@functools.lru_cache(maxsize=16)
def _feature_fool_program(model: nn.Module, norm: str, steps: int):
    def triplet(params, crafted, source_features, guide, margin):
        features = representation(model, params, crafted)
        to_guide = _distance(features, guide)
        to_source = _distance(features, source_features)
        return jnp.maximum(to_guide - to_source + margin, 0.0).sum()

    def project(crafted, sources, epsilon):
        delta = crafted - sources
        if norm == "linf":
            delta = jnp.clip(delta, -epsilon, epsilon)
        else:
            length = jnp.sqrt(jnp.sum(delta**2, axis=tuple(range(1, delta.ndim)), keepdims=True))
            delta = delta * jnp.minimum(1.0, epsilon / jnp.maximum(length, DISTANCE_FLOOR))
        return jnp.clip(sources + delta, 0.0, 1.0)

    def ascend(gradient, epsilon):
        size = 2.5 * epsilon / steps
        if norm == "linf":
            return size * jnp.sign(gradient)
        length = jnp.sqrt(jnp.sum(gradient**2, axis=tuple(range(1, gradient.ndim)), keepdims=True))
        return size * gradient / jnp.maximum(length, DISTANCE_FLOOR)

    @jax.jit
    def program(params, sources, guides, epsilon, relative_margin):
        source_features = representation(model, params, sources)
        margin = relative_margin * _distance(source_features, guides)
        gradient_of = jax.grad(triplet, argnums=1)

        def step(_, crafted):
            gradient = gradient_of(params, crafted, source_features, guides, margin)
            return project(crafted - ascend(gradient, epsilon), sources, epsilon)

        return jax.lax.fori_loop(0, steps, step, sources)

    return program


def _distance(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(jnp.sum((a - b) ** 2, axis=-1), DISTANCE_FLOOR))


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
