"""Top-k truncation: the API reveals the probabilities of its k most likely classes and nothing else."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from heistlab.defenses.base import DefenderData, Defense, QueryContext, normalise, stateless


def top_k(k: int, defender: DefenderData | None = None) -> Defense:
    """Keeps each row's ``k`` largest probabilities, zeroes the rest and renormalises.

    Exactly ``k`` classes are kept even when probabilities tie (the lower class index wins), so at most ``k``
    served values are nonzero; a row with ``k`` or fewer classes is served unchanged. The top-1 class is kept.
    Given the ``defender``'s data, ``k`` above its number of classes is refused: it would truncate nothing.

    Raises:
      ValueError: if ``k`` is not an int >= 1, or exceeds ``defender.num_classes``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k: k must be an int >= 1, got {k!r}")
    if defender is not None and k > defender.num_classes:
        raise ValueError(
            f"top_k: k={k} exceeds the {defender.num_classes} classes of the data; accepted: 1 to "
            f"{defender.num_classes} (k={defender.num_classes} truncates nothing)"
        )

    def transform(probs: jax.Array, context: QueryContext) -> jax.Array:
        classes = probs.shape[-1]
        _, kept = jax.lax.top_k(probs, min(k, classes))
        mask = jnp.any(kept[..., :, None] == jnp.arange(classes), axis=-2)
        return normalise(jnp.where(mask, probs, 0.0))

    return stateless(transform)
