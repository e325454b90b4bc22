"""The prediction API: hard budget cap, per-query records, validation, output kinds, defense applied."""

from __future__ import annotations

import hashlib

import jax
import numpy as np
import pytest

from heistlab.api import InvalidQuery, PredictionAPI, QueryRefused, serving_program, skips_victim
from heistlab.defenses import chain, identity, label_only, rounding


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
    assert [record.input_digest for record in api.records] == [
        hashlib.sha256(row.tobytes()).hexdigest() for row in x
    ]


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
        (np.where(np.arange(128).reshape(2, 8, 8, 1) == 5, np.nan, 0.5).astype(np.float32), "NaN"),
        (np.where(np.arange(128).reshape(2, 8, 8, 1) == 77, np.inf, 0.5).astype(np.float32), "infinite"),
        (np.where(np.arange(128).reshape(2, 8, 8, 1) == 3, -np.inf, 0.5).astype(np.float32), "infinite"),
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


def answers_of_its_own(inputs):
    """What a defense that replaces the victim serves: a fixed function of the inputs alone."""
    return jax.nn.softmax(5.0 * inputs.reshape(len(inputs), -1)[:, :10])


def replacing_defense(host: bool, received: list | None = None):
    def apply(probs, state, context):
        if received is not None:
            received.append(np.asarray(probs))
        return answers_of_its_own(context.inputs), state

    return identity()._replace(apply=apply, host=host, replaces_victim=True)


class CountingVictim:
    """A victim outside the fused path that counts the rows it was asked to answer."""

    input_shape, num_classes = (8, 8, 1), 10

    def __init__(self, victim):
        self.victim, self.rows = victim, 0

    def predict_proba(self, inputs):
        self.rows += len(inputs)
        return self.victim.predict_proba(inputs)


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_a_defense_that_replaces_the_victim_serves_the_same_answers_without_it(
    small_victim, digits_splits, host, fused
):
    received = [] if host else None
    replacing = replacing_defense(host, received)
    victim = small_victim if fused else CountingVictim(small_victim)
    skipping = PredictionAPI(victim, replacing, key=jax.random.key(0))
    running = PredictionAPI(small_victim, replacing._replace(replaces_victim=False), key=jax.random.key(0))
    assert (skipping._program is not None) == fused
    for size in (1, 5, 130):
        inputs = digits_splits.test.x[:size]
        served = skipping.query(inputs)
        assert served.dtype == np.float32
        np.testing.assert_array_equal(served, running.query(inputs))
        np.testing.assert_array_equal(served, answers_of_its_own(inputs))
    if not fused:
        assert victim.rows == 0
    if host:
        np.testing.assert_array_equal(received[0], np.full((1, 10), 0.1, np.float32))


def test_the_fused_program_never_evaluates_a_replaced_victim(small_victim):
    key = jax.random.key(0)
    arguments = (
        small_victim.params,
        np.zeros((8, *small_victim.input_shape), np.float32),
        np.int32(3),
        np.asarray(jax.random.key_data(key)),
        np.uint32(0),
    )

    def program_text(defense) -> str:
        program = serving_program(small_victim, defense, jax.random.key_impl(key))
        return str(jax.make_jaxpr(program)(*arguments))

    assert "dot_general" not in program_text(replacing_defense(host=True))
    assert "dot_general" in program_text(replacing_defense(host=True)._replace(replaces_victim=False))


def test_a_chain_replaces_the_victim_only_when_its_first_defense_does(small_victim, digits_splits):
    replacing = replacing_defense(host=True)
    assert chain(replacing, rounding(2)).replaces_victim
    assert not chain(rounding(2), replacing).replaces_victim
    assert not chain().replaces_victim
    # a preprocessing defense asks for the victim's answers, so the victim runs
    squeezing = chain(replacing, identity()._replace(preprocess=lambda inputs: inputs * 0.0))
    assert squeezing.replaces_victim and not skips_victim(squeezing)
    victim = CountingVictim(small_victim)
    PredictionAPI(victim, squeezing, key=jax.random.key(0)).query(digits_splits.test.x[:4])
    assert victim.rows == 8
    victim, rounded = CountingVictim(small_victim), chain(replacing, rounding(2))
    served = PredictionAPI(victim, rounded, key=jax.random.key(0)).query(digits_splits.test.x[:4])
    assert victim.rows == 0
    running = PredictionAPI(small_victim, rounded._replace(replaces_victim=False), key=jax.random.key(0))
    np.testing.assert_array_equal(served, running.query(digits_splits.test.x[:4]))
