import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heistlab.defenses.base import DefenderData, QueryContext
from heistlab.defenses.top_k import top_k


def serve(defense, probs):
    probs = jnp.asarray(probs, jnp.float32)
    context = QueryContext(inputs=jnp.zeros((probs.shape[0], 1)), key=jax.random.key(0))
    return np.asarray(jax.jit(defense.apply)(probs, defense.init(), context)[0])


def test_keeps_the_k_largest_renormalised_by_hand():
    np.testing.assert_allclose(serve(top_k(2), [[0.1, 0.4, 0.2, 0.3]]), [[0.0, 4 / 7, 0.0, 3 / 7]], rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 9])
def test_exactly_k_nonzero_and_top1_kept(k):
    probs = np.random.default_rng(1).dirichlet(np.ones(10), 16).astype(np.float32)
    served = serve(top_k(k), probs)
    np.testing.assert_array_equal((served > 0).sum(axis=-1), k)
    np.testing.assert_array_equal(served.argmax(axis=-1), np.asarray(probs).argmax(axis=-1))


def test_ties_keep_exactly_k_lowest_indices():
    np.testing.assert_allclose(serve(top_k(2), [[0.25] * 4]), [[0.5, 0.5, 0.0, 0.0]])


def test_k_at_least_the_number_of_classes_serves_unchanged():
    probs = [[0.2, 0.5, 0.3]]
    np.testing.assert_allclose(serve(top_k(5), probs), probs, rtol=1e-6)


@pytest.mark.parametrize("k", [0, -2, 1.5, True])
def test_rejects_bad_k(k):
    with pytest.raises(ValueError, match="top_k: k must be an int >= 1, got"):
        top_k(k)


def test_k_above_the_defenders_classes_is_refused_naming_the_range():
    defender = DefenderData(np.zeros((1, 2)), np.zeros(1), (2,), num_classes=10, seed=0)
    top_k(10, defender)
    with pytest.raises(ValueError, match=r"k=11 exceeds the 10 classes .* accepted: 1 to 10"):
        top_k(11, defender)
