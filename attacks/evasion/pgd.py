"""Projected gradient descent (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018), white-box on the stolen surrogate, then transferred to the victim through the API.

From an optional uniform random start inside the epsilon ball, repeat ``steps`` times: ascend the surrogate's
cross-entropy on the true label by ``step_size`` along the gradient's sign (L-inf) or its unit direction
(L2), project back onto the epsilon ball around the clean input and clip to the input range [0, 1]. FGSM is
the one-step case without random start (``attacks.evasion.fgsm``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from heistlab.attacks.evasion.base import TRANSFER, Evasion, check_count, check_norm, check_positive
from heistlab.models import trains_in_compiled_loop
from heistlab.training import capacity_for, pad_rows

TINY = 1e-12


def _flat_norm(values: jax.Array) -> jax.Array:
    """Per-row L2 norm, shaped to broadcast against ``values``."""
    axes = tuple(range(1, values.ndim))
    return jnp.sqrt(jnp.sum(values**2, axis=axes, keepdims=True))


def project(adversarial: jax.Array, clean: jax.Array, epsilon: jax.Array, norm: str) -> jax.Array:
    """The nearest point to ``adversarial`` in the ``norm`` ball of radius ``epsilon`` around ``clean``,
    clipped to [0, 1] (clipping keeps an L-inf point inside its ball and only shrinks an L2 one)."""
    delta = adversarial - clean
    if norm == "linf":
        delta = jnp.clip(delta, -epsilon, epsilon)
    else:
        delta = delta * jnp.minimum(1.0, epsilon / jnp.maximum(_flat_norm(delta), TINY))
    return jnp.clip(clean + delta, 0.0, 1.0)


def ascent_direction(gradient: jax.Array, norm: str) -> jax.Array:
    """The steepest-ascent direction of unit ``norm``: the gradient's sign (L-inf) or its unit vector (L2)."""
    if norm == "linf":
        return jnp.sign(gradient)
    # A confident model's gradient can be ~1e-28 per pixel, whose squares underflow float32: rescale first.
    axes = tuple(range(1, gradient.ndim))
    gradient = gradient / jnp.maximum(
        jnp.max(jnp.abs(gradient), axis=axes, keepdims=True), jnp.finfo(gradient.dtype).tiny
    )
    return gradient / jnp.maximum(_flat_norm(gradient), TINY)


def uniform_in_ball(clean: jax.Array, epsilon: jax.Array, norm: str, key: jax.Array) -> jax.Array:
    """A uniform draw from the epsilon ball around each input (Madry et al.'s random restart), clipped."""
    if norm == "linf":
        offset = jax.random.uniform(key, clean.shape, minval=-1.0, maxval=1.0) * epsilon
        return project(clean + offset, clean, epsilon, norm)
    direction_key, radius_key = jax.random.split(key)
    direction = ascent_direction(jax.random.normal(direction_key, clean.shape), "l2")
    dimension = np.prod(clean.shape[1:])
    radius = jax.random.uniform(radius_key, (clean.shape[0],) + (1,) * (clean.ndim - 1)) ** (1.0 / dimension)
    return project(clean + direction * radius * epsilon, clean, epsilon, norm)


@functools.lru_cache(maxsize=32)
def _programs(model: nn.Module, norm: str):
    """Jitted start, step and whole run for one model and norm; epsilon, step size and step count stay
    traced, so one program serves every setting (two with and without random start)."""

    def total_loss(params, inputs, labels):
        log_probs = jax.nn.log_softmax(model.apply(params, inputs))
        return -jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=1))

    # Rows do not interact at inference, so the gradient of the summed loss is every row's own gradient.
    example_gradient = jax.grad(total_loss, argnums=1)

    def step(params, adversarial, clean, labels, epsilon, step_size):
        direction = ascent_direction(example_gradient(params, adversarial, labels), norm)
        return project(adversarial + step_size * direction, clean, epsilon, norm)

    @functools.partial(jax.jit, static_argnames="use_random_start")
    def run_all(params, clean, labels, epsilon, step_size, steps, key, use_random_start):
        adversarial = uniform_in_ball(clean, epsilon, norm, key) if use_random_start else clean
        body = lambda _, current: step(params, current, clean, labels, epsilon, step_size)
        return jax.lax.fori_loop(0, steps, body, adversarial)

    start = jax.jit(lambda clean, epsilon, key: uniform_in_ball(clean, epsilon, norm, key))
    return start, jax.jit(step), run_all


def projected_gradient_descent(
    model: nn.Module,
    params,
    inputs: np.ndarray,
    labels: np.ndarray,
    key: jax.Array,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    norm: str,
    use_random_start: bool,
) -> np.ndarray:
    """Adversarial versions of ``inputs`` for ``model`` (untargeted: away from ``labels``).

    Rows are padded to a bucket (four per power of two: 359 test digits run as 384 rows, 1.5 ms per FGSM call
    here against 3.0 ms as 512), so different batch sizes share a few compiled programs. Models
    run every step inside one compiled loop where training does (``trains_in_compiled_loop``: dense models,
    the CNN on small images) and are stepped from Python otherwise.
    """
    count = len(inputs)
    capacity = capacity_for(count, steps_per_octave=4)
    # NumPy arguments go to the compiled programs as they are: wrapping each in a jnp array first costs an
    # eager dispatch apiece, about a quarter of an FGSM call on a few hundred digits.
    clean = pad_rows(np.asarray(inputs, np.float32), capacity)
    targets = pad_rows(np.asarray(labels, np.int32), capacity)
    epsilon, step_size = np.float32(epsilon), np.float32(step_size)
    start, step, run_all = _programs(model, norm)
    if trains_in_compiled_loop(model, clean.shape[1:]):
        adversarial = run_all(
            params,
            clean,
            targets,
            epsilon,
            step_size,
            np.int32(steps),
            key,
            use_random_start=use_random_start,
        )
    else:
        clean, targets = jnp.asarray(clean), jnp.asarray(targets)
        adversarial = start(clean, epsilon, key) if use_random_start else clean
        for _ in range(steps):
            adversarial = step(params, adversarial, clean, targets, epsilon, step_size)
    return np.asarray(adversarial)[:count]


def pgd(
    epsilon: float = 0.25,
    step_size: float = 0.025,
    steps: int = 20,
    norm: str = "linf",
    random_start: bool = True,
    count: int = 1000,
    query_batch: int = 256,
) -> Evasion:
    """Builds PGD with ``steps`` steps of ``step_size`` inside the ``norm`` ball of radius ``epsilon``.

    Madry et al. use epsilon 0.3, step 0.01 and 40 (training) or 100 (evaluation) steps on MNIST, L-inf,
    with a random start; 8x8 digits need fewer steps.
    """
    epsilon = check_positive("pgd", "epsilon", epsilon)
    step_size = check_positive("pgd", "step_size", step_size)
    check_count("pgd", "steps", steps)
    check_norm("pgd", norm)
    check_count("pgd", "count", count)
    check_count("pgd", "query_batch", query_batch)
    if not isinstance(random_start, bool):
        raise ValueError(f"pgd: random_start must be true or false, got {random_start!r}")
    craft = functools.partial(
        projected_gradient_descent,
        epsilon=epsilon,
        step_size=step_size,
        steps=steps,
        norm=norm,
        use_random_start=random_start,
    )
    return Evasion("pgd", TRANSFER, count, 1, norm, epsilon, query_batch, craft)
