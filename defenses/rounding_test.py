import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heistlab.defenses.base import QueryContext
from heistlab.defenses.rounding import rounding


def serve(defense, probs):
    probs = jnp.asarray(probs, jnp.float32)
    context = QueryContext(inputs=jnp.zeros((probs.shape[0], 1)), key=jax.random.key(0))
    return np.asarray(jax.jit(defense.apply)(probs, defense.init(), context)[0])


def test_largest_remainder_by_hand():
    # Units of 0.1: floors 4, 4, 1 leave one unit, which goes to the largest remainder (0.56, class 0).
    np.testing.assert_allclose(serve(rounding(1), [[0.456, 0.444, 0.1]]), [[0.5, 0.4, 0.1]], atol=1e-7)


def test_rows_stay_on_simplex_where_entrywise_rounding_does_not():
    # Entrywise rounding gives [0.2] * 4 (sum 0.8); the two left-over units go to the tied remainders with the
    # lowest indices.
    np.testing.assert_allclose(serve(rounding(1), [[0.25] * 4]), [[0.3, 0.3, 0.2, 0.2]], atol=1e-7)
    np.testing.assert_allclose(serve(rounding(2), [[1 / 3] * 3]), [[0.34, 0.33, 0.33]], atol=1e-7)
    np.testing.assert_allclose(serve(rounding(0), [[0.35, 0.35, 0.3]]), [[1.0, 0.0, 0.0]], atol=1e-7)


@pytest.mark.parametrize("decimals", [0, 1, 2, 3, 5])
def test_values_are_multiples_of_the_unit_summing_to_one(decimals):
    probs = np.random.default_rng(1).dirichlet(np.ones(10), 16).astype(np.float32)
    units = serve(rounding(decimals), probs) * 10**decimals
    np.testing.assert_allclose(units, np.round(units), atol=1e-3)
    np.testing.assert_array_equal(np.round(units).sum(axis=-1), 10**decimals)


def test_rounding_moves_each_value_by_less_than_one_unit():
    probs = np.random.default_rng(2).dirichlet(np.ones(10), 16).astype(np.float32)
    assert np.max(np.abs(serve(rounding(2), probs) - np.asarray(probs))) < 0.01


@pytest.mark.parametrize("decimals", [-1, 8, 2.5, True, "2"])
def test_rejects_bad_decimals(decimals):
    with pytest.raises(ValueError, match=r"rounding: decimals must be an int in \[0, 7\], got"):
        rounding(decimals)
