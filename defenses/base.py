"""The defense interface: a pair of pure functions over a small pytree state.

Modelled on optax's ``GradientTransformation``. A defense is built by a factory (``rounding(decimals=2)``),
starts from ``init()`` and transforms a batch of probabilities with ``apply``::

    served, state = defense.apply(probs, state, context)

``probs`` is a ``(batch, classes)`` float array on the probability simplex and so is ``served``: every defense
takes and returns probabilities, never logits. ``context`` carries what else a prediction API knows about the
query (the inputs and a PRNG key), so that stateful and input-dependent defenses share the same signature.
``apply`` must be a pure function of its arguments, so that it can be jitted and replayed for a fixed key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

State = Any


class QueryContext(NamedTuple):
    """What the prediction API passes to a defense besides the probabilities.

    inputs: the query batch as the client sent it, shape ``(batch, *input_shape)``, values in ``[0, 1]``.
    key: a PRNG key for this batch; a defense that needs randomness draws it from here and nowhere else.
    """

    inputs: jax.Array
    key: jax.Array


class Defense(NamedTuple):
    """A defense: ``init() -> state`` and ``apply(probs, state, context) -> (probs, state)``."""

    init: Callable[[], State]
    apply: Callable[[jax.Array, State, QueryContext], tuple[jax.Array, State]]


class EmptyState(NamedTuple):
    """State of a stateless defense."""


def stateless(transform: Callable[[jax.Array, QueryContext], jax.Array]) -> Defense:
    """Wraps a pure ``transform(probs, context) -> probs`` as a defense with no state."""

    def apply(probs, state, context):
        return transform(probs, context), state

    return Defense(init=EmptyState, apply=apply)


def identity() -> Defense:
    """The undefended baseline: serves the victim's probabilities unchanged."""
    return stateless(lambda probs, context: probs)


def chain(*defenses: Defense) -> Defense:
    """Applies ``defenses`` in order; the state is the tuple of their states.

    Each defense gets its own key, derived from the batch key and its position in the chain, so adding a
    defense never changes the randomness of the ones before it.
    """

    def init():
        return tuple(defense.init() for defense in defenses)

    def apply(probs, state, context):
        new_state = []
        for index, (defense, inner) in enumerate(zip(defenses, state, strict=True)):
            inner_context = context._replace(key=jax.random.fold_in(context.key, index))
            probs, inner = defense.apply(probs, inner, inner_context)
            new_state.append(inner)
        return probs, tuple(new_state)

    return Defense(init=init, apply=apply)


def project_to_simplex(values: jax.Array) -> jax.Array:
    """Euclidean projection of each row onto the probability simplex (Duchi et al. 2008)."""
    classes = values.shape[-1]
    ordered = -jnp.sort(-values, axis=-1)
    cumulative = jnp.cumsum(ordered, axis=-1) - 1.0
    ranks = jnp.arange(1, classes + 1, dtype=values.dtype)
    support = ordered - cumulative / ranks > 0
    rho = jnp.sum(support, axis=-1, keepdims=True)
    theta = jnp.take_along_axis(cumulative, rho - 1, axis=-1) / rho.astype(values.dtype)
    return jnp.maximum(values - theta, 0.0)


def normalise(values: jax.Array) -> jax.Array:
    """Clips negatives and rescales each row to sum to one (uniform where a row is all zero)."""
    values = jnp.maximum(values, 0.0)
    total = jnp.sum(values, axis=-1, keepdims=True)
    uniform = jnp.full_like(values, 1.0 / values.shape[-1])
    return jnp.where(total > 0, values / jnp.where(total > 0, total, 1.0), uniform)
