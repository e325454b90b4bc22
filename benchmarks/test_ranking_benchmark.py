"""Ranking short rows inside a jitted defense: XLA's sort against pairwise comparisons.

Rounding (largest remainders) ranks each answer's entries and the noise defenses' simplex projection sorts
them. XLA on CPU sorts each short row with a comparator call per comparison; ``descending_ranks`` and
``sorted_descending`` (``defenses/base.py``) compare every pair of entries in one vectorised pass instead,
with the same ranks and values (tested in ``defenses/base_test.py``). Rows per second at 4096 rows of 10
and of 32 classes (the widest that takes the pairwise form).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heistlab.defenses.base import PAIRWISE_RANK_MAX_CLASSES, descending_ranks, sorted_descending

ROWS = 4096


def sorting_ranks(values: jax.Array) -> jax.Array:
    order = jnp.argsort(-values, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def sorting_descending(values: jax.Array) -> jax.Array:
    return -jnp.sort(-values, axis=-1)


KERNELS = {
    ("ranks", "sort"): sorting_ranks,
    ("ranks", "pairwise"): descending_ranks,
    ("sorted rows", "sort"): sorting_descending,
    ("sorted rows", "pairwise"): sorted_descending,
}


@pytest.mark.parametrize("classes", [10, PAIRWISE_RANK_MAX_CLASSES])
@pytest.mark.parametrize(("operation", "method"), list(KERNELS))
def test_row_ranking(benchmark, operation, method, classes):
    values = np.random.default_rng(0).random((ROWS, classes)).astype(np.float32)
    kernel = jax.jit(KERNELS[operation, method])
    jax.block_until_ready(kernel(values))
    benchmark.group = "ranking"
    benchmark.extra_info.update(
        kind="kernel", name=f"{operation}, {ROWS}x{classes}, {method}", operation=operation, method=method,
        classes=classes, items_per_round=ROWS,
    )  # fmt: skip
    benchmark(lambda: jax.block_until_ready(kernel(values)))
