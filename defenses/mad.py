"""Prediction Poisoning: maximising the angular deviation of the attacker's gradient (Orekondy, Schiele and
Fritz, "Prediction Poisoning: Towards Defenses Against DNN Model Stealing Attacks", ICLR 2020).

An attacker who trains a model ``F(x; w)`` on the served answer ``y'`` follows the gradient ``G^T y'``, with
``G = d/dw (-log F(x; w))`` the ``(classes, parameters)`` Jacobian of the per-class negative log-likelihood.
MAD serves the ``y'`` within an L1 ball of radius ``epsilon`` around the victim's ``y`` that turns that
gradient away from ``G^T y`` as far as it can. The defender does not know ``w``; it uses a proxy model instead
(a randomly initialised one suffices, the paper finds) and, as the authors' code does, only the proxy's last
layer. The heuristic solver has two steps:

1. an oracle picks a target ``y*`` on the simplex: the "extreme" oracle the one-hot ``y_k`` maximising
   ``||G^T (y_k - y)||^2``; the argmax-preserving oracle the uniform distribution over a set of classes
   holding ``argmax y`` (that class nudged up by ``1e-5`` so it stays the argmax), maximising the same;
2. a line search mixes toward it: ``y' = (1 - alpha) y + alpha y*`` with ``alpha = min(1, epsilon /
   ||y* - y||_1)``, so ``||y' - y||_1 <= epsilon`` and ``y'`` stays on the simplex.

A fact of the last-layer Jacobian worth knowing: with ``h`` the proxy's penultimate features and ``p`` its
probabilities, ``G^T v = -(v - p * sum(v)) (x) (h, 1)``, so for two distributions
``||G^T (y_a - y_b)||^2 = ||y_a - y_b||_2^2 (||h||^2 + 1)``. Under the (default) ``distance`` objective the
proxy only scales every candidate alike and the extreme oracle picks the least likely class; under the
``angular`` objective (the authors' ``objmax`` option) ``G^T y = -(y - p) (x) (h, 1)`` and the proxy's
probabilities ``p`` steer the choice.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from heistlab.defenses.base import DefenderData, Defense, QueryContext, stateless

OBJECTIVES = ("distance", "angular")
ARGMAX_MARGIN = 1e-5
# Objective values this close (relative) to the best count as ties, resolved toward the lowest index, so that
# rounding (jit versus eager, one batch size versus another) cannot flip a choice between equal candidates.
TIE_TOLERANCE = 1e-5
# Up to this many classes the argmax-preserving oracle tries every class set (2 ** classes candidates), as the
# authors' code does; beyond it, it grows the set greedily one class at a time.
EXHAUSTIVE_MAX_CLASSES = 10
# Mixed into the seed so the proxy's draws never coincide with another stream seeded by the victim's seed.
PROXY_STREAM = 0x4D4144

# The proxy MLP's layers, first to last: (kernel (fan_in, fan_out), bias (fan_out,)) as float32 arrays.
ProxyLayers = tuple[tuple[np.ndarray, np.ndarray], ...]


def mad(
    epsilon: float = 1.0,
    defender: DefenderData | None = None,
    preserve_argmax: bool = False,
    objective: str = "distance",
    proxy_hidden: Sequence[int] = (256, 256),
) -> Defense:
    """Serves the answer within L1 distance ``epsilon`` of the victim's that most deflects a proxy's gradient.

    Args:
      epsilon: radius of the L1 ball around each answer (the L1 diameter of the simplex is 2, so values from 2
        on serve the oracle's target itself).
      defender: the defender's data; its input shape, class count and seed build the proxy. Without it the
        proxy is built for the shapes of the batches it sees, from seed 0.
      preserve_argmax: use the argmax-preserving oracle, so every answer keeps the victim's top-1 class.
      objective: ``distance`` ranks candidates by ``||G^T (y* - y)||^2`` (the paper's extreme oracle),
        ``angular`` by the angle between ``G^T y*`` and ``G^T y`` itself.
      proxy_hidden: hidden widths of the randomly initialised MLP proxy.

    Raises:
      ValueError: naming the argument, if ``epsilon`` is not a finite number >= 0, ``objective`` is not one of
        ``OBJECTIVES``, ``proxy_hidden`` is not a sequence of ints >= 1, ``preserve_argmax`` is not a bool or
        ``defender`` is neither None nor a ``DefenderData``.
    """
    name = "mad_argmax" if preserve_argmax is True else "mad"
    if not (_is_finite_number(epsilon) and epsilon >= 0):
        raise ValueError(f"{name}: epsilon must be a finite number >= 0, got {epsilon!r}")
    if not isinstance(preserve_argmax, bool):
        raise ValueError(f"{name}: preserve_argmax must be a bool, got {preserve_argmax!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"{name}: objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    hidden = tuple(proxy_hidden) if isinstance(proxy_hidden, Sequence) else None
    if not hidden or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in hidden):
        raise ValueError(f"{name}: proxy_hidden must be a non-empty list of ints >= 1, got {proxy_hidden!r}")
    if defender is not None and not isinstance(defender, DefenderData):
        raise ValueError(f"{name}: defender must be a DefenderData or None, got {type(defender).__name__}")
    seed = 0 if defender is None else int(defender.seed)
    oracle = argmax_preserving_target if preserve_argmax else extreme_target
    score = OBJECTIVE_FUNCTIONS[objective]

    def transform(probs: jax.Array, context: QueryContext) -> jax.Array:
        input_shape, classes = tuple(context.inputs.shape[1:]), probs.shape[-1]
        if defender is not None and (input_shape, classes) != (
            tuple(defender.input_shape),
            defender.num_classes,
        ):
            raise ValueError(
                f"{name}: the proxy was built for inputs {tuple(defender.input_shape)} and "
                f"{defender.num_classes} classes, got inputs {input_shape} and {classes} classes"
            )
        proxy = random_proxy(math.prod(input_shape), classes, hidden, seed)
        if preserve_argmax and classes <= EXHAUSTIVE_MAX_CLASSES:
            target = best_class_set_target(probs, *last_layer_factors(proxy, context.inputs), objective)
        else:
            target = oracle(probs, last_layer_gram(proxy, context.inputs), score)
        return mix_within_l1_ball(probs, target, epsilon).astype(probs.dtype)

    return stateless(transform)


def mad_argmax(
    epsilon: float = 1.0,
    defender: DefenderData | None = None,
    objective: str = "distance",
    proxy_hidden: Sequence[int] = (256, 256),
) -> Defense:
    """MAD with the argmax-preserving oracle: ``mad(..., preserve_argmax=True)``; top-1 answers stay exact."""
    return mad(epsilon, defender, True, objective, proxy_hidden)


@functools.lru_cache(maxsize=16)
def random_proxy(input_size: int, classes: int, hidden: tuple[int, ...], seed: int) -> ProxyLayers:
    """A randomly initialised ReLU MLP ``input_size -> hidden -> classes`` as Flax initialises ``Dense``
    layers (LeCun-normal kernels, here untruncated, zero biases), drawn with NumPy from ``seed``: plain
    arrays, so that building it inside a jit trace compiles nothing."""
    rng = np.random.default_rng([seed % 2**64, PROXY_STREAM])
    widths = (input_size, *hidden, classes)
    return tuple(
        (
            (rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)).astype(np.float32),
            np.zeros(fan_out, np.float32),
        )
        for fan_in, fan_out in itertools.pairwise(widths)
    )


def last_layer_gram(proxy: ProxyLayers, inputs: jax.Array) -> jax.Array:
    """``G G^T`` per input, ``(batch, classes, classes)``, where row ``k`` of ``G`` is the gradient of the MLP
    proxy's negative log-likelihood of class ``k`` with respect to its last layer (kernel and bias; the
    authors' code takes the kernel alone, which scales every objective by ``||h||^2 / (||h||^2 + 1)`` and
    leaves ``G = 0`` where the features ``h`` vanish). That gradient is ``-(e_k - p) (x) (h, 1)``, so
    ``(G G^T)_kj = (||h||^2 + 1) (delta_kj - p_k - p_j + ||p||^2)`` with ``p`` the proxy's probabilities."""
    features, probs = proxy_features_and_probs(proxy, inputs)
    scale = (jnp.sum(features**2, axis=-1) + 1.0)[:, None, None]
    identity = jnp.eye(probs.shape[-1], dtype=probs.dtype)
    spread = jnp.sum(probs**2, axis=-1)[:, None, None]
    return scale * (identity - probs[:, :, None] - probs[:, None, :] + spread)


def last_layer_factors(proxy: ProxyLayers, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(||h||^2 + 1, p)`` per input: ``G G^T`` of ``last_layer_gram`` is ``scale (I - p 1^T - 1 p^T +
    ||p||^2 1 1^T)``, so ``u^T G G^T v`` needs only dot products of ``u`` and ``v`` with ``p`` and ``1``."""
    features, probs = proxy_features_and_probs(proxy, inputs)
    return jnp.sum(features**2, axis=-1) + 1.0, probs


def best_class_set_target(
    probs: jax.Array, scale: jax.Array, proxy_probs: jax.Array, objective: str
) -> jax.Array:
    """``argmax_preserving_target`` over every class set, for the last-layer ``G G^T`` given by its factors.

    A set with or without the top class gives the same candidate, ``c = w / sum(w)`` with ``w`` 1 on the
    set's other classes and ``1 + ARGMAX_MARGIN`` on the top class, so only the ``2 ** (classes - 1)`` sets
    of the other classes are scored, in the order of their lowest-indexed equivalents among all sets (ties
    resolve as there). Each candidate's objective is computed from the dot products ``w . v`` (one
    ``(batch, classes - 1) x (classes - 1, sets)`` product per vector ``v``) instead of ``c^T G G^T c`` over
    ``(batch, sets, classes, classes)``: the same value up to float rounding, about ``classes`` times less
    work, and no ``(batch, sets, classes)`` candidate array. Near-ties resolve as ``first_near_max`` does.
    """
    classes = probs.shape[-1]
    masks = jnp.asarray(every_class_set(classes - 1), probs.dtype)  # sets of the other classes
    top_class = jnp.argmax(probs, axis=-1)
    top = jax.nn.one_hot(top_class, classes, dtype=probs.dtype)
    positions = jnp.arange(classes - 1)
    others = positions + (positions >= top_class[:, None])  # (batch, classes - 1): all but the top class
    total = jnp.sum(masks, axis=-1)[None] + 1.0 + ARGMAX_MARGIN

    def candidates_dot(vectors):  # (batch, sets): c . v for every candidate c
        at_top = jnp.take_along_axis(vectors, top_class[:, None], axis=-1)
        rest = jnp.take_along_axis(vectors, others, axis=-1)
        return (rest @ masks.T + (1.0 + ARGMAX_MARGIN) * at_top) / total

    def gram_form(u_dot_v, p_dot_u, sum_u, p_dot_v, sum_v):  # u^T G G^T v
        spread = jnp.sum(proxy_probs**2, axis=-1, keepdims=True)
        return scale[:, None] * (u_dot_v - p_dot_u * sum_v - sum_u * p_dot_v + spread * sum_u * sum_v)

    own_squares = (total - ARGMAX_MARGIN - 1.0 + (1.0 + ARGMAX_MARGIN) ** 2) / total**2
    proxy_dot = candidates_dot(proxy_probs)
    probs_sum = jnp.sum(probs, axis=-1, keepdims=True)
    probs_proxy = jnp.sum(probs * proxy_probs, axis=-1, keepdims=True)
    cross = gram_form(candidates_dot(probs), proxy_dot, 1.0, probs_proxy, probs_sum)
    own = gram_form(own_squares, proxy_dot, 1.0, proxy_dot, 1.0)
    probs_square = jnp.sum(probs**2, axis=-1, keepdims=True)
    reference = gram_form(probs_square, probs_proxy, probs_sum, probs_proxy, probs_sum)
    if objective == "distance":
        values = own - 2.0 * cross + reference
    else:
        tiny = jnp.finfo(probs.dtype).tiny
        values = 2.0 - 2.0 * cross / jnp.sqrt(jnp.maximum(own * reference, tiny))
    chosen = masks[first_near_max(values)]
    rows = jnp.arange(probs.shape[0])[:, None]
    chosen = jnp.zeros_like(probs).at[rows, others].set(chosen)
    return _candidates(jnp.maximum(chosen, top)[:, None, :], top)[:, 0]


def proxy_features_and_probs(proxy: ProxyLayers, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The proxy's penultimate features ``h`` (after the last ReLU) and its probabilities."""
    features = inputs.reshape(inputs.shape[0], -1)
    for kernel, bias in proxy[:-1]:
        features = jax.nn.relu(features @ kernel + bias)
    kernel, bias = proxy[-1]
    return features, jax.nn.softmax(features @ kernel + bias)


def distance_objective(candidates: jax.Array, probs: jax.Array, gram: jax.Array) -> jax.Array:
    """``||G^T (c - y)||^2`` for candidates ``(batch, n, classes)``, answers ``(batch, classes)``."""
    delta = candidates - probs[:, None, :]
    return jnp.einsum("bnk,bkj,bnj->bn", delta, gram, delta)


def angular_objective(candidates: jax.Array, probs: jax.Array, gram: jax.Array) -> jax.Array:
    """``||G^T c / |G^T c| - G^T y / |G^T y|||^2 = 2 - 2 cos(angle)``, computed through ``G G^T``."""
    cross = jnp.einsum("bnk,bkj,bj->bn", candidates, gram, probs)
    own = jnp.einsum("bnk,bkj,bnj->bn", candidates, gram, candidates)
    reference = jnp.einsum("bk,bkj,bj->b", probs, gram, probs)[:, None]
    tiny = jnp.finfo(gram.dtype).tiny
    return 2.0 - 2.0 * cross / jnp.sqrt(jnp.maximum(own * reference, tiny))


OBJECTIVE_FUNCTIONS = {"distance": distance_objective, "angular": angular_objective}


def extreme_target(probs: jax.Array, gram: jax.Array, objective) -> jax.Array:
    """The one-hot vertex of the simplex that maximises ``objective`` (ties: the lowest class)."""
    classes = probs.shape[-1]
    vertices = jnp.broadcast_to(jnp.eye(classes, dtype=probs.dtype), (probs.shape[0], classes, classes))
    best = first_near_max(objective(vertices, probs, gram))
    return jax.nn.one_hot(best, classes, dtype=probs.dtype)


def argmax_preserving_target(probs: jax.Array, gram: jax.Array, objective) -> jax.Array:
    """The uniform distribution over a class set holding ``argmax y`` (nudged up by ``ARGMAX_MARGIN``) that
    maximises ``objective``: every such set when there are at most ``EXHAUSTIVE_MAX_CLASSES`` classes,
    else the sets a greedy search grows one class at a time (the authors' heuristic for many classes)."""
    classes = probs.shape[-1]
    top = jax.nn.one_hot(jnp.argmax(probs, axis=-1), classes, dtype=probs.dtype)
    if classes <= EXHAUSTIVE_MAX_CLASSES:
        masks = jnp.asarray(every_class_set(classes), probs.dtype)
        candidates = _candidates(jnp.maximum(masks[None], top[:, None]), top)
        best = first_near_max(objective(candidates, probs, gram))
        return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0]
    return _greedy_argmax_preserving_target(probs, gram, objective, top)


def first_near_max(values: jax.Array) -> jax.Array:
    """Per row, the first index whose value is within ``TIE_TOLERANCE`` (relative) of the row's maximum."""
    best = jnp.max(values, axis=-1, keepdims=True)
    return jnp.argmax(values >= best - TIE_TOLERANCE * jnp.abs(best), axis=-1)


def _candidates(masks: jax.Array, top: jax.Array) -> jax.Array:
    """Class-set masks ``(batch, n, classes)`` as distributions, the top class nudged up."""
    weights = masks + ARGMAX_MARGIN * top[:, None, :]
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def _greedy_argmax_preserving_target(probs, gram, objective, top):
    classes = probs.shape[-1]
    single = jnp.eye(classes, dtype=probs.dtype)

    def grow(_, carry):
        chosen, best_target, best_value = carry
        masks = jnp.maximum(chosen[:, None, :], single[None])
        values = objective(_candidates(masks, top), probs, gram)
        values = jnp.where(chosen > 0, -jnp.inf, values)
        pick = first_near_max(values)
        value = jnp.take_along_axis(values, pick[:, None], axis=1)[:, 0]
        chosen = jnp.maximum(chosen, jax.nn.one_hot(pick, classes, dtype=probs.dtype))
        target = _candidates(chosen[:, None, :], top)[:, 0]
        better = value > best_value
        return chosen, jnp.where(better[:, None], target, best_target), jnp.where(better, value, best_value)

    start = _candidates(top[:, None, :], top)
    carry = (top, start[:, 0], objective(start, probs, gram)[:, 0])
    return jax.lax.fori_loop(0, classes - 1, grow, carry)[1]


@functools.lru_cache(maxsize=8)
def every_class_set(classes: int) -> np.ndarray:
    """All ``2 ** classes`` subsets of the classes as 0/1 rows."""
    codes = np.arange(2**classes)[:, None]
    return ((codes >> np.arange(classes)) & 1).astype(np.float32)


def mix_within_l1_ball(probs: jax.Array, target: jax.Array, epsilon: float) -> jax.Array:
    """``(1 - alpha) y + alpha y*`` with the largest ``alpha <= 1`` keeping ``||y' - y||_1 <= epsilon``."""
    distance = jnp.sum(jnp.abs(target - probs), axis=-1, keepdims=True)
    alpha = jnp.where(distance > 0, jnp.minimum(1.0, epsilon / jnp.where(distance > 0, distance, 1.0)), 0.0)
    return (1.0 - alpha) * probs + alpha * target


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
