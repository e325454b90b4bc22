"""Ranking short rows inside a jitted defense: XLA's sort against pairwise comparisons and exchanges.

Rounding (largest remainders) ranks each answer's entries and the noise defenses' simplex projection sorts
them. XLA on CPU sorts each short row with a comparator call per comparison; ``descending_ranks`` and
``sorted_descending`` (``defenses/base.py``) compare every pair of entries in one vectorised pass instead,
with the same ranks and values (tested in ``defenses/base_test.py``). Rows per second at 4096 rows of 10
and of 32 classes (the widest that takes the pairwise form). Feature squeezing's median filter sorts each
pixel's neighbourhood: by XLA's sort, or by ``sorted_by_exchanges`` (``defenses/feature_squeezing.py``),
images per second for 4096 digits (8x8) at windows 2 and 3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heistlab.defenses.base import PAIRWISE_RANK_MAX_CLASSES, descending_ranks, sorted_descending
from heistlab.defenses.feature_squeezing import median_smooth, neighbourhood

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


def sorting_median(images: jax.Array, window: int) -> jax.Array:
    """``median_smooth`` as it was written first: the neighbourhood stacked and sorted by ``jnp.sort``."""
    return jnp.sort(jnp.stack(neighbourhood(images, window)), axis=0)[window * window // 2]


@pytest.mark.parametrize("window", [2, 3])
@pytest.mark.parametrize("method", ["sort", "exchanges"])
def test_median_filter(benchmark, method, window):
    images = np.random.default_rng(0).random((ROWS, 8, 8, 1)).astype(np.float32)
    kernel = jax.jit(sorting_median if method == "sort" else median_smooth, static_argnums=1)
    np.testing.assert_array_equal(
        kernel(images, window), jax.jit(median_smooth, static_argnums=1)(images, window)
    )
    benchmark.group = "ranking"
    benchmark.extra_info.update(
        kind="kernel", name=f"median {window}x{window}, {ROWS} images 8x8, {method}", operation="median",
        method=method, classes=window, items_per_round=ROWS,
    )  # fmt: skip
    benchmark(lambda: jax.block_until_ready(kernel(images, window)))
