"""High-confidence answers: the API reveals only the classes it is at least ``cutoff`` sure of, the output
filter IBM's Adversarial Robustness Toolbox offers as its ``HighConfidence`` postprocessor."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from heistlab.defenses.base import Defense, QueryContext, normalise, stateless


def high_confidence(cutoff: float = 0.25) -> Defense:
    """Zeroes every probability below ``cutoff`` and renormalises the rest of the row.

    A row whose top probability reaches ``cutoff`` keeps its top-1 class; with ``cutoff > 1/2`` it is served
    one-hot. A row whose top probability is under ``cutoff`` is served uniform (every class ``1/C``): the
    API abstains, and its argmax (the lowest index) carries no information. ART zeroes such a row, which
    leaves the simplex that every defense here takes and serves (rows summing to zero break the
    cross-entropy an attacker trains with and any defense chained after); refusing instead is not possible
    at this point, because the victim has already answered and admission is decided before it runs.
    ``served_accuracy`` counts an abstained row as a wrong answer unless the true class is class 0.

    Raises:
      ValueError: if ``cutoff`` is not a number in (0, 1].
    """
    if not (
        isinstance(cutoff, int | float)
        and not isinstance(cutoff, bool)
        and math.isfinite(cutoff)
        and 0.0 < cutoff <= 1.0
    ):
        raise ValueError(
            f"high_confidence: cutoff must be a number in (0, 1] (a top probability), got {cutoff!r}"
        )

    def transform(probs: jax.Array, context: QueryContext) -> jax.Array:
        return normalise(jnp.where(probs >= cutoff, probs, 0.0))

    return stateless(transform)
