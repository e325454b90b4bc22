"""The defense interface: a pair of pure functions over a small pytree state.

Modelled on optax's ``GradientTransformation``. A defense is built by a factory (``rounding(decimals=2)``),
starts from ``init()`` and transforms a batch of probabilities with ``apply``::

    served, state = defense.apply(probs, state, context)

``probs`` is a ``(batch, classes)`` float array on the probability simplex and so is ``served``: every defense
takes and returns probabilities, never logits. ``context`` carries what else a prediction API knows about the
query (the inputs and a PRNG key), so that stateful and input-dependent defenses share the same signature.
``apply`` must be a pure function of its arguments, so that it can be jitted and replayed for a fixed key.

Defenses that act before the victim runs (budgets, rate limits) add ``admit``; defenses whose state is
host Python (detectors keeping per-client query sets, keyed-hash watermarks) set ``host=True``; defenses
that act on the model itself add ``augment_training``. ``chain`` composes all of these.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

State = Any


class QueryContext(NamedTuple):
    """What the prediction API passes to a defense besides the probabilities.

    inputs: the query batch as the client sent it, shape ``(batch, *input_shape)``, values in ``[0, 1]``.
    key: a PRNG key for this batch; a defense that needs randomness draws it from here and nowhere else.
    client: the client's identity; only host-side defenses (``Defense.host``) see it, jitted ones get None.
    now: the client's simulated clock in seconds when the batch is served (host-side defenses only).
    raw_probs: when the defense preprocesses inputs (``Defense.preprocess``), the victim's probabilities on
        the inputs as sent, beside ``probs`` on the preprocessed ones (a squeezing detector compares them).
    """

    inputs: jax.Array
    key: jax.Array
    client: str | None = None
    now: float = 0.0
    raw_probs: jax.Array | None = None


class Request(NamedTuple):
    """A batch asking to be admitted: who sends it, how many rows, and the client's simulated clock.

    inputs: the validated batch itself, for admission that judges what is asked (a stateful detector); None
    where the caller has no inputs to show (a server's quota check before the API).
    """

    client: str
    size: int
    now: float
    inputs: np.ndarray | None = None


class Verdict(NamedTuple):
    """An admission decision: serve after waiting ``delay`` simulated seconds, or refuse with ``reason``.

    A refusal's ``delay`` is the Retry-After hint: how long until the same request could be admitted
    (``inf`` when never).
    """

    admitted: bool
    delay: float = 0.0
    reason: str = ""


ADMIT = Verdict(admitted=True)


class Evidence(NamedTuple):
    """What an experiment hands a defense's ``report`` after the attack: label functions of the models.

    surrogate_labels: the stolen model's top-1 on given inputs.
    independent_labels: top-1 of a model trained independently on the victim's task (no stolen answers),
        the innocent party a watermark must not accuse.
    victim_labels: the undefended victim's top-1.
    attackers: the attacking client's names (several for a Sybil attacker); benign: the benign clients'.
    evaders: the evasion attacker's names, when an evasion stage ran before the report.
    """

    surrogate_labels: Callable[[np.ndarray], np.ndarray]
    independent_labels: Callable[[np.ndarray], np.ndarray]
    victim_labels: Callable[[np.ndarray], np.ndarray]
    attackers: tuple[str, ...]
    benign: tuple[str, ...]
    evaders: tuple[str, ...] = ()


class DefenderData(NamedTuple):
    """What the defender owns besides the victim: its training data, shapes and a seed.

    Factories that build models of their own (a proxy for MAD, a misinformation model, a trigger set) take it
    as their ``defender`` argument; the experiment passes it to every factory that declares one.
    """

    x: np.ndarray
    y: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int
    seed: int


class Defense(NamedTuple):
    """A defense: ``init() -> state``, ``apply(probs, state, context) -> (probs, state)``, optional parts.

    admit: ``admit(state, request) -> (verdict, state)``: admission control before the victim runs (budgets,
        rate limits, refusing a flagged client). Host-side Python.
    report: ``report(state, evidence) -> dict``: metrics from the final state (detections, watermark tests).
    host: ``apply`` needs the host (Python state, hashing, scipy): the API calls it eagerly with the client
        and clock in the context. Otherwise ``apply`` is pure, jittable and row-wise (the API pads batches to
        power-of-two sizes with uniform rows and drops them after) and never sees the client.
    augment_training: ``augment_training(x, y) -> (x, y)``: a model-side defense extends the victim's training
        data (for example with a watermark trigger set) before the victim is trained.
    preprocess: ``preprocess(inputs) -> inputs``: an input-side defense transforms queries before the victim
        sees them (feature squeezing); pure and jittable.
    replaces_victim: ``apply`` ignores the probabilities it is given and answers from a model of its own (an
        ensemble defense). The API then does not run the victim (unless a ``preprocess`` asks for the
        victim's answers) and hands ``apply`` uniform rows in their place.
    """

    init: Callable[[], State]
    apply: Callable[[jax.Array, State, QueryContext], tuple[jax.Array, State]]
    admit: Callable[[State, Request], tuple[Verdict, State]] | None = None
    report: Callable[[State, Evidence], dict] | None = None
    host: bool = False
    augment_training: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    preprocess: Callable[[jax.Array], jax.Array] | None = None
    replaces_victim: bool = False


class EmptyState(NamedTuple):
    """State of a stateless defense."""


def stateless(transform: Callable[[jax.Array, QueryContext], jax.Array]) -> Defense:
    """Wraps a pure ``transform(probs, context) -> probs`` as a defense with no state."""

    def apply(probs, state, context):
        return transform(probs, context), state

    return Defense(init=EmptyState, apply=apply)


def _unchanged(probs: jax.Array, context: QueryContext) -> jax.Array:
    return probs


_IDENTITY = stateless(_unchanged)


def identity() -> Defense:
    """The undefended baseline: serves the victim's probabilities unchanged. Every call returns the same
    defense (it holds no state), so the APIs around it share one compiled defense program."""
    return _IDENTITY


def chain(*defenses: Defense) -> Defense:
    """Applies ``defenses`` in order; the state is the tuple of their states.

    Each defense gets its own key, derived from the batch key and its position in the chain, so adding a
    defense never changes the randomness of the ones before it. A request is admitted only if every member
    admits it (delays add up); when one refuses, no member's admission state changes. The chain runs on the
    host if any member does, and then jits each jittable member on its own. It replaces the victim when its
    first member does (later members transform what the first one served).
    """
    host = any(defense.host for defense in defenses)
    appliers = [_member_applier(defense, host) for defense in defenses]

    def init():
        return tuple(defense.init() for defense in defenses)

    def apply(probs, state, context):
        new_state = []
        for index, (applier, inner) in enumerate(zip(appliers, state, strict=True)):
            probs, inner = applier(probs, inner, context._replace(key=jax.random.fold_in(context.key, index)))
            new_state.append(inner)
        return probs, tuple(new_state)

    def admit(state, request):
        new_state, delay = [], 0.0
        for defense, inner in zip(defenses, state, strict=True):
            verdict, inner = defense.admit(inner, request) if defense.admit else (ADMIT, inner)
            if not verdict.admitted:
                return verdict, state
            new_state.append(inner)
            delay += verdict.delay
        return Verdict(admitted=True, delay=delay), tuple(new_state)

    def report(state, evidence):
        merged = {}
        for defense, inner in zip(defenses, state, strict=True):
            if defense.report is not None:
                merged.update(defense.report(inner, evidence))
        return merged

    def augment_training(x, y):
        for defense in defenses:
            if defense.augment_training is not None:
                x, y = defense.augment_training(x, y)
        return x, y

    def preprocess(inputs):
        for defense in defenses:
            if defense.preprocess is not None:
                inputs = defense.preprocess(inputs)
        return inputs

    return Defense(
        init=init,
        apply=apply,
        admit=admit if any(d.admit for d in defenses) else None,
        report=report if any(d.report for d in defenses) else None,
        host=host,
        augment_training=augment_training if any(d.augment_training for d in defenses) else None,
        preprocess=preprocess if any(d.preprocess for d in defenses) else None,
        replaces_victim=bool(defenses) and defenses[0].replaces_victim,
    )


def _member_applier(defense: Defense, chain_on_host: bool):
    """How a chain calls one member: as is, or jitted without the host-only context fields."""
    if defense.host or not chain_on_host:
        return defense.apply
    jitted = jax.jit(defense.apply)

    def apply(probs, state, context):
        pure_context = QueryContext(context.inputs, context.key, raw_probs=context.raw_probs)
        return jitted(probs, state, pure_context)

    return apply


# Up to this many classes, rows are ranked by comparing every pair of entries (classes^2 comparisons a row,
# vectorised); beyond it by sorting. XLA on CPU sorts each short row with a comparator call per comparison:
# the pairwise ranks are several times faster up to this width (benchmarks/test_ranking_benchmark.py).
PAIRWISE_RANK_MAX_CLASSES = 32


def descending_ranks(values: jax.Array) -> jax.Array:
    """Each entry's position in its row ordered from largest to smallest, equal entries by lowest index: the
    ranks a stable ``argsort`` of ``-values`` gives (``0.0`` and ``-0.0`` count as equal here)."""
    classes = values.shape[-1]
    if classes > PAIRWISE_RANK_MAX_CLASSES:
        order = jnp.argsort(-values, axis=-1, stable=True)
        return jnp.argsort(order, axis=-1, stable=True)
    mine, theirs = values[..., :, None], values[..., None, :]
    index = jnp.arange(classes)
    earlier = index[None, :] < index[:, None]  # [i, j]: entry j comes before entry i
    ahead = (theirs > mine) | ((theirs == mine) & earlier)
    return jnp.sum(ahead, axis=-1, dtype=jnp.int32)


def sorted_descending(values: jax.Array) -> jax.Array:
    """Each row from largest to smallest, placed by ``descending_ranks``: the values of
    ``-jnp.sort(-values)``, bit for bit but for which of a row's ``0.0`` and ``-0.0`` comes first."""
    classes = values.shape[-1]
    if classes > PAIRWISE_RANK_MAX_CLASSES:
        return -jnp.sort(-values, axis=-1)
    at_rank = descending_ranks(values)[..., :, None] == jnp.arange(classes)  # [i, k]: entry i has rank k
    return jnp.max(jnp.where(at_rank, values[..., :, None], -jnp.inf), axis=-2)


def project_to_simplex(values: jax.Array) -> jax.Array:
    """Euclidean projection of each row onto the probability simplex (Duchi et al. 2008)."""
    classes = values.shape[-1]
    ordered = sorted_descending(values)
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


def distinct_rows(inputs: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """``(first, occurrence)``: the index of each distinct row's first occurrence, in order, and for each
    row the position in ``first`` of its copy, so that ``inputs[first][occurrence]`` equals ``inputs``
    bytewise as ``dtype`` (``0.0`` and ``-0.0`` rows are distinct). Host defenses use it to do per-row work
    once per distinct row.

    Rows are grouped by one product with fixed random weights, and the groups are checked byte for byte;
    rows that the product confuses (or NaN rows) send the batch to an exact grouping by the rows' bytes.
    """
    flat = np.ascontiguousarray(inputs, dtype).reshape(len(inputs), math.prod(inputs.shape[1:]))
    if not len(flat):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    keys = flat @ _row_weights(flat.shape[1], flat.dtype)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    words = flat.view(f"u{flat.itemsize}")
    if not np.array_equal(words[first[inverse]], words):
        return _distinct_rows_by_bytes(flat)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inverse]


@functools.lru_cache(maxsize=8)
def _row_weights(width: int, dtype) -> np.ndarray:
    return np.random.default_rng(width).standard_normal(width).astype(dtype)


def _distinct_rows_by_bytes(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = flat.view(np.dtype((np.void, flat.shape[1] * flat.itemsize))).ravel().tolist()
    # Walking the rows backwards leaves each row's first index in the dict.
    first_index = dict(zip(reversed(rows), range(len(rows) - 1, -1, -1), strict=True))
    first = np.sort(np.fromiter(first_index.values(), np.int64, len(first_index)))
    first_of_row = np.fromiter(map(first_index.__getitem__, rows), np.int64, len(rows))
    return first, np.searchsorted(first, first_of_row)
