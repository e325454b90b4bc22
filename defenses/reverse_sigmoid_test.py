import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from heistlab.defenses.base import QueryContext
from heistlab.defenses.reverse_sigmoid import reverse_sigmoid


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


def paper_formula(probs, beta, gamma):
    """Lee et al.'s formula in float64, with logit(0) = -inf and logit(1) = +inf (scipy's limits)."""
    y = np.asarray(probs, np.float64)
    perturbed = y - beta * (special.expit(gamma * special.logit(y)) - 0.5)
    return perturbed / perturbed.sum(axis=-1, keepdims=True)


def test_one_hot_rows_take_the_formulas_limit():
    # sigmoid(0.1 * logit(1)) = 1 and sigmoid(0.1 * logit(0)) = 0: with beta 1 the one becomes 1/2, each zero
    # becomes 1/2, and the row is uniform. A clip at 1e-6 left the top class at 0.47 of [0.7, 0.3, 0.3, 0.3].
    served = serve(reverse_sigmoid(beta=1.0, gamma=0.1), np.eye(4)[[2]])
    np.testing.assert_allclose(served, np.full((1, 4), 0.25), rtol=1e-6)


@pytest.mark.parametrize(("beta", "gamma"), [(1.0, 0.1), (0.7, 0.4)])
def test_matches_a_float64_reference_of_the_paper_formula(beta, gamma):
    # Softmax rows from logits of growing spread: exact zeros, exact ones and values down to float32's
    # smallest normal number. Measured max difference 6.4e-8 (beta 1, gamma 0.1); a clip at 1e-6 gave 0.11.
    logits = np.random.default_rng(0).normal(size=(5, 200, 10)) * np.array([1, 3, 10, 30, 100])[:, None, None]
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits.reshape(-1, 10), jnp.float32)))
    assert np.any(probs == 0) and np.any(probs == 1) and np.any((probs > 0) & (probs < 1e-30))
    served = serve(reverse_sigmoid(beta, gamma), probs)
    assert np.abs(served - paper_formula(probs, beta, gamma)).max() < 2e-7


def test_a_probability_rounded_past_one_stays_finite():
    served = serve(reverse_sigmoid(beta=1.0, gamma=0.1), [[np.float32(1.0000001), 0.0]])
    np.testing.assert_allclose(served, [[0.5, 0.5]], rtol=1e-6)


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
