"""Additive output noise, projected back onto the probability simplex: the "random noise" baseline of
Orekondy et al., "Prediction Poisoning", ICLR 2020, with Gaussian or Laplace-mechanism noise."""

from __future__ import annotations

import math

import jax

from heistlab.defenses.base import Defense, QueryContext, project_to_simplex, stateless


def gaussian_noise(sigma: float) -> Defense:
    """Adds i.i.d. ``N(0, sigma**2)`` noise to every probability, then projects each row onto the simplex.

    Raises:
      ValueError: if ``sigma`` is not a finite number >= 0.
    """
    if not (_is_finite_number(sigma) and sigma >= 0):
        raise ValueError(f"gaussian_noise: sigma must be a finite number >= 0, got {sigma!r}")

    def transform(probs: jax.Array, context: QueryContext) -> jax.Array:
        noise = sigma * jax.random.normal(context.key, probs.shape, probs.dtype)
        return project_to_simplex(probs + noise)

    return stateless(transform)


def laplace_noise(epsilon: float, sensitivity: float = 2.0) -> Defense:
    """Adds i.i.d. Laplace noise of scale ``b = sensitivity / epsilon``, then projects rows onto the simplex.

    The scale is that of the Laplace mechanism (Dwork, McSherry, Nissim and Smith, "Calibrating Noise to
    Sensitivity in Private Data Analysis", TCC 2006). The default sensitivity 2.0 is the L1 diameter of the
    simplex, the most one answer can move; smaller ``epsilon`` means more noise.

    Raises:
      ValueError: if ``epsilon`` or ``sensitivity`` is not a finite number > 0.
    """
    if not (_is_finite_number(epsilon) and epsilon > 0):
        raise ValueError(f"laplace_noise: epsilon must be a finite number > 0, got {epsilon!r}")
    if not (_is_finite_number(sensitivity) and sensitivity > 0):
        raise ValueError(f"laplace_noise: sensitivity must be a finite number > 0, got {sensitivity!r}")
    scale = sensitivity / epsilon

    def transform(probs: jax.Array, context: QueryContext) -> jax.Array:
        noise = scale * jax.random.laplace(context.key, probs.shape, probs.dtype)
        return project_to_simplex(probs + noise)

    return stateless(transform)


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
