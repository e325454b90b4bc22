"""What every attack shares: its result type, the surrogate it trains, and budget-respecting querying.

An attack is built by a factory (``knockoff(budget=1000)``) into an ``Attack`` whose ``run`` takes an oracle
(the API handle, see ``heistlab.api.Oracle``), the attacker's pool of unlabelled inputs, the surrogate to
train and a PRNG key. It returns the surrogate's parameters; it never sees the victim's.

An attack that queries first and trains once afterwards also exposes that first half as ``collect``,
returning a ``TransferSet``; ``run`` is then ``fit_transfer_set(surrogate, collect(...))``. Experiments over
several seeds (``num_seeds``) collect each seed's transfer set and train all the surrogates in one program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from heistlab.api import Oracle, QueryRefused
from heistlab.training import TrainConfig, train_classifier


class Surrogate(NamedTuple):
    """The attacker's model family and how it is trained (shared by every extraction attack)."""

    model: nn.Module
    train: TrainConfig


class AttackResult(NamedTuple):
    """The stolen model and how it was obtained: queries served and one record per round.

    model: the module ``params`` belong to, when the attack chose its own architecture (exact extraction
    recovers the victim's family); ``None`` means the surrogate's model.
    metrics: numbers the attack measured about itself (hidden units found...), reported with the run's.
    """

    params: Any
    queries: int
    rounds: tuple[dict, ...]
    model: nn.Module | None = None
    metrics: dict | None = None


class TransferSet(NamedTuple):
    """What a query-then-train attack collected: the served inputs, the targets its surrogate is fitted to,
    the key that surrogate is trained from, and one record per round."""

    inputs: np.ndarray
    targets: np.ndarray
    train_key: jax.Array
    rounds: tuple[dict, ...]


class VictimFamily(NamedTuple):
    """The victims an exact-extraction attack can extract: ``accepts(model)`` on the victim's (untrained)
    module, and ``description``, which says so in a sentence's words."""

    description: str
    accepts: Callable[[nn.Module], bool]


class Attack(NamedTuple):
    """``collect`` is set when ``run`` is ``fit_transfer_set(surrogate, collect(...))``, else ``None``.

    extracts: the only victims the attack can extract (``None``: any classifier).
    keeps_queries: whether the attack holds every queried input in memory at once (a transfer set or an
        equation system), so that its memory grows with ``budget``.
    """

    name: str
    budget: int
    run: Callable[[Oracle, np.ndarray, Surrogate, jax.Array], AttackResult]
    collect: Callable[[Oracle, np.ndarray, Surrogate, jax.Array], TransferSet] | None = None
    extracts: VictimFamily | None = None
    keeps_queries: bool = True


def fit_transfer_set(surrogate: Surrogate, transfer: TransferSet) -> AttackResult:
    """Trains the surrogate on a collected transfer set."""
    params = train_classifier(
        surrogate.model, transfer.inputs, transfer.targets, transfer.train_key, surrogate.train
    )
    return AttackResult(params, len(transfer.inputs), transfer.rounds)


def query_then_train(
    name: str, budget: int, collect: Callable[[Oracle, np.ndarray, Surrogate, jax.Array], TransferSet]
) -> Attack:
    """An attack that spends its queries first and trains its surrogate once, on what was served."""

    def run(oracle: Oracle, pool: np.ndarray, surrogate: Surrogate, key: jax.Array) -> AttackResult:
        return fit_transfer_set(surrogate, collect(oracle, pool, surrogate, key))

    return Attack(name, budget, run, collect)


def check_budget(attack: str, budget: int) -> int:
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"{attack}: budget must be an integer >= 1, got {budget!r}")
    return budget


def affordable(oracle: Oracle, wanted: int) -> int:
    """How many of ``wanted`` queries the oracle will still serve."""
    remaining = oracle.remaining
    return wanted if remaining is None else max(0, min(wanted, remaining))


def query_in_batches(oracle: Oracle, inputs: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries ``inputs`` in batches; stops at the first refusal and returns what was served.

    Returns ``(served_inputs, answers)``; the two have the same length.
    """
    answers = []
    for start in range(0, len(inputs), batch_size):
        try:
            answers.append(oracle.query(inputs[start : start + batch_size]))
        except QueryRefused:
            break
    served = sum(len(answer) for answer in answers)
    if served == 0:
        empty_answer_shape = (0,) if oracle.output == "labels" else (0, oracle.num_classes)
        return inputs[:0], np.zeros(empty_answer_shape, np.float32)
    return inputs[:served], np.concatenate(answers)


LABEL_KINDS = ("soft", "hard")


def check_labels(attack: str, labels: str) -> str:
    if labels not in LABEL_KINDS:
        raise ValueError(f"{attack}: labels must be one of {', '.join(LABEL_KINDS)}; got {labels!r}")
    return labels


def training_targets(oracle: Oracle, answers: np.ndarray, labels: str) -> np.ndarray:
    """Targets from answers: served distributions for ``labels='soft'`` (when the API serves scores),
    else one-hot top-1 rows."""
    if labels == "soft" and oracle.output != "labels":
        return oracle.targets(answers)
    return hard_targets(oracle, answers)


def hard_targets(oracle: Oracle, answers: np.ndarray) -> np.ndarray:
    """One-hot rows of the top-1 answer, whatever the oracle serves."""
    labels = answers if oracle.output == "labels" else answers.argmax(axis=-1)
    return np.eye(oracle.num_classes, dtype=np.float32)[labels]
