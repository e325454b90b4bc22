"""The API's admission, simulated clocks and Sybil identities, exercised with the throttling and detection
defenses: what a client is served, when, and what is refused with which reason."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from heistlab.api import PredictionAPI, QueryRefused
from heistlab.defenses import (
    budget,
    chain,
    feature_squeezing,
    label_only,
    prada,
    progressive_delay,
    rate_limit,
)
from heistlab.defenses.feature_squeezing import median_smooth, reduce_bit_depth


def api_with(victim, defense, **options) -> PredictionAPI:
    return PredictionAPI(victim, defense, key=jax.random.key(0), **options)


def synthetic_queries(digits_splits, seeds=20, copies=15) -> np.ndarray:
    """JBDA-like queries: natural seeds, then many small signed steps away from each."""
    x = digits_splits.pool[:seeds]
    steps = 0.05 * np.sign(np.random.default_rng(0).normal(size=(copies, *x.shape)))
    grown = np.clip(x[None] + steps, 0, 1).reshape(-1, *x.shape[1:])
    return np.concatenate([x, grown]).astype(np.float32)


def test_rate_limited_clock_is_what_the_bucket_allows(small_victim, digits_splits):
    # rate 4/s, burst 10: batches of 10, 6, 8 are served at 0, 1.5 (6 tokens missing), 3.5 (8 missing).
    api = api_with(small_victim, rate_limit(rate=4.0, burst=10))
    x = digits_splits.test.x
    clocks = []
    for size in (10, 6, 8):
        api.query(x[:size], client="alice")
        clocks.append(api.simulated_seconds("alice"))
    assert clocks == [0.0, 1.5, 3.5]
    assert 10 + 4.0 * clocks[-1] == api.served("alice") == 24
    api.query(x[:10], client="bob")
    assert api.simulated_seconds("bob") == 0.0


def test_a_batch_over_burst_is_refused_with_retry_after_inf(small_victim, digits_splits):
    api = api_with(small_victim, rate_limit(rate=1.0, burst=8))
    with pytest.raises(QueryRefused) as refused:
        api.query(digits_splits.test.x[:9])
    assert refused.value.retry_after == math.inf and "burst of 8" in refused.value.reason
    assert api.refused("attacker") == 9 and api.records[-1].reason == refused.value.reason


def test_progressive_delay_clocks_per_client(small_victim, digits_splits):
    api = api_with(small_victim, progressive_delay(threshold=4, base_delay=0.5, growth=1.0))
    api.query(digits_splits.test.x[:6], client="alice")
    api.query(digits_splits.test.x[:4], client="bob")
    assert api.simulated_seconds("alice") == 1.0 and api.simulated_seconds("bob") == 0.0


def test_sybil_identities_pass_a_per_client_cap_but_not_a_global_one(small_victim, digits_splits):
    x = digits_splits.test.x[:10]

    def served_through(defense, identities):
        api = api_with(small_victim, defense)
        oracle = api.oracle("attacker", identities=identities)
        reasons = []
        for _ in range(6):
            try:
                oracle.query(x)
            except QueryRefused as refused:
                reasons.append(refused.reason)
        return sum(api.served(name) for name in oracle.clients), reasons

    assert served_through(budget(per_client=20), 1)[0] == 20
    assert served_through(budget(per_client=20), 3)[0] == 60
    served, reasons = served_through(budget(per_client=20, total=30), 3)
    assert served == 30 and reasons and all(reason.startswith("global cap") for reason in reasons)


def test_global_cap_counts_benign_clients_too(small_victim, digits_splits):
    api = api_with(small_victim, budget(total=25))
    for client in ("attacker", "benign-0"):
        api.query(digits_splits.test.x[:10], client=client)
    with pytest.raises(QueryRefused, match="global cap of 25"):
        api.query(digits_splits.test.x[:10], client="benign-1")
    api.query(digits_splits.test.x[:5], client="benign-1")
    assert sum(api.served(name) for name in api.clients()) == 25


def test_a_refusing_chain_member_leaves_the_rate_limit_untouched(small_victim, digits_splits):
    api = api_with(small_victim, chain(rate_limit(rate=1.0, burst=10), budget(per_client=12)))
    api.query(digits_splits.test.x[:10])
    with pytest.raises(QueryRefused, match="per-client cap"):
        api.query(digits_splits.test.x[:5])
    api.query(digits_splits.test.x[:2])
    assert api.simulated_seconds("attacker") == 2.0


def test_prada_refuses_an_alarmed_client_and_serves_the_others(small_victim, digits_splits):
    api = api_with(small_victim, prada(action="refuse"))
    queries = synthetic_queries(digits_splits)
    with pytest.raises(QueryRefused) as refused:
        for start in range(0, len(queries), 20):
            api.query(queries[start : start + 20], client="attacker")
    assert refused.value.reason == "prada alarm" and refused.value.retry_after == math.inf
    assert api.served("attacker") < len(queries)
    for start in range(0, 200, 20):
        api.query(digits_splits.test.x[start : start + 20], client="benign-0")
    assert api.served("benign-0") == 200


def test_prada_switches_an_alarmed_client_to_its_fallback(small_victim, digits_splits):
    api = api_with(small_victim, prada(action="switch", fallback=label_only()))
    queries = synthetic_queries(digits_splits)
    answers = np.concatenate([api.query(queries[start : start + 40]) for start in range(0, len(queries), 40)])
    alarmed_at = api._state.traces["attacker"].alarm.queries
    assert np.all(answers[alarmed_at:].max(axis=-1) == 1.0)
    assert np.all(answers[:alarmed_at].max(axis=-1) < 1.0)


def test_feature_squeezing_serves_the_squeezed_prediction(small_victim, digits_splits):
    api = api_with(small_victim, feature_squeezing(bit_depth=2, median_window=2))
    x = digits_splits.test.x[:8]
    squeezed = np.asarray(median_smooth(reduce_bit_depth(x, 2), 2))
    np.testing.assert_allclose(api.query(x), small_victim.predict_proba(squeezed), atol=1e-6)
