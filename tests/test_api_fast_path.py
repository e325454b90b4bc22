"""The API's fused serving program answers, records, refuses and updates defense states exactly as the
separate victim and defense programs do (``PredictionAPI._serve`` without the fused program, kept for
external victims and batches over ``FUSED_MAX_ROWS``)."""

from __future__ import annotations

import hashlib

import jax
import numpy as np
import pytest

from heistlab import defenses
from heistlab.api import FUSED_MAX_ROWS, PredictionAPI, QueryRecord, QueryRefused

DAWN_KEY_ENV = "HEISTLAB_FAST_PATH_TEST_DAWN_KEY"
DEFENSES = {
    "identity": lambda: defenses.identity(),
    "gaussian_noise": lambda: defenses.gaussian_noise(0.05),
    "laplace_noise": lambda: defenses.laplace_noise(10.0, 2.0),
    "rounding": lambda: defenses.rounding(2),
    "top_k": lambda: defenses.top_k(3),
    "label_only": lambda: defenses.label_only(),
    "high_confidence": lambda: defenses.high_confidence(0.25),
    "chain": lambda: defenses.chain(defenses.reverse_sigmoid(0.7, 0.4), defenses.rounding(2)),
    "mad": lambda: defenses.mad(0.9, objective="angular"),
    "mad_argmax": lambda: defenses.mad_argmax(1.7, objective="angular"),
    "feature_squeezing": lambda: defenses.feature_squeezing(4, 1, 0.05),
    "feature_squeezing_median": lambda: defenses.feature_squeezing(3, 2, 0.5),
    "dawn": lambda: defenses.dawn(0.25, key_env=DAWN_KEY_ENV),
    "budget": lambda: defenses.budget(per_client=40, total=120),
    "rate_limit": lambda: defenses.rate_limit(10.0, 64),
    "prada": lambda: defenses.prada(0.85, action="refuse", check_every=2, min_distances=3),
    "proof_of_work": lambda: defenses.proof_of_work(),
}
# Row counts that cross the padding rules: below the victim's 8-row minimum, at and past powers of two.
BATCHES = (1, 2, 5, 8, 9, 130, 3, 1, 64, 7)


def served_stream(api: PredictionAPI, inputs: np.ndarray) -> list:
    """What each query of a fixed two-client stream got: the answer, or the refusal's reason."""
    outcomes, start = [], 0
    for index, size in enumerate(BATCHES):
        client = ("alice", "bob")[index % 2]
        try:
            outcomes.append(api.query(inputs[start : start + size], client=client))
        except QueryRefused as refusal:
            outcomes.append(("refused", refusal.reason, refusal.remaining, refusal.retry_after))
        start += size
    return outcomes


def host_leaves(tree) -> list:
    leaves = jax.tree_util.tree_leaves(tree)
    return [
        np.asarray(jax.random.key_data(leaf))
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        else np.asarray(leaf)
        for leaf in leaves
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_fused_program_serves_exactly_what_the_separate_programs_serve(
    name, small_victim, digits_splits, monkeypatch
):
    monkeypatch.setenv(DAWN_KEY_ENV, "the same watermark key for both APIs")
    inputs = np.resize(digits_splits.test.x, (sum(BATCHES), *digits_splits.input_shape))
    fused = PredictionAPI(small_victim, DEFENSES[name](), key=jax.random.key(3), budget=150)
    separate = PredictionAPI(small_victim, DEFENSES[name](), key=jax.random.key(3), budget=150)
    separate._program = None
    assert fused._program is not None

    for got, expected in zip(served_stream(fused, inputs), served_stream(separate, inputs), strict=True):
        if isinstance(expected, tuple):
            assert got == expected
        else:
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
    assert_same_records_and_states(fused, separate)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["identity", "feature_squeezing", "feature_squeezing_median", "dawn"])
def test_a_full_bucket_is_served_exactly_as_the_separate_programs_serve_it(
    name, small_victim, digits_splits, monkeypatch
):
    monkeypatch.setenv(DAWN_KEY_ENV, "the same watermark key for both APIs")
    inputs = np.resize(digits_splits.test.x, (FUSED_MAX_ROWS, *digits_splits.input_shape))
    fused = PredictionAPI(small_victim, DEFENSES[name](), key=jax.random.key(3))
    separate = PredictionAPI(small_victim, DEFENSES[name](), key=jax.random.key(3))
    separate._program = None
    for client in ("alice", "bob", "alice"):
        got, expected = fused.query(inputs, client), separate.query(inputs, client)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    assert_same_records_and_states(fused, separate)


def assert_same_records_and_states(fused: PredictionAPI, separate: PredictionAPI) -> None:
    assert fused.records == separate.records
    fused_state, fused_batches = fused.defense_state()
    separate_state, separate_batches = separate.defense_state()
    assert fused_batches == separate_batches
    assert jax.tree_util.tree_structure(fused_state) == jax.tree_util.tree_structure(separate_state)
    for got, expected in zip(host_leaves(fused_state), host_leaves(separate_state), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert [fused.simulated_seconds(c) for c in ("alice", "bob")] == [
        separate.simulated_seconds(c) for c in ("alice", "bob")
    ]


def test_query_log_reads_as_the_list_of_one_record_per_row(small_victim, digits_splits):
    api = PredictionAPI(small_victim, defenses.identity(), key=jax.random.key(0), budget=6)
    x = digits_splits.test.x[:9]
    api.query(x[:4], client="alice")
    with pytest.raises(QueryRefused):
        api.query(x[4:7], client="alice")
    api.query(x[7:9], client="bob")
    digest = lambda row: hashlib.sha256(np.ascontiguousarray(row).tobytes()).hexdigest()
    expected = [QueryRecord("alice", index, digest(x[index]), True, "") for index in range(4)]
    expected += [QueryRecord("alice", index, digest(x[index]), False, "budget") for index in range(4, 7)]
    expected += [QueryRecord("bob", index, digest(x[7 + index]), True, "") for index in range(2)]
    assert api.records == expected and list(api.records) == expected and len(api.records) == 9
    assert [api.records[index] for index in range(-9, 9)] == expected + expected
    assert api.records[2:8:3] == expected[2:8:3] and api.records[-3] == expected[-3]
    with pytest.raises(IndexError):
        api.records[9]
    api.records.clear()
    assert len(api.records) == 0 and list(api.records) == []
    api.query(x[:1], client="bob")
    assert api.records == [QueryRecord("bob", 2, digest(x[0]), True, "")]
