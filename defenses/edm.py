"""Ensemble of Diverse Models (Kariyappa, Prakash and Qureshi, "Protecting DNNs from Theft using an Ensemble
of Diverse Models", ICLR 2021).

The defended API serves an ensemble of ``members`` models instead of one. All members are trained together
to be accurate on the defender's data and to disagree on out-of-distribution (OOD) inputs::

    loss = mean_i CE(f_i(x_in), y) + diversity_weight * mean_x coherence(f_1(x_ood), ..., f_N(x_ood))

where ``coherence`` is the largest cosine similarity between two members' output probability vectors. Each
query is answered by one member, chosen by a keyed hash of the input: HMAC-SHA256 of the input's float32
bytes under a secret key, reduced modulo ``members``. An in-distribution query gets a correct answer from
whichever member answers; an OOD query (what extraction attacks send) gets a member-specific answer, so the
attacker's transfer set mixes the functions of several discordant models. The same input always gets the
same member, so repeating a query and averaging the answers does not recover a consensus.

The key never lives in a config: ``key_file`` names a file holding it, ``key_env`` an environment variable;
with neither, each run draws a random key (and says so in the log). Hashing input bytes runs on the host, so
the defense is host-side. The members are trained when the defense is built (once per process for the same
data and settings).

Differences from the paper:
- OOD training data: the paper draws it from a separate outlier data set; here ``ood`` names synthetic
  sources: ``uniform`` noise and ``shuffled`` (the defender's images with their pixels permuted, which keeps
  their intensity statistics and destroys their shapes). Each training step draws a fresh OOD batch.
- The diversity term is the coherence above averaged over the OOD batch, with one fixed weight; the paper's
  exact form of the term and its weighting are not reproduced.
- The ensemble replaces the victim: the probabilities the API hands the defense are ignored (so EDM must
  come first in a chain; the API then skips the victim, see ``Defense.replaces_victim``), and the
  experiment's victim serves only as the reference for fidelity.
- Each query is evaluated by its selected member only; the disagreement statistic, which needs every
  member's answer, is measured on the first ``dispute_rows`` rows of each call (all rows when ``None``).
- Members are MLPs trained jointly with Adam for ``epochs`` passes over the defender's data.
- ``holdout_fraction`` of the defender's data is kept out of training to report each member's accuracy and
  the served (hash-selected) accuracy in ``report``; the run's ``served_accuracy`` on the test split is
  measured by the experiment as for every output defense.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from heistlab.defenses.base import DefenderData, Defense, Evidence, QueryContext, distinct_rows
from heistlab.defenses.dawn import keyed_tags, load_key, rows_as_bytes
from heistlab.models import MLP
from heistlab.training import capacity_for, pad_rows

DEFAULT_KEY_ENV = "HEISTLAB_EDM_KEY"
# Folded into the defender's seed so the ensemble never shares the victim's initialisation.
ENSEMBLE_STREAM = 0x45444D
# Squared norms below this count as zero vectors in the cosine similarity.
NORM_FLOOR = 1e-12


def uniform_noise(key: jax.Array, inputs: jax.Array) -> jax.Array:
    """Uniform noise in [0, 1] shaped like ``inputs``."""
    return jax.random.uniform(key, inputs.shape, inputs.dtype)


def pixel_shuffled(key: jax.Array, inputs: jax.Array) -> jax.Array:
    """Each input with its values permuted independently: in-distribution intensities, no shapes."""
    flat = inputs.reshape(len(inputs), -1)
    keys = jax.random.split(key, len(inputs))
    shuffled = jax.vmap(lambda row_key, row: jax.random.permutation(row_key, row))(keys, flat)
    return shuffled.reshape(inputs.shape)


OOD_SOURCES: Mapping[str, Callable[[jax.Array, jax.Array], jax.Array]] = MappingProxyType(
    {"uniform": uniform_noise, "shuffled": pixel_shuffled}
)


class EnsembleSettings(NamedTuple):
    """How the ensemble is trained (the cache key of the trained members, with the defender's data)."""

    members: int
    hidden: tuple[int, ...]
    diversity_weight: float
    ood: tuple[str, ...]
    epochs: int
    batch_size: int
    learning_rate: float
    holdout_fraction: float


class Ensemble(NamedTuple):
    """Trained members (parameters stacked on a leading axis) and the holdout they are measured on."""

    model: MLP
    params: object
    holdout_x: np.ndarray
    holdout_y: np.ndarray


class EdmState(NamedTuple):
    """Per client: queries answered, answers by each member, queries every member was evaluated on
    (``checked``), and those of them on which the members' top-1 differ."""

    answered: Mapping[str | None, int] = MappingProxyType({})
    by_member: Mapping[str | None, tuple[int, ...]] = MappingProxyType({})
    disputed: Mapping[str | None, int] = MappingProxyType({})
    checked: Mapping[str | None, int] = MappingProxyType({})


_trained: dict[str, Ensemble] = {}


def edm(
    defender: DefenderData | None = None,
    members: int = 5,
    diversity_weight: float = 1.0,
    ood: Sequence[str] = ("uniform", "shuffled"),
    hidden: Sequence[int] = (256, 256),
    epochs: int = 50,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    holdout_fraction: float = 0.1,
    key_env: str | None = DEFAULT_KEY_ENV,
    key_file: str | None = None,
    dispute_rows: int | None = 256,
) -> Defense:
    """Serves, for each query, the answer of one ensemble member chosen by a keyed hash of the input.

    Args:
      defender: the defender's training data (the experiment passes it); the members are trained on it.
      members: the ensemble's size.
      diversity_weight: the weight of the OOD coherence term (0: an ordinary ensemble of independent models).
      ood: the OOD sources the diversity term is computed on, any of ``uniform`` and ``shuffled``.
      hidden, epochs, batch_size, learning_rate: each member MLP's hidden widths and the joint training.
      holdout_fraction: share of the defender's data kept out of training to measure the members.
      key_env, key_file: where the selection key comes from (see ``defenses.dawn.load_key``).
      dispute_rows: every member is evaluated on at most this many rows of each call (the first ones) to
        measure their disagreement; ``None``: on all rows. Serving needs only the selected member per row, so
        this bounds the cost of the statistic on large calls; the member serving a row never depends on it
        (on a larger call each member runs on its own rows alone: the same answers up to float32 rounding).

    ``report`` gives ``edm_member_accuracy_holdout`` (mean over members), ``edm_member{i}_accuracy_holdout``,
    ``edm_served_accuracy_holdout``, and over the attackers' queries ``edm_disputed_fraction`` (share of the
    ``edm_disputed_rows`` rows checked, see ``dispute_rows``, on which the members' top-1 answers are not
    unanimous) and ``edm_member_share_max`` (the largest share of all their queries answered by one member;
    ``1 / members`` when selection is uniform).

    Raises:
      ValueError: naming the argument and what is accepted, before anything is trained.
    """
    settings = check_settings(
        defender, members, diversity_weight, ood, hidden, epochs, batch_size, learning_rate, holdout_fraction
    )
    check_dispute_rows(dispute_rows)
    secret = load_key(key_env, key_file, owner="edm")
    ensemble = trained_ensemble(defender, settings)
    member_probs = ensemble_probabilities(ensemble.model)
    own_probs = grouped_probabilities(ensemble.model)

    def apply(probs: jax.Array, state: EdmState, context: QueryContext) -> tuple[jax.Array, EdmState]:
        inputs = np.asarray(context.inputs, np.float32)
        first, occurrence = distinct_rows(inputs)
        distinct = inputs[first]
        picked = hashed_members(secret, distinct, settings.members)
        chosen = picked[occurrence]
        checked = len(inputs) if dispute_rows is None else min(dispute_rows, len(inputs))
        every = all_members(member_probs, ensemble.params, inputs[:checked])
        if checked == len(inputs):
            served = every[chosen, np.arange(len(inputs))]
        else:
            answers = selected_members(own_probs, ensemble.params, distinct, picked, settings.members)
            served = answers[occurrence]
        served = served.astype(np.asarray(probs).dtype)
        return served, record(state, context.client, every, chosen, settings.members)

    def report(state: EdmState, evidence: Evidence) -> dict:
        found = holdout_metrics(secret, member_probs, ensemble, settings.members)
        attackers = [client for client in evidence.attackers if state.answered.get(client)]
        answered = sum(state.answered[client] for client in attackers)
        if answered:
            counts = np.sum([state.by_member[client] for client in attackers], axis=0)
            checked = sum(state.checked.get(client, 0) for client in attackers)
            if checked:
                found["edm_disputed_fraction"] = sum(state.disputed[c] for c in attackers) / checked
            found["edm_disputed_rows"] = checked
            found["edm_member_share_max"] = float(counts.max() / answered)
        return found

    return Defense(init=EdmState, apply=apply, report=report, host=True, replaces_victim=True)


def check_dispute_rows(dispute_rows) -> None:
    valid_int = isinstance(dispute_rows, int) and not isinstance(dispute_rows, bool) and dispute_rows >= 0
    if dispute_rows is not None and not valid_int:
        raise ValueError(f"edm: dispute_rows must be an int >= 0 or null (all rows), got {dispute_rows!r}")


def check_settings(
    defender, members, diversity_weight, ood, hidden, epochs, batch_size, learning_rate, holdout_fraction
) -> EnsembleSettings:
    if not isinstance(defender, DefenderData):
        raise ValueError(
            "edm: defender must be a DefenderData (the experiment passes the victim's training data), "
            f"got {type(defender).__name__}"
        )
    for name, value, least in (("members", members, 2), ("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"edm: {name} must be an int >= {least}, got {value!r}")
    if not (_is_finite_number(diversity_weight) and diversity_weight >= 0):
        raise ValueError(f"edm: diversity_weight must be a finite number >= 0, got {diversity_weight!r}")
    if not (_is_finite_number(learning_rate) and learning_rate > 0):
        raise ValueError(f"edm: learning_rate must be a finite number > 0, got {learning_rate!r}")
    if not (_is_finite_number(holdout_fraction) and 0.0 <= holdout_fraction < 1.0):
        raise ValueError(f"edm: holdout_fraction must be a number in [0, 1), got {holdout_fraction!r}")
    sources = tuple(ood) if isinstance(ood, Sequence) and not isinstance(ood, str) else ()
    if not sources or any(source not in OOD_SOURCES for source in sources):
        raise ValueError(f"edm: ood must be a non-empty list of {', '.join(OOD_SOURCES)}; got {ood!r}")
    widths = tuple(hidden) if isinstance(hidden, Sequence) and not isinstance(hidden, str) else ()
    if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise ValueError(f"edm: hidden must be a non-empty list of ints >= 1, got {hidden!r}")
    training_rows = len(defender.y) - holdout_rows(len(defender.y), holdout_fraction)
    if training_rows < 1:
        raise ValueError(
            f"edm: holdout_fraction={holdout_fraction} leaves none of the defender's {len(defender.y)} "
            "samples to train on; accepted: a smaller holdout_fraction"
        )
    return EnsembleSettings(
        members,
        widths,
        float(diversity_weight),
        sources,
        epochs,
        batch_size,
        float(learning_rate),
        float(holdout_fraction),
    )


def holdout_rows(count: int, fraction: float) -> int:
    return round(count * fraction)


def select_members(secret: bytes, inputs: np.ndarray, members: int) -> np.ndarray:
    """Each input's member: the first 8 bytes of HMAC-SHA256(secret, float32 bytes) modulo ``members``.

    Each distinct row is hashed once; a repeated row takes its first occurrence's member.
    """
    first, occurrence = distinct_rows(inputs)
    return hashed_members(secret, inputs[first], members)[occurrence]


def hashed_members(secret: bytes, inputs: np.ndarray, members: int) -> np.ndarray:
    """``select_members`` with every row hashed."""
    tags = keyed_tags(secret, rows_as_bytes(inputs))
    if not tags:
        return np.zeros(0, np.int64)
    leading = np.frombuffer(b"".join(tags), ">u8").reshape(len(tags), -1)[:, 0]
    return (leading % np.uint64(members)).astype(np.int64)


def coherence(member_probs: jax.Array) -> jax.Array:
    """Per input, the largest cosine similarity between two members' outputs; ``(members, batch, classes)``
    in, ``(batch,)`` out."""
    norms = jnp.sqrt(jnp.maximum(jnp.sum(member_probs**2, axis=-1, keepdims=True), NORM_FLOOR))
    unit = member_probs / norms
    similarity = jnp.einsum("abk,cbk->bac", unit, unit)
    members = member_probs.shape[0]
    off_diagonal = ~jnp.eye(members, dtype=bool)
    return jnp.max(jnp.where(off_diagonal, similarity, -jnp.inf), axis=(-2, -1))


def ensemble_loss(model: MLP, weight: float, params, inputs, targets, ood_inputs) -> jax.Array:
    """Mean cross-entropy of every member on ``inputs`` plus ``weight`` times the mean OOD coherence."""
    logits = jax.vmap(lambda member: model.apply(member, inputs))(params)
    cross_entropy = optax.softmax_cross_entropy(logits, targets[None]).mean()
    ood_probs = jax.nn.softmax(jax.vmap(lambda member: model.apply(member, ood_inputs))(params))
    return cross_entropy + weight * coherence(ood_probs).mean()


def train_ensemble(
    model: MLP, x: np.ndarray, y: np.ndarray, settings: EnsembleSettings, key: jax.Array
) -> object:
    """Trains ``settings.members`` copies of ``model`` jointly (one compiled loop) on the EDM loss."""
    sources = tuple(OOD_SOURCES[name] for name in settings.ood)
    targets = jax.nn.one_hot(jnp.asarray(y), model.num_classes)
    inputs = jnp.asarray(x, jnp.float32)
    batch = min(settings.batch_size, len(x))
    steps = settings.epochs * math.ceil(len(x) / batch)
    optimizer = optax.adam(settings.learning_rate)
    init_key, loop_key = jax.random.split(key)
    member_keys = jax.random.split(init_key, settings.members)
    params = jax.vmap(lambda k: model.init(k, inputs[:1]))(member_keys)
    loss = functools.partial(ensemble_loss, model, settings.diversity_weight)

    def step(carry, step_key):
        params, opt_state = carry
        pick_key, ood_pick_key, *source_keys = jax.random.split(step_key, 2 + len(sources))
        rows = jax.random.choice(pick_key, len(x), (batch,), replace=False)
        ood_rows = jax.random.choice(ood_pick_key, len(x), (batch,), replace=False)
        ood_inputs = jnp.concatenate(
            [source(k, inputs[ood_rows]) for source, k in zip(sources, source_keys, strict=True)]
        )
        grads = jax.grad(loss)(params, inputs[rows], targets[rows], ood_inputs)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    @jax.jit
    def run(params, key):
        carry, _ = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, steps))
        return carry[0]

    return run(params, loop_key)


def trained_ensemble(defender: DefenderData, settings: EnsembleSettings) -> Ensemble:
    """The ensemble trained on the defender's data less a seeded holdout, cached in-process."""
    digest = hashlib.sha256()
    for part in (np.ascontiguousarray(defender.x, np.float32), np.ascontiguousarray(defender.y, np.int64)):
        digest.update(part.tobytes())
    digest.update(repr((settings, defender.input_shape, defender.num_classes, defender.seed)).encode())
    cache_key = digest.hexdigest()
    if cache_key not in _trained:
        x, y = np.asarray(defender.x, np.float32), np.asarray(defender.y, np.int64)
        order = np.random.default_rng([int(defender.seed), ENSEMBLE_STREAM]).permutation(len(y))
        held = order[: holdout_rows(len(y), settings.holdout_fraction)]
        kept = order[len(held) :]
        model = MLP(defender.num_classes, settings.hidden)
        key = jax.random.fold_in(jax.random.key(int(defender.seed)), ENSEMBLE_STREAM)
        params = train_ensemble(model, x[kept], y[kept], settings, key)
        _trained[cache_key] = Ensemble(model, params, x[held], y[held])
    return _trained[cache_key]


def ensemble_probabilities(model: MLP):
    """A jitted ``(params, inputs) -> (members, batch, classes)`` probability program."""
    return jax.jit(lambda params, inputs: jax.nn.softmax(jax.vmap(lambda p: model.apply(p, inputs))(params)))


def all_members(program, params, inputs: np.ndarray) -> np.ndarray:
    """Every member's probabilities on ``inputs``, evaluated on a power-of-two padded batch."""
    padded = pad_rows(inputs, capacity_for(len(inputs), minimum=8))
    return np.asarray(program(params, padded))[:, : len(inputs)]


def grouped_probabilities(model: MLP):
    """A jitted ``(params, grouped) -> (members, capacity, classes)`` program: member ``i`` on its own rows
    ``grouped[i]``."""
    return jax.jit(lambda params, grouped: jax.nn.softmax(jax.vmap(model.apply)(params, grouped)))


def selected_members(program, params, inputs: np.ndarray, chosen: np.ndarray, members: int) -> np.ndarray:
    """Row ``j``'s probabilities from member ``chosen[j]`` alone, each member evaluated on the rows it serves
    (grouped into one batch per member, zero-padded to a power-of-two capacity shared by all members)."""
    order = np.argsort(chosen, kind="stable")
    counts = np.bincount(chosen, minlength=members)
    starts = np.cumsum(counts) - counts
    member, slot = chosen[order], np.arange(len(order)) - np.repeat(starts, counts)
    grouped = np.zeros((members, capacity_for(int(counts.max()), minimum=8), *inputs.shape[1:]), np.float32)
    grouped[member, slot] = inputs[order]
    answers = np.asarray(program(params, grouped))
    served = np.empty((len(order), answers.shape[-1]), answers.dtype)
    served[order] = answers[member, slot]
    return served


def record(state: EdmState, client, every: np.ndarray, chosen: np.ndarray, members: int) -> EdmState:
    """Adds a call to ``client``'s counts; ``every`` holds all members' answers on its first rows."""
    top = every.argmax(axis=-1)
    disputed = int(np.sum(np.any(top != top[:1], axis=0)))
    counts = np.bincount(chosen, minlength=members)
    previous = np.asarray(state.by_member.get(client, (0,) * members))
    return EdmState(
        answered={**state.answered, client: state.answered.get(client, 0) + len(chosen)},
        by_member={**state.by_member, client: tuple(int(c) for c in previous + counts)},
        disputed={**state.disputed, client: state.disputed.get(client, 0) + disputed},
        checked={**state.checked, client: state.checked.get(client, 0) + every.shape[1]},
    )


def holdout_metrics(secret: bytes, program, ensemble: Ensemble, members: int) -> dict:
    if len(ensemble.holdout_y) == 0:
        return {}
    every = all_members(program, ensemble.params, ensemble.holdout_x)
    correct = every.argmax(axis=-1) == ensemble.holdout_y[None]
    chosen = select_members(secret, ensemble.holdout_x, members)
    found = {f"edm_member{index}_accuracy_holdout": float(row.mean()) for index, row in enumerate(correct)}
    found["edm_member_accuracy_holdout"] = float(correct.mean())
    found["edm_served_accuracy_holdout"] = float(correct[chosen, np.arange(len(chosen))].mean())
    return found


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
