from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heistlab import training
from heistlab.attacks.evasion import pgd
from heistlab.attacks.evasion.base import perturbation_norms
from heistlab.attacks.evasion.pgd import project, projected_gradient_descent, uniform_in_ball
from heistlab.models import CNN, SoftmaxRegression, trains_in_compiled_loop


@pytest.mark.slow
def test_projection_by_hand():
    clean = jnp.full((1, 2, 2, 1), 0.5)
    step = jnp.asarray([0.3, 0.4, 0.0, -0.6]).reshape(1, 2, 2, 1)
    # L-inf: each pixel clipped to 0.5 +- 0.25.
    linf = project(clean + step, clean, 0.25, "linf")
    np.testing.assert_allclose(np.ravel(linf), [0.75, 0.75, 0.5, 0.25], atol=1e-6)
    # L2: |step| = sqrt(0.09 + 0.16 + 0.36) = 0.781; scaled to 0.5, then the last pixel is clipped at 0.
    l2 = project(clean + step, clean, 0.5, "l2")
    scale = 0.5 / np.sqrt(0.61)
    np.testing.assert_allclose(
        np.ravel(l2), [0.5 + 0.3 * scale, 0.5 + 0.4 * scale, 0.5, 0.5 - 0.6 * scale], atol=1e-6
    )
    np.testing.assert_allclose(project(clean + 0.6, clean, 0.7, "linf"), jnp.ones_like(clean))


def linear_two_class_model():
    """Softmax regression on 8x8 inputs with logits (sum x, -sum x): class 0 grows with every pixel."""
    model = SoftmaxRegression(num_classes=2)
    kernel = np.stack([np.ones(64), -np.ones(64)], axis=1).astype(np.float32)
    return model, {"params": {"Dense_0": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(2)}}}


@pytest.mark.parametrize(("norm", "moved"), [("linf", 0.1), ("l2", 0.1 / 8)])
def test_one_step_without_start_moves_against_the_label_by_hand(norm, moved):
    # d/dx of -log p_0 is -2 (1 - p_0) on every pixel: one step lowers each pixel by epsilon (L-inf) or by
    # epsilon / sqrt(64) (L2, the unit gradient).
    model, params = linear_two_class_model()
    clean = np.full((3, 8, 8, 1), 0.5, np.float32)
    adversarial = projected_gradient_descent(
        model, params, clean, np.zeros(3, np.int32), jax.random.key(0),
        epsilon=0.1, step_size=0.1, steps=1, norm=norm, use_random_start=False,
    )  # fmt: skip
    np.testing.assert_allclose(adversarial, clean - moved, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_lies_in_the_ball_and_the_input_range(norm):
    clean = jnp.asarray(np.random.default_rng(0).uniform(size=(256, 8, 8, 1)), jnp.float32)
    start = np.asarray(uniform_in_ball(clean, 0.3, norm, jax.random.key(1)))
    norms = perturbation_norms(start, np.asarray(clean), norm)
    assert np.all(norms <= 0.3 + 1e-5) and norms.mean() > 0.1
    assert start.min() >= 0 and start.max() <= 1


@pytest.fixture(scope="module")
def white_box(small_victim, digits_splits):
    """The small victim's own model and parameters, attacked white-box on 64 test inputs."""
    return small_victim.model, small_victim.params, digits_splits.test.x[:64], digits_splits.test.y[:64]


def fooled_rate(model, params, inputs, labels):
    return float(np.mean(training.predict_labels(model, params, inputs) != labels))


@pytest.mark.slow
@pytest.mark.parametrize(("norm", "epsilon"), [("linf", 0.15), ("l2", 1.0)])
def test_pgd_stays_in_the_ball_and_beats_one_step(white_box, norm, epsilon):
    """Measured: 10 steps fool the small MLP on 83% (L-inf 0.15) and 95% (L2 1.0) of 64 test inputs, one
    full step on 72% and 84%; the clean error is 3%."""
    model, params, inputs, labels = white_box
    iterated = pgd(epsilon=epsilon, step_size=epsilon / 4, steps=10, norm=norm)
    one_step = pgd(epsilon=epsilon, step_size=epsilon, steps=1, norm=norm, random_start=False)
    adversarial = iterated.craft(model, params, inputs, labels, jax.random.key(0))
    assert np.all(perturbation_norms(adversarial, inputs, norm) <= epsilon + 1e-5)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    single = one_step.craft(model, params, inputs, labels, jax.random.key(0))
    assert fooled_rate(model, params, adversarial, labels) > fooled_rate(model, params, single, labels)
    assert fooled_rate(model, params, adversarial, labels) >= 0.75


def small_cnn_params(rng):
    """Random parameters for ``CNN(channels=(4,), hidden=8)`` on 8x8 inputs, without Flax's init."""
    shapes = {"Conv_0": (3, 3, 1, 4), "Dense_0": (4 * 4 * 4, 8), "Dense_1": (8, 10)}
    layers = {
        name: {
            "kernel": rng.normal(0, 0.5, shape).astype(np.float32),
            "bias": np.zeros(shape[-1], np.float32),
        }
        for name, shape in shapes.items()
    }
    return {"params": layers}


class SteppedCNN(CNN):
    """The CNN stepped from Python even on 8x8 digits, as it is on large images."""

    looped_pixels: ClassVar[int] = 0


@pytest.mark.slow
def test_a_cnn_gets_the_same_examples_looped_or_stepped_from_python(digits_splits):
    looped, stepped = (
        CNN(num_classes=10, channels=(4,), hidden=8),
        SteppedCNN(num_classes=10, channels=(4,), hidden=8),
    )
    assert trains_in_compiled_loop(looped, (8, 8, 1)) and not trains_in_compiled_loop(stepped, (8, 8, 1))
    assert not trains_in_compiled_loop(looped, (28, 28, 1))
    params = small_cnn_params(np.random.default_rng(0))
    inputs, labels = digits_splits.test.x[:5], digits_splits.test.y[:5]
    attack = pgd(epsilon=0.2, step_size=0.05, steps=3, random_start=False)
    adversarial = attack.craft(looped, params, inputs, labels, jax.random.key(1))
    np.testing.assert_allclose(
        adversarial, attack.craft(stepped, params, inputs, labels, jax.random.key(1)), atol=1e-6
    )
    assert adversarial.shape == inputs.shape
    assert np.all(perturbation_norms(adversarial, inputs, "linf") <= 0.2 + 1e-5)
    loss = lambda x: -np.log(training.predict_proba(looped, params, x)[np.arange(5), labels]).sum()
    assert loss(adversarial) > loss(inputs), "the steps ascend the surrogate's loss"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"epsilon": 0}, "pgd: epsilon must be a number > 0, got 0"),
        ({"step_size": -1.0}, "pgd: step_size must be a number > 0"),
        ({"steps": 0}, "pgd: steps must be an integer >= 1, got 0"),
        ({"norm": "l1"}, "pgd: norm must be one of linf, l2; got 'l1'"),
        ({"random_start": "yes"}, "pgd: random_start must be true or false"),
        ({"count": 0}, "pgd: count must be an integer >= 1"),
    ],
)
def test_bad_parameters_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        pgd(**arguments)
