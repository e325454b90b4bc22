"""Requests served through the server's batcher get exactly what the one-at-a-time path gives them.

The same stream of calls (three keys, a quota, a rate limit on a ticking clock, an invalid batch, a PRADA-like
synthetic stream) goes to two identically built ``ServingCore``s: one answered call by call with
``predict``, the other with every call submitted at once to a ``Coalescer`` (several batches). Answers,
refusals (type and message), rows served per key, the defense chain's state and the alarms must be equal.
"""

from __future__ import annotations

import asyncio
import itertools

import jax
import numpy as np
import pytest

from heistlab.defenses import chain, rounding
from heistlab.defenses.prada import prada
from heistlab.serving.audit import AuditLog
from heistlab.serving.batching import Coalescer
from heistlab.serving.service import Call, build_core

KEYS = ("alice", "bob", "carol")
QUOTA = 24


def call_stream(splits, victim) -> list[Call]:
    """48 calls of 1-4 rows in an interleaved order: a synthetic stream (seeds of one class, each followed by
    small steps, as JBDA queries) for alice, test digits for bob and carol, one NaN batch for bob."""
    rng = np.random.default_rng(0)
    seeds = splits.pool[victim.predict_proba(splits.pool).argmax(axis=1) == 3][:8]
    steps = [np.clip(seeds + 0.01 * np.sign(rng.normal(size=seeds.shape)), 0, 1) for _ in range(3)]
    synthetic = np.stack([seeds, *steps], axis=1).reshape(-1, *seeds.shape[1:])
    benign = splits.test.x[rng.permutation(len(splits.test.x))]
    calls, taken = [], {key: 0 for key in KEYS}
    for index in range(48):
        key = KEYS[rng.integers(len(KEYS))]
        rows = int(rng.integers(1, 5))
        source = synthetic if key == "alice" else benign
        start = taken[key] % (len(source) - rows)
        inputs = source[start : start + rows].astype(np.float32)
        taken[key] += rows
        if index == 20:
            key, inputs = "bob", np.full_like(inputs, np.nan)
        calls.append(Call(key, inputs, "probabilities"))
    return calls


def outcome(served_or_error) -> tuple:
    if isinstance(served_or_error, Exception):
        return (type(served_or_error).__name__, str(served_or_error))
    return ("served", served_or_error.answers.tolist(), served_or_error.remaining)


def core_for(victim, defense, tmp_path, name):
    audit = AuditLog(tmp_path / f"{name}.sqlite")
    ticks = itertools.count()  # a clock one second on at each admission: the same times for both cores
    clock = lambda: float(next(ticks))
    return build_core(victim, defense, audit=audit, quota=QUOTA, rate=0.5, burst=6, clock=clock), audit


@pytest.mark.parametrize(
    "make_defense",
    [lambda: rounding(2), lambda: chain(rounding(2), prada(check_every=4, min_distances=8))],
    ids=["rounding", "prada"],
)
def test_batched_calls_get_exactly_the_sequential_answers_refusals_state_and_alarms(
    make_defense, small_victim, digits_splits, tmp_path
):
    calls = call_stream(digits_splits, small_victim)
    sequential, sequential_audit = core_for(small_victim, make_defense(), tmp_path, "sequential")
    expected = []
    for call in calls:
        try:
            expected.append(sequential.predict(call.key_id, call.inputs, call.output))
        except Exception as error:
            expected.append(error)

    batched, batched_audit = core_for(small_victim, make_defense(), tmp_path, "batched")
    coalescer = Coalescer(batched.serve_in_turn, max_batch=8)

    async def all_at_once():
        return await asyncio.gather(*(coalescer.submit(call) for call in calls), return_exceptions=True)

    found = asyncio.run(all_at_once())
    assert coalescer.calls == len(calls) and coalescer.batches == len(calls) // 8  # really coalesced
    assert [outcome(each) for each in found] == [outcome(each) for each in expected]
    kinds = {outcome(each)[0] for each in expected}
    assert kinds == {"served", "QueryRefused", "InvalidQuery"}  # the stream exercises every fate
    assert {key: batched.served(key) for key in KEYS} == {key: sequential.served(key) for key in KEYS}
    refusals = " ".join(outcome(each)[1] for each in expected if outcome(each)[0] == "QueryRefused")
    assert "per-client cap" in refusals and "rate limited" in refusals
    assert max(batched.served(key) for key in KEYS) == QUOTA  # a quota reached exactly, never passed
    (state, batches), (expected_state, expected_batches) = (
        batched.api.defense_state(),
        sequential.api.defense_state(),
    )
    assert batches == expected_batches
    leaves, structure = jax.tree_util.tree_flatten(state)
    expected_leaves, expected_structure = jax.tree_util.tree_flatten(expected_state)
    assert structure == expected_structure
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves, expected_leaves, strict=True)
    )
    alarm = lambda row: (row["key_id"], row["name"], row["value"], row["report"])
    assert [alarm(row) for row in batched_audit.alarms()] == [alarm(row) for row in sequential_audit.alarms()]
