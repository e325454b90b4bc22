"""Label-only answers: the API returns just the predicted class, as the oracle of Papernot et al.
("Practical Black-Box Attacks against Machine Learning", AsiaCCS 2017) does, and as in the label-only
extraction of Tramer et al. (USENIX Security 2016)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from heistlab.defenses.base import Defense, QueryContext, stateless


def label_only() -> Defense:
    """Serves the one-hot vector of each row's argmax (the lowest index among ties), as probabilities."""

    def transform(probs: jax.Array, context: QueryContext) -> jax.Array:
        return jax.nn.one_hot(jnp.argmax(probs, axis=-1), probs.shape[-1], dtype=probs.dtype)

    return stateless(transform)
