"""The defense state shared by the workers of ``serve.workers``: its codec, its versioned store, and two
serving cores on one database that detect, answer and alarm exactly as one process does."""

from __future__ import annotations

import math
import sqlite3
from types import MappingProxyType

import jax
import msgpack
import numpy as np
import pytest

from heistlab.api import PredictionAPI
from heistlab.defenses import Defense, QueryContext, chain, gaussian_noise, prada, rounding
from heistlab.defenses.dawn import DawnState, WatermarkRecord
from heistlab.defenses.prada import ClientTrace, PradaState
from heistlab.serving.audit import AuditLog
from heistlab.serving.service import build_core, online_evidence
from heistlab.serving.shared import SharedAdmission
from heistlab.serving.shared_defense import (
    NAMED_TUPLE,
    DefenseStateStore,
    ServingState,
    decode_tree,
    encode_tree,
    is_stateless,
    reset_shared_state,
    store_for,
)


def jbda_like(digits_splits, seeds=20, copies=15) -> np.ndarray:
    """JBDA-like queries: natural seeds, then many small signed steps away from each."""
    x = digits_splits.pool[:seeds]
    steps = 0.05 * np.sign(np.random.default_rng(0).normal(size=(copies, *x.shape)))
    grown = np.clip(x[None] + steps, 0, 1).reshape(-1, *x.shape[1:])
    return np.concatenate([x, grown]).astype(np.float32)


def test_defense_states_come_back_from_the_codec_with_their_types(small_victim, digits_splits):
    api = PredictionAPI(small_victim, prada(), key=jax.random.key(0))
    queries = jbda_like(digits_splits)
    for start in range(0, len(queries), 40):
        api.query(queries[start : start + 40], client="attacker")
    state, _ = api.defense_state()
    assert state.traces["attacker"].alarm is not None  # the state holds an Alarm, arrays, inf, int keys
    record = WatermarkRecord(None, "ab", np.arange(4, dtype=np.float32), 3)
    dawn = DawnState((record,), MappingProxyType({None: 2, "k": 1}), 10)
    tree = ServingState((state, dawn), 7, {"attacker": 9}, {"attacker": ("detected",)})

    data = encode_tree(tree)
    back = decode_tree(data)
    assert encode_tree(back) == data
    shared_prada, shared_dawn = back.defense
    assert isinstance(back, ServingState) and isinstance(shared_prada, PradaState)
    trace = shared_prada.traces["attacker"]
    assert isinstance(trace, ClientTrace) and trace.alarm == state.traces["attacker"].alarm
    label = next(iter(trace.growing_sets))
    assert isinstance(label, int) and trace.growing_sets[label].dtype == np.float64
    np.testing.assert_array_equal(trace.growing_sets[label], state.traces["attacker"].growing_sets[label])
    assert isinstance(trace.distances[label], tuple)
    assert shared_dawn.answered == {None: 2, "k": 1} and shared_dawn.records[0].input.dtype == np.float32
    assert back.raised == {"attacker": ("detected",)} and back.batches == 7
    assert math.isinf(decode_tree(encode_tree(ClientTrace({}, {}, {}, {}, 0, math.inf, None))).min_shapiro_w)


def test_the_codec_refuses_unknown_types_and_builds_only_loaded_named_tuples():
    with pytest.raises(TypeError, match="set"):
        encode_tree({"seen": {1, 2}})
    with pytest.raises(TypeError, match="dtype object"):
        encode_tree(np.array([object()]))

    def named(module: str, qualname: str) -> bytes:
        payload = msgpack.packb([module, qualname, ["echo owned"]], use_bin_type=True)
        return msgpack.packb(msgpack.ExtType(NAMED_TUPLE, payload))

    for module, qualname in (("os", "system"), ("heistlab_not_loaded", "Anything"), ("builtins", "tuple")):
        with pytest.raises(ValueError, match="not a loaded NamedTuple"):
            decode_tree(named(module, qualname))


def counting(state: ServingState) -> tuple[int, ServingState]:
    return state.batches, state._replace(batches=state.batches + 1)


def reading(state: ServingState) -> tuple[int, ServingState]:
    return state.batches, state


def test_two_stores_on_one_file_see_each_others_updates_and_load_only_new_versions(tmp_path):
    path = tmp_path / "audit.sqlite"
    first, second = (DefenseStateStore(path, ServingState(prada().init())) for _ in range(2))
    assert [first.update(counting), first.update(counting)] == [0, 1]
    assert (first.loads, first.stores) == (1, 2)  # loaded once (the initial state), then its own writes
    assert second.update(reading) == 2 and (second.loads, second.stores) == (1, 0)
    assert second.update(reading) == 2 and second.loads == 1  # the version did not move: nothing decoded
    assert second.update(counting) == 2
    assert first.update(counting) == 3 and first.loads == 2  # the other store wrote: decoded again

    def failing(state: ServingState):
        counting(state)
        raise RuntimeError("the victim failed")

    with pytest.raises(RuntimeError):
        second.update(failing)
    assert second.update(reading) == 4  # nothing was stored by the failed step

    reset_shared_state(path)  # a server start: every worker from init() again
    assert second.update(reading) == 0 and first.update(counting) == 0 and second.update(reading) == 1


def test_a_request_writes_and_loads_only_what_it_changed(tmp_path, digits_splits):
    detector, path = prada(), tmp_path / "audit.sqlite"
    first, second = (DefenseStateStore(path, ServingState(detector.init())) for _ in range(2))

    def serving(client: str, rows: np.ndarray):
        def step(state: ServingState) -> tuple[None, ServingState]:
            probs = np.eye(10, dtype=np.float32)[np.arange(len(rows)) % 10]
            context = QueryContext(rows, jax.random.key(0), client=client)
            _, defense = detector.apply(probs, state.defense, context)
            return None, state._replace(defense=defense, batches=state.batches + 1)

        return step

    x = digits_splits.test.x
    for index, start in enumerate(range(0, 300, 15)):  # ten keys, 30 queries each
        first.update(serving(f"key-{index % 10}", x[start : start + 15]))
    whole = first.state_bytes
    second.update(serving("key-3", x[300:301]))  # one more row of one key, in the other worker
    assert 0 < second.written_bytes < whole / 5 and second.loaded_bytes >= whole
    first.update(reading)
    assert 0 < first.loaded_bytes < whole / 5  # it decoded the new root and key-3's trace only
    assert encode_tree(first.update(lambda state: (state, state))) == encode_tree(second._value)
    chunks = sqlite3.connect(path).execute("SELECT COUNT(*) FROM shared_defense_chunks").fetchone()[0]
    assert chunks == len(second._chunks) == 10  # one trace per key: the replaced one was deleted


def test_only_a_chain_with_state_is_synchronised(tmp_path):
    stateless = chain(rounding(2), gaussian_noise(0.01))
    assert is_stateless(stateless.init()) and store_for(tmp_path / "a.sqlite", stateless) is None
    assert not is_stateless(chain(rounding(2), prada()).init())
    assert isinstance(store_for(tmp_path / "a.sqlite", chain(rounding(2), prada())), DefenseStateStore)
    keeps_a_set = Defense(init=lambda: {"seen": set()}, apply=lambda probs, state, context: (probs, state))
    with pytest.raises(ValueError, match="serve.workers > 1 shares the defense state.*set.*use one worker"):
        store_for(tmp_path / "a.sqlite", keeps_a_set)


@pytest.mark.slow
def test_two_cores_on_one_database_answer_and_alarm_as_one_process(tmp_path, small_victim, digits_splits):
    def defense():
        return chain(prada(), gaussian_noise(0.01))  # the noise draws each batch's key from the batch count

    audit = AuditLog(tmp_path / "audit.sqlite")
    reset_shared_state(audit.path)
    workers = [
        build_core(
            small_victim,
            defense(),
            audit=audit,
            shared=SharedAdmission(audit.path, None, None, None),
            defense_store=store_for(audit.path, defense()),
        )
        for _ in range(2)
    ]
    alone = PredictionAPI(small_victim, defense(), key=jax.random.key(0))
    attack, benign = jbda_like(digits_splits), digits_splits.test.x[:320]
    batches = [("attacker", attack[start : start + 8]) for start in range(0, len(attack), 8)]
    batches += [("benign", benign[start : start + 8]) for start in range(0, len(benign), 8)]
    order = np.random.default_rng(1).permutation(len(batches))
    turns = np.random.default_rng(2).integers(0, 2, len(batches))
    for index, turn in zip(order, turns, strict=True):
        key_id, inputs = batches[index]
        served = workers[turn].predict(key_id, inputs, "probabilities")
        np.testing.assert_array_equal(served.answers, alone.query(inputs, client=key_id))
    assert set(turns) == {0, 1}

    expected = alone.report(online_evidence("attacker", lambda x: x))
    assert expected["detected"] and not alone.report(online_evidence("benign", lambda x: x))["detected"]
    alarms = audit.alarms()
    assert [(alarm["key_id"], alarm["name"]) for alarm in alarms] == [("attacker", "detected")]
    assert alarms[0]["report"]["queries_to_detection"] == expected["queries_to_detection"]


def test_workers_of_a_stateless_chain_draw_their_own_noise(tmp_path, small_victim, digits_splits):
    audit, x = AuditLog(tmp_path / "audit.sqlite"), digits_splits.test.x[:4]

    def first_answer(key_stream):
        core = build_core(small_victim, gaussian_noise(0.1), audit=audit, key_stream=key_stream)
        return core.predict("k", x, "probabilities").answers

    alone = PredictionAPI(small_victim, gaussian_noise(0.1), key=jax.random.key(0)).query(x)
    np.testing.assert_array_equal(first_answer(None), alone)  # one process: the experiment's key
    workers = [first_answer(index) for index in range(2)]  # each worker's first batch
    assert not np.allclose(workers[0], workers[1]) and not np.allclose(workers[0], alone)
