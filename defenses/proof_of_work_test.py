from typing import NamedTuple

import jax
import numpy as np
import pytest

from heistlab.api import PredictionAPI
from heistlab.defenses import chain, rounding
from heistlab.defenses.base import Evidence, QueryContext, Request
from heistlab.defenses.leakage import (
    DEFAULT_ORDERS,
    Leakage,
    answer_entropy,
    gnmax_rdp,
    log_probability_not_top,
    pate_privacy_cost,
)
from heistlab.defenses.proof_of_work import next_bits, proof_of_work

CLASSES = 10
CONFIDENT = np.array([[0.97] + [0.03 / 9] * 9])
SPLIT = np.array([[0.5, 0.5] + [0.0] * 8])
UNIFORM = np.full((1, CLASSES), 1.0 / CLASSES)


def serve(defense, state, client, probs):
    verdict, state = defense.admit(state, Request(client, len(probs), 0.0))
    context = QueryContext(np.zeros((len(probs), 1)), jax.random.key(0), client)
    _, state = defense.apply(probs, state, context)
    return verdict.delay, state


def test_difficulty_rises_with_the_clients_leakage():
    defense = proof_of_work(answer_entropy(), base_bits=4, leakage_unit=1.0, hashes_per_second=16.0)
    state = defense.init()
    first_delays = {}
    for client, probs in (("honest", CONFIDENT), ("harvester", UNIFORM)):
        first_delays[client], state = serve(defense, state, client, np.repeat(probs, 3, axis=0))
    # A first batch of 3 rows at base difficulty: 3 * 2^4 hashes at 16 hashes per second.
    assert first_delays == {"honest": 3.0, "harvester": 3.0}
    # 3 * log(10) = 6.9 nats leaked: 4 + floor(log2(1 + 6.9)) = 6 bits; 3 * 0.2 nats: still 4.
    assert next_bits(state, "harvester") == 6
    assert next_bits(state, "honest") == 4
    harvester_delay, _ = serve(defense, state, "harvester", UNIFORM)
    honest_delay, _ = serve(defense, state, "honest", CONFIDENT)
    assert harvester_delay == 2.0**6 / 16.0 and honest_delay == 2.0**4 / 16.0


def test_max_bits_caps_the_difficulty():
    defense = proof_of_work(answer_entropy(), base_bits=2, leakage_unit=0.01, max_bits=5)
    _, state = serve(defense, defense.init(), "harvester", np.repeat(UNIFORM, 50, axis=0))
    assert next_bits(state, "harvester") == 5


class StubVictim(NamedTuple):
    """Answers confidently on inputs below 0.5, uniformly above: leakage depends on where one queries."""

    input_shape: tuple = (1,)
    num_classes: int = CLASSES

    def predict_proba(self, inputs):
        return np.where(np.asarray(inputs)[:, :1] < 0.5, CONFIDENT, UNIFORM).astype(np.float32)


def test_simulated_cost_through_the_api_is_higher_for_the_leaking_client():
    defense = proof_of_work(pate_privacy_cost(), base_bits=10, leakage_unit=0.1, hashes_per_second=1024.0)
    api = PredictionAPI(StubVictim(), defense, key=jax.random.key(0))
    for _ in range(20):
        api.query(np.full((8, 1), 0.1, np.float32), client="benign-0")
        api.query(np.full((8, 1), 0.9, np.float32), client="attacker")
    # The first batch costs 8 rows at 2^10 hashes and 1024 hashes per second each, for both.
    assert api.simulated_seconds("benign-0") >= 8.0
    assert api.simulated_seconds("attacker") > 2 * api.simulated_seconds("benign-0")
    labels = lambda x: np.zeros(len(x), int)
    report = api.report(Evidence(labels, labels, labels, ("attacker",), ("benign-0",)))
    assert report["proof_of_work_attacker_seconds"] == api.simulated_seconds("attacker")
    assert report["proof_of_work_benign_seconds"] == api.simulated_seconds("benign-0")
    assert report["proof_of_work_attacker_overhead"] > report["proof_of_work_benign_overhead"] >= 1.0
    assert report["proof_of_work_attacker_bits"] > report["proof_of_work_benign_bits"]


def test_next_bits_finds_the_proof_of_work_inside_a_chain():
    defense = chain(rounding(2), proof_of_work(answer_entropy(), base_bits=3))
    state = defense.init()
    assert next_bits(state, "anyone") == 3
    assert next_bits(rounding(2).init(), "anyone") is None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: proof_of_work(base_bits=-1), r"base_bits must be an int in \[0, 64\], got -1"),
        (lambda: proof_of_work(base_bits=8, max_bits=4), r"max_bits must be an int in \[base_bits=8, 128\]"),
        (lambda: proof_of_work(leakage_unit=0.0), "leakage_unit must be a finite number > 0, got 0.0"),
        (lambda: proof_of_work(hashes_per_second=-5), "hashes_per_second must be a finite number > 0"),
        (lambda: proof_of_work(leakage="entropy"), "leakage must be heistlab.defenses.leakage.pate_privacy"),
    ],
)
def test_bad_settings_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def row_by_row_pate_cost() -> Leakage:
    """PATE's privacy cost at its defaults computed one answer at a time (the straightforward definition)."""
    fast = pate_privacy_cost()
    orders = np.asarray(DEFAULT_ORDERS)

    def per_answer(probs):
        votes = np.asarray(probs, np.float64) * 250
        return np.stack([gnmax_rdp(log_probability_not_top(row, 40.0), 40.0, orders) for row in votes])

    return Leakage(per_answer, fast.total, fast.name)


def test_accounts_delays_and_reports_equal_those_of_row_by_row_costs():
    rng = np.random.default_rng(0)
    pool = np.concatenate(
        [np.repeat(CONFIDENT, 5, 0), np.repeat(SPLIT, 5, 0), UNIFORM, rng.dirichlet([0.3] * 10, 40)]
    )
    settings = dict(base_bits=6, leakage_unit=0.05, hashes_per_second=1e3)
    fast, reference = proof_of_work(**settings), proof_of_work(row_by_row_pate_cost(), **settings)
    fast_state, reference_state = fast.init(), reference.init()
    for step in range(12):
        client = ("attacker", "benign", "benign2")[step % 3]
        probs = pool[rng.integers(0, len(pool), size=int(rng.integers(1, 300)))].astype(np.float32)
        fast_delay, fast_state = serve(fast, fast_state, client, probs)
        reference_delay, reference_state = serve(reference, reference_state, client, probs)
        assert fast_delay == reference_delay
    for name, work in reference_state.clients.items():
        fast_work = fast_state.clients[name]
        np.testing.assert_array_equal(fast_work.leakage, work.leakage)
        assert fast_work[1:] == work[1:]
    roles = Evidence(None, None, None, ("attacker",), ("benign", "benign2"), ())
    assert fast.report(fast_state, roles) == reference.report(reference_state, roles)
    assert len({work.next_bits for work in fast_state.clients.values()}) > 1
