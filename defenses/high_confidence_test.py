import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heistlab.defenses.base import QueryContext
from heistlab.defenses.high_confidence import high_confidence


def serve(defense, probs):
    probs = jnp.asarray(probs, jnp.float32)
    context = QueryContext(inputs=jnp.zeros((probs.shape[0], 1)), key=jax.random.key(0))
    return np.asarray(jax.jit(defense.apply)(probs, defense.init(), context)[0])


def test_keeps_classes_at_or_above_the_cutoff_renormalised_by_hand():
    # 0.5 and 0.25 survive a cutoff of 0.25 and share the row 2:1; 0.2 and 0.05 are dropped.
    served = serve(high_confidence(0.25), [[0.2, 0.5, 0.05, 0.25]])
    np.testing.assert_allclose(served, [[0.0, 2 / 3, 0.0, 1 / 3]], rtol=1e-6)


def test_a_row_under_the_cutoff_is_served_uniform():
    served = serve(high_confidence(0.5), [[0.4, 0.35, 0.25], [0.6, 0.3, 0.1]])
    np.testing.assert_allclose(served, [[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]], rtol=1e-6)


def test_confident_rows_keep_their_top1_and_stay_on_the_simplex():
    probs = np.random.default_rng(1).dirichlet(np.full(10, 0.2), 64).astype(np.float32)
    served = serve(high_confidence(0.3), probs)
    confident = probs.max(axis=-1) >= 0.3
    assert 0 < confident.sum() < len(probs)
    np.testing.assert_array_equal(served[confident].argmax(axis=-1), probs[confident].argmax(axis=-1))
    np.testing.assert_allclose(served[~confident], 0.1, rtol=1e-6)
    np.testing.assert_allclose(served.sum(axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(served[confident][probs[confident] < 0.3], 0.0)


@pytest.mark.parametrize("cutoff", [0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_rejects_a_cutoff_outside_zero_to_one(cutoff):
    with pytest.raises(ValueError, match=r"high_confidence: cutoff must be a number in \(0, 1\]"):
        high_confidence(cutoff)
