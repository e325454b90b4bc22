"""What an evasion attack is, what it receives after extraction, and the helpers every evasion attack shares.

An evasion attack is built by a factory (``pgd(epsilon=0.25)``, ``square(epsilon=0.25)``) into an
``Evasion``: a name, a ``kind`` and one pure-ish ``craft`` function. ``attacks.evasion.run_evasion``
dispatches on the kind:

- ``transfer``: ``craft(model, params, inputs, labels, key) -> adversarial`` is white-box on the stolen
  surrogate; the adversarial inputs are then sent to the victim through the prediction API.
- ``score`` and ``decision``: ``craft(oracle, inputs, labels, key) -> SearchResult`` searches through the API
  itself (scores, or top-1 decisions only), every query counted and defended.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from heistlab.api import Oracle, PredictionAPI

TRANSFER, SCORE, DECISION = "transfer", "score", "decision"
KINDS = (TRANSFER, SCORE, DECISION)
NORMS = ("linf", "l2")


class EvasionStage(NamedTuple):
    """The evasion stage of an experiment.

    api: the defended prediction API; evasion attacks query it through ``api.oracle(client)``, so every
        query is counted, capped and defended.
    surrogate_model, surrogate_params: the stolen model (white-box to the attacker).
    inputs, labels: clean test inputs and their true labels, to be perturbed.
    victim_labels: the undefended victim's top-1, for measuring success (evaluation only, never the attacker).
    key: PRNG key for the stage.
    """

    api: PredictionAPI
    surrogate_model: nn.Module
    surrogate_params: Any
    inputs: np.ndarray
    labels: np.ndarray
    victim_labels: Callable[[np.ndarray], np.ndarray]
    key: jax.Array


class Evasion(NamedTuple):
    """An evasion attack: ``kind`` says what ``craft`` takes (see the module docstring).

    count: how many clean inputs to attack (fewer when the evader's API budget cannot pay for them).
    queries_per_input: the most queries one input may cost: 1 for transfer attacks (each adversarial input
        is sent once), the per-example budget for black-box ones.
    norm, epsilon: the perturbation bound an adversarial input must keep to count as a success.
    query_batch: the most rows one API call may carry.
    """

    name: str
    kind: str
    count: int
    queries_per_input: int
    norm: str
    epsilon: float
    query_batch: int
    craft: Callable


class SearchResult(NamedTuple):
    """What a black-box attack found, per attacked input.

    adversarial: the final inputs (the clean input where nothing better was found).
    queries: queries spent on each input (until the attacker saw success, or its budget ran out).
    fooled: whether the API's last answer on the final input was a wrong top-1 (the attacker's own view).
    diagnostics: attack-specific numbers for the metrics (for example how often answers carried no signal).
    """

    adversarial: np.ndarray
    queries: np.ndarray
    fooled: np.ndarray
    diagnostics: dict


def check_count(attack: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{attack}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_positive(attack: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{attack}: {name} must be a number > 0, got {value!r}")
    return float(value)


def check_norm(attack: str, norm, accepted: tuple[str, ...] = NORMS) -> str:
    if norm not in accepted:
        raise ValueError(f"{attack}: norm must be one of {', '.join(accepted)}; got {norm!r}")
    return norm


def perturbation_norms(adversarial: np.ndarray, clean: np.ndarray, norm: str) -> np.ndarray:
    """Per-row L-inf or L2 size of ``adversarial - clean`` (empty for no rows)."""
    rows = (len(clean), int(np.prod(np.shape(clean)[1:])))
    delta = np.asarray(adversarial, np.float64).reshape(rows) - np.asarray(clean, np.float64).reshape(rows)
    return np.abs(delta).max(axis=1) if norm == "linf" else np.sqrt((delta**2).sum(axis=1))


def top1(oracle: Oracle, answers: np.ndarray) -> np.ndarray:
    """The predicted class in each answer, whatever the oracle serves (labels, top-k or probabilities)."""
    return np.asarray(answers if oracle.output == "labels" else np.argmax(answers, axis=-1), np.int64)


def power_of_two_sizes(count: int, largest: int) -> list[int]:
    """Splits ``count`` rows into batches whose sizes are powers of two, none above ``largest``.

    Black-box attacks send a batch per step for the inputs still being attacked, so the batch size shrinks
    one input at a time; the API compiles its defense per batch shape, and power-of-two sizes keep that to a
    handful of compilations (at most log2(count) + 1 batches per step, and never an extra query).
    """
    cap = 1 << (largest.bit_length() - 1)
    sizes = []
    while count > 0:
        size = min(cap, 1 << (count.bit_length() - 1))
        sizes.append(size)
        count -= size
    return sizes


class OutOfBudget(Exception):
    """The oracle's budget cannot pay for the next step; raised before anything is sent."""


def ask(oracle: Oracle, inputs: np.ndarray, query_batch: int) -> np.ndarray:
    """Answers for every row of ``inputs``, in power-of-two batches of at most ``query_batch`` rows.

    Raises ``OutOfBudget`` (nothing sent) when the budget left cannot pay for every row, and
    ``QueryRefused`` when the API declines a batch (rows already served stay counted by the API).
    """
    inputs = np.asarray(inputs, np.float32)
    remaining = oracle.remaining
    if remaining is not None and remaining < len(inputs):
        raise OutOfBudget(f"{len(inputs)} queries wanted, {remaining} left")
    answers, start = [], 0
    for size in power_of_two_sizes(len(inputs), query_batch):
        answers.append(oracle.query(inputs[start : start + size]))
        start += size
    return np.concatenate(answers)


def numpy_rng(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded from a JAX key, for host-side sampling driven by the explicit key."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))
