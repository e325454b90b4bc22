import math

import numpy as np
import pytest

from heistlab.defenses.leakage import (
    DEFAULT_ORDERS,
    answer_entropy,
    gnmax_rdp,
    log_probability_not_top,
    pate_privacy_cost,
)

CLASSES = 10
CONFIDENT = np.array([[0.97] + [0.03 / 9] * 9])
SPLIT = np.array([[0.5, 0.5] + [0.0] * 8])
UNIFORM = np.full((1, CLASSES), 1.0 / CLASSES)


def test_uniform_answer_costs_the_data_independent_bound():
    orders = np.asarray(DEFAULT_ORDERS)
    cost = pate_privacy_cost(sigma=40.0).per_answer(UNIFORM)[0]
    np.testing.assert_allclose(cost, orders / 40.0**2)


def test_confident_answers_cost_less_privacy_than_split_ones():
    leakage = pate_privacy_cost()
    confident, split = leakage.per_answer(CONFIDENT)[0], leakage.per_answer(SPLIT)[0]
    # Both reach the data-independent bound at the highest orders, where Theorem 6 no longer applies.
    assert np.all(confident <= split) and np.all(confident[:6] < split[:6] / 10)
    assert leakage.total(1000 * confident) < leakage.total(1000 * split) / 3


def test_entropy_of_answers_by_hand():
    costs = answer_entropy().per_answer(np.concatenate([UNIFORM, SPLIT, np.eye(CLASSES)[:1]]))
    np.testing.assert_allclose(costs[:, 0], [math.log(10), math.log(2), 0.0], atol=1e-12)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: pate_privacy_cost(teachers=1), "teachers must be an int >= 2, got 1"),
        (lambda: pate_privacy_cost(delta=1.5), r"delta must be a number in \(0, 1\), got 1.5"),
        (lambda: pate_privacy_cost(orders=(0.5, 2)), "orders must be finite numbers > 1"),
    ],
)
def test_bad_settings_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_gnmax_bound_on_answering_other_than_the_top_vote_by_hand():
    from heistlab.defenses.leakage import log_probability_not_top

    votes = np.array([200.0, 50.0] + [0.0] * 8)
    expected = 0.5 * math.erfc(150 / 80) + 8 * 0.5 * math.erfc(200 / 80)
    assert math.isclose(math.exp(log_probability_not_top(votes, 40.0)), expected, rel_tol=1e-9)


def test_epsilon_of_uniform_answers_is_the_data_independent_conversion():
    leakage = pate_privacy_cost(sigma=40.0, delta=1e-5)
    orders = np.asarray(DEFAULT_ORDERS)
    summed = 3 * leakage.per_answer(UNIFORM)[0]
    by_hand = min(3 * order / 1600 + math.log(1e5) / (order - 1) for order in orders)
    assert math.isclose(leakage.total(summed), by_hand, rel_tol=1e-12)


def varied_answers(rows: int, classes: int, seed: int) -> np.ndarray:
    """Answers from one-hot to uniform, with repeats and ties, that reach every branch of the GNMax bound."""
    rng = np.random.default_rng(seed)
    sharpness = rng.choice([0.0, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0], size=(rows, 1))
    logits = rng.normal(size=(rows, classes)) * sharpness
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    probs[::7] = probs[3]
    probs[1] = np.eye(classes)[2]
    probs[2] = 1.0 / classes
    probs[4, :2] = 0.5
    probs[4, 2:] = 0.0
    return probs.astype(np.float32)


@pytest.mark.parametrize(("teachers", "sigma"), [(250, 40.0), (1000, 10.0), (50, 5.0)])
def test_pate_cost_of_a_batch_equals_the_row_by_row_computation(teachers, sigma):
    probs = varied_answers(600, 10, seed=teachers)
    votes = np.asarray(probs, np.float64) * teachers
    orders = np.asarray(DEFAULT_ORDERS)
    expected = np.stack([gnmax_rdp(log_probability_not_top(row, sigma), sigma, orders) for row in votes])
    costs = pate_privacy_cost(teachers=teachers, sigma=sigma).per_answer(probs)
    np.testing.assert_array_equal(costs, expected)
    dependent = (costs != orders / sigma**2).any(axis=1)
    assert 0 < dependent.sum() < len(costs)
