"""The prediction API: hard budget cap, per-query records, validation, output kinds, defense applied."""

from __future__ import annotations

import hashlib

import jax
import numpy as np
import pytest

from heistlab.api import InvalidQuery, PredictionAPI, QueryRefused
from heistlab.defenses import identity, label_only


@pytest.fixture
def api(small_victim):
    return PredictionAPI(small_victim, identity(), key=jax.random.key(0), budget=10)


def test_budget_is_a_hard_cap_and_a_crossing_batch_is_refused_whole(api, digits_splits):
    x = digits_splits.test.x
    api.query(x[:8])
    with pytest.raises(QueryRefused) as refused:
        api.query(x[8:11])
    assert refused.value.remaining == 2 and refused.value.requested == 3
    assert api.served("attacker") == 8 and api.refused("attacker") == 3
    api.query(x[8:10])
    assert api.remaining("attacker") == 0
    with pytest.raises(QueryRefused):
        api.query(x[:1])
    assert api.served("attacker") == 10


def test_budgets_are_per_client(api, digits_splits):
    api.query(digits_splits.test.x[:10], client="alice")
    assert api.remaining("alice") == 0
    assert api.query(digits_splits.test.x[:10], client="bob").shape == (10, 10)


def test_every_query_is_recorded_with_sequence_digest_and_outcome(api, digits_splits):
    x = digits_splits.test.x[:12]
    api.query(x[:6])
    with pytest.raises(QueryRefused):
        api.query(x[6:12])
    assert [record.sequence for record in api.records] == list(range(12))
    assert [record.served for record in api.records] == [True] * 6 + [False] * 6
    assert {record.reason for record in api.records[6:]} == {"budget"}
    assert api.records[0].input_digest == hashlib.sha256(x[0].tobytes()).hexdigest()


def test_served_probabilities_equal_the_victims_without_defense(api, small_victim, digits_splits):
    x = digits_splits.test.x[:5]
    np.testing.assert_allclose(api.query(x), small_victim.predict_proba(x), atol=1e-6)


@pytest.mark.parametrize(
    ("bad_input", "message"),
    [
        (np.zeros((3, 8, 8), np.float32), "must be shaped"),
        (np.zeros((8, 8, 1), np.float32), "must be shaped"),
        (np.zeros((2, 8, 8, 1), np.int64), "floating point"),
        (np.full((2, 8, 8, 1), np.nan, np.float32), "NaN"),
        (np.full((2, 8, 8, 1), 1.5, np.float32), r"lie in \[0.0, 1.0\]"),
        (np.zeros((0, 8, 8, 1), np.float32), "empty"),
        ([["not", "numbers"]], "floating point"),
    ],
)
def test_malformed_input_gets_a_clear_error_and_is_not_served(api, bad_input, message):
    with pytest.raises(InvalidQuery, match=message):
        api.query(bad_input)
    assert api.served("attacker") == 0
    assert api.records[-1].reason == "invalid"


def test_max_batch_is_enforced(small_victim, digits_splits):
    api = PredictionAPI(small_victim, identity(), key=jax.random.key(0), max_batch=4)
    with pytest.raises(InvalidQuery, match="maximum batch size 4"):
        api.query(digits_splits.test.x[:5])


def test_output_kinds(small_victim, digits_splits):
    x = digits_splits.test.x[:7]
    probs = small_victim.predict_proba(x)
    labels = PredictionAPI(small_victim, identity(), key=jax.random.key(0), output="labels").query(x)
    assert labels.dtype == np.int32 and np.array_equal(labels, probs.argmax(-1))
    top2 = PredictionAPI(small_victim, identity(), key=jax.random.key(0), output="top_k", top_k=2).query(x)
    assert np.all((top2 > 0).sum(-1) <= 2)
    kept = np.sort(probs, axis=-1)[:, -2:]
    np.testing.assert_allclose(np.sort(top2, axis=-1)[:, -2:], kept, atol=1e-6)
    with pytest.raises(ValueError, match="api.output must be one of probabilities, top_k, labels"):
        PredictionAPI(small_victim, identity(), key=jax.random.key(0), output="logits")


def test_defense_is_applied_to_what_clients_see(small_victim, digits_splits):
    api = PredictionAPI(small_victim, label_only(), key=jax.random.key(0))
    served = api.query(digits_splits.test.x[:9])
    assert set(np.unique(served)) <= {0.0, 1.0} and np.all(served.sum(-1) == 1)


def test_oracle_handle_exposes_queries_and_budget_only(api, digits_splits):
    oracle = api.oracle("attacker")
    assert not hasattr(oracle, "__dict__")
    assert not any("victim" in name or "params" in name for name in dir(oracle))
    assert oracle.remaining == 10
    oracle.query(digits_splits.test.x[:4])
    assert oracle.remaining == 6 and api.served("attacker") == 4


def counting_admission(delay_per_row: float, refuse_client: str | None = None):
    """An admission defense: each row costs ``delay_per_row`` simulated seconds; one client is refused."""
    from heistlab.defenses import Verdict

    def admit(state, request):
        if request.client == refuse_client:
            return Verdict(admitted=False, delay=9.0, reason="blocked"), state
        return Verdict(admitted=True, delay=delay_per_row * request.size), state

    return identity()._replace(admit=admit)


def test_admission_delays_advance_the_clients_simulated_clock(small_victim, digits_splits):
    api = PredictionAPI(small_victim, counting_admission(0.5, "mallory"), key=jax.random.key(0))
    api.query(digits_splits.test.x[:4], client="alice")
    api.query(digits_splits.test.x[:2], client="alice")
    assert api.simulated_seconds("alice") == 3.0 and api.simulated_seconds("bob") == 0.0
    with pytest.raises(QueryRefused) as refused:
        api.query(digits_splits.test.x[:2], client="mallory")
    assert refused.value.reason == "blocked" and refused.value.retry_after == 9.0
    assert api.refused("mallory") == 2 and api.records[-1].reason == "blocked"


def test_host_defenses_see_the_client_and_its_clock(small_victim, digits_splits):
    seen = []

    def apply(probs, state, context):
        seen.append((context.client, context.now))
        return probs, state + 1

    host = identity()._replace(init=lambda: 0, apply=apply, host=True)
    api = PredictionAPI(small_victim, host, key=jax.random.key(0))
    api.query(digits_splits.test.x[:3], client="carol")
    api.query(digits_splits.test.x[:3], client="dave")
    assert seen == [("carol", 0.0), ("dave", 0.0)] and api._state == 2


def test_sybil_oracle_spreads_queries_over_identities_and_sums_their_budgets(small_victim, digits_splits):
    api = PredictionAPI(small_victim, identity(), key=jax.random.key(0), budget=10)
    oracle = api.oracle("attacker", identities=3)
    assert oracle.clients == ("attacker-0", "attacker-1", "attacker-2") and oracle.remaining == 30
    for _ in range(3):
        oracle.query(digits_splits.test.x[:10])
    assert [api.served(name) for name in oracle.clients] == [10, 10, 10] and oracle.remaining == 0
    with pytest.raises(QueryRefused):
        oracle.query(digits_splits.test.x[:1])
    with pytest.raises(ValueError, match="identities must be an integer >= 1"):
        api.oracle("attacker", identities=0)


def test_preprocessing_defense_changes_what_the_victim_sees(small_victim, digits_splits):
    blank = identity()._replace(preprocess=lambda inputs: inputs * 0.0)
    api = PredictionAPI(small_victim, blank, key=jax.random.key(0))
    served = api.query(digits_splits.test.x[:3])
    np.testing.assert_allclose(
        served, small_victim.predict_proba(np.zeros_like(digits_splits.test.x[:3])), atol=1e-6
    )
