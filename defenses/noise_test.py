import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heistlab.defenses.base import QueryContext
from heistlab.defenses.noise import gaussian_noise, laplace_noise

CLASSES = 10
# Uniform rows with noise far smaller than 1/CLASSES stay inside the simplex, where the projection only
# subtracts each row's mean noise: served - probs = noise - mean(noise), of variance var(noise) * (1 - 1/C).
UNIFORM = jnp.full((4096, CLASSES), 1.0 / CLASSES, jnp.float32)


def deviation(defense):
    # Un-jitted, so the tests share one compiled sampler per distribution; "rbg" keys compile about ten times
    # faster on CPU than the default threefry, and the defenses draw through jax.random whatever the key.
    context = QueryContext(inputs=jnp.zeros((UNIFORM.shape[0], 1)), key=jax.random.key(0, impl="rbg"))
    served, _ = defense.apply(UNIFORM, defense.init(), context)
    return np.asarray(served - UNIFORM)


@pytest.mark.slow
def test_laplace_scale_is_sensitivity_over_epsilon():
    # Laplace(b) has variance 2 b^2, here b = 2.0 / 400 = 0.005; 40960 draws give the std to ~0.6% (1 sd).
    expected_std = 0.005 * math.sqrt(2 * (1 - 1 / CLASSES))
    assert abs(deviation(laplace_noise(400.0)).std() / expected_std - 1) < 0.05


@pytest.mark.slow
def test_laplace_noise_scales_linearly_with_sensitivity():
    np.testing.assert_allclose(
        deviation(laplace_noise(400.0, sensitivity=1.0)), deviation(laplace_noise(400.0)) / 2, atol=1e-6
    )


def test_gaussian_scale_is_sigma():
    expected_std = 0.005 * math.sqrt(1 - 1 / CLASSES)
    assert abs(deviation(gaussian_noise(0.005)).std() / expected_std - 1) < 0.05


def test_zero_sigma_serves_unchanged():
    np.testing.assert_allclose(deviation(gaussian_noise(0.0)), 0.0, atol=1e-7)


@pytest.mark.parametrize("sigma", [-0.1, math.nan, math.inf, "0.1"])
def test_rejects_bad_sigma(sigma):
    with pytest.raises(ValueError, match="gaussian_noise: sigma must be a finite number >= 0, got"):
        gaussian_noise(sigma)


@pytest.mark.parametrize(
    ("epsilon", "sensitivity", "name"),
    [(0.0, 2.0, "epsilon"), (-1.0, 2.0, "epsilon"), (1.0, 0.0, "sensitivity")],
)
def test_rejects_bad_laplace_parameters(epsilon, sensitivity, name):
    with pytest.raises(ValueError, match=f"laplace_noise: {name} must be a finite number > 0, got"):
        laplace_noise(epsilon, sensitivity)
