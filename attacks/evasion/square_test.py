import jax
import numpy as np
import pytest

from heistlab.attacks.evasion import SCORE, square
from heistlab.attacks.evasion.base import perturbation_norms
from heistlab.attacks.evasion.conftest import LinearRule
from heistlab.attacks.evasion.square import margin_loss, propose, square_side, window_fraction


def test_margin_loss_by_hand():
    scores = np.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [1.0, 0.0, 0.0]])
    margins = margin_loss(scores, np.array([0, 2, 0]))
    # log(0.7 / 0.2); log(0.1 / 0.7); a zero score counts as float32's smallest normal, 2 ** -126.
    np.testing.assert_allclose(margins, [np.log(3.5), np.log(1 / 7), 126 * np.log(2)], rtol=1e-6)


def test_window_schedule_and_side_follow_the_paper():
    # Iteration 30 of 1000 is iteration 300 of the paper's 10,000: p_init / 8.
    assert [window_fraction(0.8, i, 1000) for i in (0, 1, 3, 30, 999)] == [0.8, 0.8, 0.4, 0.1, 0.8 / 512]
    assert square_side(0.3, 8, 8) == 4  # round(sqrt(0.3 * 64)) = round(4.38)
    assert square_side(1e-4, 8, 8) == 1 and square_side(1.0, 8, 8) == 7


def test_a_proposal_redraws_one_square_window_inside_the_ball():
    rng = np.random.default_rng(0)
    clean = rng.uniform(0.3, 0.7, size=(64, 8, 8, 1)).astype(np.float32)
    best = clean + rng.choice([-0.2, 0.2], size=(64, 1, 8, 1)).astype(np.float32)
    proposal = propose(clean, best, 0.2, 3, rng)
    assert np.all(perturbation_norms(proposal, clean, "linf") <= 0.2 + 1e-6)
    for changed in np.abs(proposal - best)[..., 0] > 1e-7:
        rows, columns = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        assert 1 <= len(rows) <= 3 and 1 <= len(columns) <= 3, "changes stay inside one 3x3 window"


def test_attack_crosses_a_linear_boundary_within_each_inputs_budget(constant_images):
    inputs, labels = constant_images
    rule = LinearRule()
    # The boundary is 0.2 away in L-inf (mean pixel 0.5 from 0.3): reachable at epsilon 0.25.
    result = square(epsilon=0.25, max_queries=300).craft(rule.oracle(), inputs, labels, jax.random.key(0))
    assert result.fooled.all() and np.all(result.adversarial.mean(axis=(1, 2, 3)) > 0.5)
    assert np.all(perturbation_norms(result.adversarial, inputs, "linf") <= 0.25 + 1e-6)
    assert np.all(result.queries <= 300) and rule.served == result.queries.sum()
    # One batch per step for every input still searching (in power-of-two pieces), never one per input.
    assert rule.batches <= 4 * result.queries.max()
    assert result.diagnostics["square_uninformative_answer_rate"] < 0.05


def test_an_out_of_reach_boundary_spends_exactly_the_budget(constant_images):
    inputs, labels = constant_images
    rule = LinearRule()
    result = square(epsilon=0.1, max_queries=50).craft(rule.oracle(), inputs, labels, jax.random.key(0))
    assert not result.fooled.any() and np.all(result.queries == 50) and rule.served == 8 * 50


def test_label_answers_are_refused_with_the_alternative_named(constant_images):
    with pytest.raises(ValueError, match="needs scores.*use evasion=hopskipjump"):
        square().craft(LinearRule(output="labels").oracle(), *constant_images, jax.random.key(0))


def test_factory_describes_a_score_attack_and_names_bad_values():
    attack = square(epsilon=0.1, max_queries=40, count=3)
    assert (attack.kind, attack.queries_per_input, attack.count, attack.norm) == (SCORE, 40, 3, "linf")
    with pytest.raises(ValueError, match="square: max_queries must be an integer >= 2, got 1"):
        square(max_queries=1)
    with pytest.raises(ValueError, match=r"square: p_init must be in \(0, 1\], got 1.5"):
        square(p_init=1.5)


def test_the_search_stops_before_the_budget_is_passed(constant_images):
    inputs, labels = constant_images
    rule = LinearRule(cap=100)
    result = square(epsilon=0.25, max_queries=300).craft(rule.oracle(), inputs, labels, jax.random.key(0))
    assert result.diagnostics["evasion_stopped_early"] and rule.served <= 100 and rule.refused == 0
    assert rule.served == result.queries.sum()
    assert np.all(perturbation_norms(result.adversarial, inputs, "linf") <= 0.25 + 1e-6)


def test_a_fixed_seed_reproduces_the_pinned_queries_and_examples(constant_images):
    # Pinned before Square's start and schedule were shared with the adaptive attack: seed 0.
    result = square(epsilon=0.25, max_queries=120).craft(
        LinearRule(cap=900).oracle(), *constant_images, jax.random.key(0)
    )
    assert result.queries.tolist() == [95, 2, 46, 86, 96, 115, 44, 59]
    total = float(np.asarray(result.adversarial, np.float64).sum())
    assert total == pytest.approx(258.6000061035156, rel=1e-7)
