import jax
import numpy as np
import pytest

from heistlab.attacks.evasion import TRANSFER, fgsm, pgd


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_is_one_full_step_of_pgd_without_random_start(small_victim, digits_splits, norm):
    inputs, labels = digits_splits.test.x[:32], digits_splits.test.y[:32]
    model, params = small_victim.model, small_victim.params
    one_step = fgsm(epsilon=0.2, norm=norm).craft(model, params, inputs, labels, jax.random.key(0))
    same = pgd(epsilon=0.2, step_size=0.2, steps=1, norm=norm, random_start=False)
    np.testing.assert_array_equal(one_step, same.craft(model, params, inputs, labels, jax.random.key(5)))


def test_linf_step_moves_every_pixel_by_epsilon_unless_clipped(small_victim, digits_splits):
    inputs, labels = digits_splits.test.x[:32], digits_splits.test.y[:32]
    adversarial = fgsm(epsilon=0.3).craft(
        small_victim.model, small_victim.params, inputs, labels, jax.random.key(0)
    )
    moved = np.abs(adversarial - inputs)
    inside = (inputs >= 0.3) & (inputs <= 0.7)  # pixels that neither bound can clip
    np.testing.assert_allclose(moved[inside], 0.3, atol=1e-6)


def test_factory_describes_a_transfer_attack_and_names_bad_values():
    attack = fgsm(epsilon=0.3, norm="l2", count=10)
    assert (attack.kind, attack.count, attack.queries_per_input, attack.norm) == (TRANSFER, 10, 1, "l2")
    with pytest.raises(ValueError, match="fgsm: epsilon must be a number > 0, got -0.1"):
        fgsm(epsilon=-0.1)
    with pytest.raises(ValueError, match="fgsm: norm must be one of linf, l2; got 'l0'"):
        fgsm(norm="l0")
