import jax.numpy as jnp
import numpy as np
import pytest

from heistlab.defenses.adaptive_misinformation import (
    adaptive_misinformation,
    misinform,
    misinformation_targets,
)
from heistlab.defenses.base import DefenderData


def test_the_mix_by_hand():
    probs = jnp.array([[0.9, 0.1], [0.4, 0.6]])
    misinformation = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    # a steep switch at tau = 0.7: the confident row is kept, the unconfident one replaced
    np.testing.assert_allclose(
        misinform(probs, misinformation, 0.7, 1e4), [[0.9, 0.1], [1.0, 0.0]], atol=1e-6
    )
    # nu = 10: a = sigmoid(10 * (0.7 - 0.6)) = sigmoid(1) = 0.731059 for the second row
    weight = 1 / (1 + np.exp(-1.0))
    expected = (1 - weight) * np.array([0.4, 0.6]) + weight * np.array([1.0, 0.0])
    np.testing.assert_allclose(misinform(probs, misinformation, 0.7, 10.0)[1], expected, rtol=1e-5)


def test_targets_put_no_mass_on_the_true_class():
    targets = misinformation_targets(np.array([0, 2]), 3)
    np.testing.assert_allclose(targets, [[0.0, 0.5, 0.5], [0.5, 0.5, 0.0]])


def test_requires_the_defender_data():
    with pytest.raises(ValueError, match="adaptive_misinformation: defender must be a DefenderData"):
        adaptive_misinformation()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": 1.5}, "tau must be a number in"),
        ({"nu": 0.0}, "nu must be a finite number > 0, got 0.0"),
        ({"hidden": []}, "hidden must be a non-empty list of ints >= 1"),
        ({"epochs": 0}, "epochs must be an int >= 1, got 0"),
    ],
)
def test_rejects_bad_parameters(kwargs, message):
    defender = DefenderData(np.zeros((2, 1)), np.zeros(2, np.int32), (1,), 2, 0)
    with pytest.raises(ValueError, match=f"adaptive_misinformation: {message}"):
        adaptive_misinformation(defender, **kwargs)
