import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from heistlab.defenses.backdoor_watermark import backdoor_watermark, trigger_set
from heistlab.defenses.base import DefenderData, Evidence, QueryContext

DEFENDER = DefenderData(np.zeros((5, 4, 4, 1), np.float32), np.arange(5, dtype=np.int32), (4, 4, 1), 10, 3)


def test_trigger_set_is_drawn_from_the_seed():
    triggers = trigger_set((4, 4, 1), 10, 100, seed=3)
    assert triggers.x.shape == (100, 4, 4, 1) and triggers.x.dtype == np.float32
    assert triggers.x.min() >= 0.0 and triggers.x.max() <= 1.0
    assert set(np.unique(triggers.y)) <= set(range(10)) and len(np.unique(triggers.y)) > 5
    np.testing.assert_array_equal(triggers.x, trigger_set((4, 4, 1), 10, 100, seed=3).x)
    assert not np.array_equal(triggers.y, trigger_set((4, 4, 1), 10, 100, seed=4).y)


def test_augment_training_appends_the_triggers():
    defense = backdoor_watermark(DEFENDER, trigger_count=7, repeats=2)
    x, y = defense.augment_training(DEFENDER.x, DEFENDER.y)
    triggers = trigger_set((4, 4, 1), 10, 7, seed=3)
    assert x.shape == (5 + 14, 4, 4, 1) and y.dtype == DEFENDER.y.dtype
    np.testing.assert_array_equal(x[:5], DEFENDER.x)
    np.testing.assert_array_equal(x[5:12], triggers.x)
    np.testing.assert_array_equal(y[12:], triggers.y)


def test_serves_the_victim_unchanged():
    defense = backdoor_watermark(DEFENDER)
    probs = jnp.full((2, 10), 0.1)
    served, _ = jax.jit(defense.apply)(
        probs, defense.init(), QueryContext(jnp.zeros((2, 4, 4, 1)), jax.random.key(0))
    )
    np.testing.assert_array_equal(served, probs)


def test_report_by_hand():
    defense = backdoor_watermark(DEFENDER, trigger_count=20, seed=9)
    triggers = trigger_set((4, 4, 1), 10, 20, seed=9)
    half_right = triggers.y.copy()
    half_right[10:] = (half_right[10:] + 1) % 10
    evidence = Evidence(
        surrogate_labels=lambda x: half_right,
        independent_labels=lambda x: (triggers.y + 1) % 10,
        victim_labels=lambda x: triggers.y,
        attackers=("attacker",),
        benign=(),
    )
    found = defense.report(defense.init(), evidence)
    assert found["backdoor_watermark_accuracy"] == 1.0
    np.testing.assert_allclose(found["backdoor_watermark_p_value"], 0.1**20)
    assert found["backdoor_watermark_accuracy_surrogate"] == 0.5
    np.testing.assert_allclose(found["backdoor_watermark_p_value_surrogate"], stats.binom.sf(9, 20, 0.1))
    assert found["backdoor_watermark_accuracy_independent"] == 0.0
    assert found["backdoor_watermark_p_value_independent"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"defender": None}, "defender must be a DefenderData"),
        ({"trigger_count": 0}, "trigger_count must be an int >= 1, got 0"),
        ({"repeats": 1.5}, "repeats must be an int >= 1, got 1.5"),
        ({"seed": "secret"}, "seed must be an int or null, got 'secret'"),
    ],
)
def test_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=f"backdoor_watermark: {message}"):
        backdoor_watermark(**{"defender": DEFENDER, **kwargs})
