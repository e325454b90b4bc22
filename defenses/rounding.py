"""Prediction rounding (Tramer et al., "Stealing Machine Learning Models via Prediction APIs", USENIX Security
2016), which studied APIs serving confidences rounded to 5, 4, 3 and 2 decimals (BigML rounds to 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from heistlab.defenses.base import Defense, QueryContext, descending_ranks, stateless

MAX_DECIMALS = 7  # float32 holds integers exactly up to 2**24, so 10**7 units per row is as fine as it gets.


def rounding(decimals: int) -> Defense:
    """Serves each probability rounded to ``decimals`` places, with every row kept exactly on the simplex.

    Rounding each entry on its own leaves rows off the simplex ([0.25] * 4 to one place gives [0.2] * 4).
    Instead each row is apportioned ``10**decimals`` units by the largest-remainder (Hamilton) method: every
    class gets the floor of its share, and the units left over go one each to the largest remainders, ties to
    the lowest class index. So every served value is (the float nearest) a multiple of ``10**-decimals`` and
    each row's units sum to exactly ``10**decimals``. Input rows are assumed to be on the simplex.

    Raises:
      ValueError: if ``decimals`` is not an int in ``[0, 7]``.
    """
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= MAX_DECIMALS:
        raise ValueError(f"rounding: decimals must be an int in [0, {MAX_DECIMALS}], got {decimals!r}")
    units = 10**decimals

    def transform(probs: jax.Array, context: QueryContext) -> jax.Array:
        return apportion(probs, units)

    return stateless(transform)


def apportion(probs: jax.Array, units: int) -> jax.Array:
    """Largest-remainder apportionment of ``units`` per row, returned as fractions of ``units``."""
    scaled = probs * units
    floors = jnp.floor(scaled)
    left_over = jnp.clip(jnp.round(units - jnp.sum(floors, axis=-1, keepdims=True)), 0, probs.shape[-1])
    extra = remainder_ranks(scaled - floors) < left_over
    return (floors + extra.astype(probs.dtype)) / units


def remainder_ranks(remainders: jax.Array) -> jax.Array:
    """Each entry's rank in its row, largest remainder first (rank 0), equal remainders by lowest index."""
    return descending_ranks(remainders)
