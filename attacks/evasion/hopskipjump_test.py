import jax
import numpy as np
import pytest

from heistlab.attacks.evasion import DECISION, hopskipjump
from heistlab.attacks.evasion.base import perturbation_norms
from heistlab.attacks.evasion.conftest import LinearRule
from heistlab.attacks.evasion.hopskipjump import Decisions, boundary_search, gradient_direction, project

# d = 64 pixels: theta = 1 / 64 ** 1.5 = 1 / 512 for L2 (gamma 1).
THETA = 1 / 512


def test_projection_by_hand():
    clean, far = np.zeros((1, 2, 2, 1)), np.array([0.2, 0.4, 0.8, 1.0]).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(np.ravel(project(clean, far, np.array([0.25]), "l2")), [0.05, 0.1, 0.2, 0.25])
    np.testing.assert_allclose(np.ravel(project(clean, far, np.array([0.3]), "linf")), [0.2, 0.3, 0.3, 0.3])


def test_boundary_search_stops_within_theta_on_the_adversarial_side(constant_images):
    inputs, labels = constant_images
    decisions = Decisions(LinearRule().oracle(), labels, max_queries=100, query_batch=4096)
    owners = np.arange(len(inputs))
    # From 0.3 toward 0.9 everywhere the rule flips at a third of the way (mean pixel 0.5).
    found = boundary_search(decisions, inputs, np.full_like(inputs, 0.9), owners, THETA, "l2")
    fraction = (found.mean(axis=(1, 2, 3)) - 0.3) / 0.6
    assert np.all((fraction > 1 / 3) & (fraction <= 1 / 3 + THETA + 1e-6))
    assert np.all(decisions.queries == 9)  # ceil(log2(512)) halvings


def test_gradient_estimate_points_along_the_boundary_normal():
    at_boundary = np.full((2, 8, 8, 1), 0.5, np.float32)
    decisions = Decisions(LinearRule().oracle(), np.zeros(2, np.int64), max_queries=1000, query_batch=4096)
    rng = np.random.default_rng(0)
    direction = gradient_direction(
        decisions, at_boundary, np.arange(2), np.array([200, 200]), np.array([0.1, 0.1]), "l2", rng
    )
    # The rule's normal is the constant image; the mean-sign baseline makes the estimate sharper.
    cosine = direction.reshape(2, -1).sum(axis=1) / np.sqrt(64)
    assert np.all(cosine > 0.7) and np.all(decisions.queries == 200)


@pytest.mark.parametrize(("norm", "optimum"), [("l2", 0.2 * 8), ("linf", 0.2)])
def test_attack_approaches_the_nearest_boundary_point_from_labels_alone(constant_images, norm, optimum):
    inputs, labels = constant_images
    rule = LinearRule(output="labels")
    attack = hopskipjump(epsilon=optimum / 2, norm=norm, max_queries=1000, initial_evaluations=50)
    result = attack.craft(rule.oracle(), inputs, labels, jax.random.key(0))
    distances = perturbation_norms(result.adversarial, inputs, norm)
    # Measured: within 10% (L2) and 15% (L-inf) of the nearest point after about 900 queries each.
    assert np.all(distances >= optimum - 1e-4) and np.all(distances <= 1.15 * optimum)
    assert np.all(result.adversarial.mean(axis=(1, 2, 3)) > 0.5) and result.fooled.all()
    assert np.all(result.queries <= 1000) and rule.served == result.queries.sum()


def test_inputs_stop_at_epsilon_and_report_their_queries_then(constant_images):
    inputs, labels = constant_images
    rule = LinearRule(output="labels")
    result = hopskipjump(epsilon=2.5, max_queries=1000).craft(
        rule.oracle(), inputs, labels, jax.random.key(1)
    )
    assert np.all(perturbation_norms(result.adversarial, inputs, "l2") <= 2.5)
    # The start plus one boundary search (about 20 queries) or one more iteration (100 probes, a few steps,
    # 9 halvings) reach 2.5; nobody spends a second gradient estimate.
    assert np.all(result.queries < 20 + 100 + 30 + 9) and rule.served == result.queries.sum()


def test_factory_describes_a_decision_attack_and_names_bad_values():
    attack = hopskipjump(epsilon=0.5, norm="linf", max_queries=300, count=4)
    assert (attack.kind, attack.queries_per_input, attack.count, attack.norm) == (DECISION, 300, 4, "linf")
    with pytest.raises(ValueError, match="hopskipjump: norm must be one of linf, l2; got 'l1'"):
        hopskipjump(norm="l1")
    with pytest.raises(ValueError, match="hopskipjump: gamma must be a number > 0, got 0"):
        hopskipjump(gamma=0)


def test_a_refusing_api_ends_the_search_on_adversarial_points(constant_images):
    inputs, labels = constant_images
    rule = LinearRule(output="labels", refuse_after=300)
    result = hopskipjump(epsilon=0.5, max_queries=1000).craft(
        rule.oracle(), inputs, labels, jax.random.key(0)
    )
    assert result.diagnostics["evasion_stopped_early"] and rule.served <= 300 and rule.refused > 0
    assert result.fooled.any() and np.all(result.adversarial[result.fooled].mean(axis=(1, 2, 3)) > 0.5)


@pytest.mark.parametrize(
    ("norm", "epsilon", "queries", "total"),
    [
        ("l2", 1.7, [92, 88, 88, 88, 88, 90, 88, 88], 256.18569833785295),
        ("linf", 0.1, [101, 97, 97, 97, 97, 99, 97, 97], 256.0192769765854),
    ],
)
def test_a_fixed_seed_reproduces_the_pinned_queries_and_examples(
    constant_images, norm, epsilon, queries, total
):
    # Pinned before the blend and boundary searches shared one bisection: seed 0, until a cap of 900 queries.
    attack = hopskipjump(epsilon=epsilon, norm=norm, max_queries=300, initial_evaluations=20)
    result = attack.craft(LinearRule(cap=900).oracle(), *constant_images, jax.random.key(0))
    assert result.queries.tolist() == queries
    assert float(np.asarray(result.adversarial, np.float64).sum()) == pytest.approx(total, rel=1e-7)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_inputs_whose_noise_never_fools_the_api_keep_their_clean_point(constant_images, norm):
    inputs, labels = constant_images
    never = LinearRule(threshold=2.0)  # no input in [0, 1] reaches class 1
    result = hopskipjump(norm=norm, max_queries=50, init_trials=5).craft(
        never.oracle(), inputs, labels, jax.random.key(0)
    )
    np.testing.assert_array_equal(result.adversarial, inputs)
    assert result.queries.tolist() == [5] * 8 and not result.fooled.any()
    assert result.diagnostics["hopskipjump_start_found_rate"] == 0.0
