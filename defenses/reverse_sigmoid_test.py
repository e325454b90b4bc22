import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defenses.base import QueryContext
from defenses.reverse_sigmoid import reverse_sigmoid


def serve(defense, probs):
    probs = jnp.asarray(probs, jnp.float32)
    context = QueryContext(inputs=jnp.zeros((probs.shape[0], 1)), key=jax.random.key(0))
    return np.asarray(jax.jit(defense.apply)(probs, defense.init(), context)[0])


def test_binary_example_by_hand():
    # logit(0.8) = ln 4, so sigmoid(0.4 ln 4) = 4^0.4 / (1 + 4^0.4) = 0.635184; the shift 0.7 * 0.135184 =
    # 0.094629 comes off 0.8 and, by symmetry, onto 0.2; the row already sums to one.
    shift = 0.7 * (4**0.4 / (1 + 4**0.4) - 0.5)
    np.testing.assert_allclose(
        serve(reverse_sigmoid(), [[0.8, 0.2]]), [[0.8 - shift, 0.2 + shift]], rtol=1e-5
    )
    np.testing.assert_allclose(0.8 - shift, 0.705371, atol=1e-6)


def test_three_class_example_needs_renormalising():
    # logit(0.5) = 0 leaves 0.5 alone; logit(0.25) = -ln 3 gives sigmoid = 1 / (1 + 3^0.4) = 0.391873, so each
    # 0.25 becomes 0.25 + 0.7 * 0.108127 = 0.325689 and the row (sum 1.151378) is rescaled.
    low = 0.25 - 0.7 * (1 / (1 + 3**0.4) - 0.5)
    total = 0.5 + 2 * low
    expected = [[0.5 / total, low / total, low / total]]
    np.testing.assert_allclose(serve(reverse_sigmoid(), [[0.5, 0.25, 0.25]]), expected, rtol=1e-5)
    np.testing.assert_allclose(expected[0][0], 0.434263, atol=1e-6)


def test_zero_beta_serves_unchanged():
    probs = np.random.default_rng(1).dirichlet(np.ones(10), 16).astype(np.float32)
    np.testing.assert_allclose(serve(reverse_sigmoid(beta=0.0), probs), probs, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": -0.1}, "beta must be a finite number >= 0"),
        ({"gamma": 0.0}, "gamma must be a finite number > 0"),
    ],
)
def test_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=f"reverse_sigmoid: {message}, got"):
        reverse_sigmoid(**kwargs)
