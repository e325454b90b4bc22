import math

import jax
import numpy as np
import pytest

from heistlab.api import Oracle, QueryRefused
from heistlab.attacks.evasion import adaptive_hopskipjump, adaptive_square, hopskipjump, square
from heistlab.attacks.evasion.base import perturbation_norms
from heistlab.attacks.evasion.conftest import SHAPE, LinearRule
from heistlab.defenses.base import Request
from heistlab.defenses.blacklight import blacklight


class Detected:
    """A linear rule behind Blacklight with action=refuse (flagged requests refused), requests counted.

    ``refuse_all`` refuses every request instead (``retry_after``: how the refusal reads to the attacker).
    """

    def __init__(self, refuse_all=False, retry_after=0.0, output="probabilities"):
        self.rule = LinearRule(output=output)
        self.defense = blacklight(50.0, 12, 1, 50, 25, action="refuse")
        self.state = self.defense.init()
        self.refuse_all, self.retry_after = refuse_all, retry_after
        self.requests, self.rows_per_request = 0, set()

    def answer(self, inputs):
        self.requests += 1
        self.rows_per_request.add(len(inputs))
        if self.refuse_all:
            raise QueryRefused("evader", len(inputs), None, "refused", self.retry_after)
        verdict, self.state = self.defense.admit(self.state, Request("evader", len(inputs), 0.0, inputs))
        if not verdict.admitted:
            raise QueryRefused("evader", len(inputs), None, verdict.reason, verdict.delay)
        return self.rule.answer(inputs)

    def oracle(self):
        return Oracle(self.answer, lambda: None, SHAPE, 2, self.rule.output, ("evader",))


@pytest.fixture
def varied_images():
    """Eight 8x8 images around 0.3 (class 0 for the rule, 0.2 from its boundary in L-inf), not all alike."""
    rng = np.random.default_rng(0)
    images = np.clip(0.3 + rng.uniform(-0.1, 0.1, size=(8, *SHAPE)), 0, 1).astype(np.float32)
    return images, np.zeros(8, np.int64)


@pytest.mark.slow
def test_adaptive_square_keeps_going_where_blacklight_stops_the_plain_attack(varied_images):
    inputs, labels = varied_images
    plain_api, adaptive_api = Detected(), Detected()
    plain = square(epsilon=0.25, max_queries=300).craft(plain_api.oracle(), inputs, labels, jax.random.key(0))
    adaptive = adaptive_square(epsilon=0.25, max_queries=300).craft(
        adaptive_api.oracle(), inputs, labels, jax.random.key(0)
    )
    assert plain.diagnostics["evasion_stopped_early"] and plain.fooled.mean() < 0.5
    assert not adaptive.diagnostics["evasion_stopped_early"]
    assert adaptive.fooled.sum() >= plain.fooled.sum() + 2
    assert adaptive.diagnostics["adaptive_mean_scale"] > 1  # refusals made its proposals redraw more
    assert adaptive_api.rows_per_request == {1}  # each query its own request
    assert np.all(perturbation_norms(adaptive.adversarial, inputs, "linf") <= 0.25 + 1e-5)


@pytest.mark.slow
def test_adaptive_hopskipjump_keeps_going_where_blacklight_stops_the_plain_attack(varied_images):
    inputs, labels = varied_images
    settings = dict(epsilon=1.7, max_queries=400, initial_evaluations=20)
    plain = hopskipjump(**settings).craft(Detected().oracle(), inputs, labels, jax.random.key(0))
    adaptive_api = Detected()
    attack = adaptive_hopskipjump(**settings)
    adaptive = attack.craft(adaptive_api.oracle(), inputs, labels, jax.random.key(0))
    assert plain.diagnostics["evasion_stopped_early"] and not plain.fooled.any()
    assert not adaptive.diagnostics["evasion_stopped_early"] and adaptive.fooled.all()
    assert 0 < adaptive.diagnostics["adaptive_refused_rate"] < 0.5
    assert adaptive_api.rows_per_request == {1} and np.all(adaptive.queries <= 400)


@pytest.mark.slow
@pytest.mark.parametrize("build", [adaptive_square, adaptive_hopskipjump])
def test_refused_queries_count_against_each_inputs_budget(build, varied_images):
    inputs, labels = varied_images
    api = Detected(refuse_all=True)
    result = build(max_queries=40, max_resamples=5).craft(api.oracle(), inputs, labels, jax.random.key(0))
    assert api.requests == 8 * 40 and np.all(result.queries == 40)
    assert result.diagnostics["adaptive_refused_rate"] == 1.0
    assert not result.fooled.any()


@pytest.mark.parametrize("build", [adaptive_square, adaptive_hopskipjump])
def test_a_ban_ends_the_attack_at_once(build, varied_images):
    inputs, labels = varied_images
    api = Detected(refuse_all=True, retry_after=math.inf)
    result = build(max_queries=40).craft(api.oracle(), inputs, labels, jax.random.key(0))
    assert api.requests == 1 and result.diagnostics["evasion_stopped_early"]


@pytest.mark.slow
def test_adaptive_hopskipjump_without_refusals_is_hopskipjump(varied_images):
    inputs, labels = varied_images
    api = Detected()
    api.defense = blacklight(50.0, 12, 1, 50, 50, action="refuse")  # needs every hash shared: exact re-sends
    api.state = api.defense.init()
    result = adaptive_hopskipjump(epsilon=1.7, max_queries=400, initial_evaluations=20).craft(
        api.oracle(), inputs, labels, jax.random.key(0)
    )
    # The L2 distance to the boundary is 0.2 * 8 = 1.6 from a constant 0.3 image; these images are near that.
    assert result.fooled.mean() >= 0.75 and np.all(result.queries <= 400)


@pytest.mark.parametrize(
    ("build", "arguments", "message"),
    [
        (adaptive_square, dict(growth=1.0), "adaptive_square: growth must be a number > 1"),
        (adaptive_square, dict(max_resamples=-1), "adaptive_square: max_resamples must be an integer >= 0"),
        (adaptive_square, dict(p_init=1.5), r"adaptive_square: p_init must be in \(0, 1\]"),
        (adaptive_hopskipjump, dict(growth=0.5), "adaptive_hopskipjump: growth must be a number > 1"),
        (adaptive_hopskipjump, dict(initial_scale=2.0), r"adaptive_hopskipjump: initial_scale must be in"),
        (adaptive_hopskipjump, dict(norm="l1"), "adaptive_hopskipjump: norm must be one of linf, l2"),
    ],
)
def test_bad_settings_name_what_is_wrong(build, arguments, message):
    with pytest.raises(ValueError, match=message):
        build(**arguments)


def test_adaptive_square_refuses_an_api_that_serves_labels(varied_images):
    inputs, labels = varied_images
    api = Detected(output="labels")
    with pytest.raises(ValueError, match=r"adaptive_square: the API serves labels \(api.output=labels\)"):
        adaptive_square().craft(api.oracle(), inputs, labels, jax.random.key(0))
    assert api.requests == 0


# Pinned from the attacks as they were before their shared parts were factored out (rejection sampling's
# tries, Square's start and schedule, HopSkipJump's bisection and settings): each input's queries and the
# sum of the adversarial examples, seed 0. A change to any query or random draw shows here.
PINNED = {
    "adaptive_square": (
        lambda: adaptive_square(epsilon=0.25, max_queries=150),
        [150, 1, 150, 150, 150, 150, 150, 150],
        239.74845877289772,
    ),
    "adaptive_hopskipjump_l2": (
        lambda: adaptive_hopskipjump(epsilon=1.7, max_queries=250, initial_evaluations=20),
        [223, 218, 217, 216, 216, 218, 220, 220],
        255.87717171385884,
    ),
    "adaptive_hopskipjump_linf": (
        lambda: adaptive_hopskipjump(epsilon=0.1, norm="linf", max_queries=250, initial_evaluations=20),
        [250, 250, 250, 248, 245, 250, 248, 250],
        254.25320637226105,
    ),
    "square": (
        lambda: square(epsilon=0.25, max_queries=120),
        [2, 1, 2, 2, 2, 2, 2, 2],
        191.97690704464912,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PINNED))
def test_a_fixed_seed_reproduces_the_pinned_queries_and_examples_through_blacklight(name, varied_images):
    build, queries, total = PINNED[name]
    result = build().craft(Detected().oracle(), *varied_images, jax.random.key(0))
    assert result.queries.tolist() == queries
    assert float(np.asarray(result.adversarial, np.float64).sum()) == pytest.approx(total, rel=1e-7)
