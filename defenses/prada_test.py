import importlib
import math
import warnings

import jax
import numpy as np
import pytest
from scipy import stats

from heistlab import data
from heistlab.defenses.base import DefenderData, Evidence, QueryContext, Request, distinct_rows
from heistlab.defenses.label_only import label_only
from heistlab.defenses.prada import Alarm, ClientTrace, calibrate_delta, empty_trace, observe_batch, prada
from heistlab.defenses.rate_limit import rate_limit

prada_module = importlib.import_module("heistlab.defenses.prada")
base_module = importlib.import_module("heistlab.defenses.base")

CLASSES = 10
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def digits_splits():
    return data.make_splits(data.load_digits(), seed=0)


def one_hot(labels):
    return np.eye(CLASSES, dtype=np.float32)[labels]


def serve(defense, state, inputs, labels, client):
    context = QueryContext(inputs, KEY, client=client)
    return defense.apply(one_hot(labels), state, context)


def stream(defense, inputs, labels, client, batch=16, state=None):
    state = defense.init() if state is None else state
    for start in range(0, len(inputs), batch):
        _, state = serve(defense, state, inputs[start : start + batch], labels[start : start + batch], client)
    return state


def synthetic_stream(digits_splits, seeds=20, copies=15):
    """JBDA-like queries: a few natural seeds, then many small signed steps away from them."""
    rng = np.random.default_rng(0)
    x, y = digits_splits.pool[:seeds], digits_splits.test.y[:seeds]
    steps = 0.05 * np.sign(rng.normal(size=(copies, *x.shape)))
    grown = np.clip(x[None] + steps, 0, 1).reshape(-1, *x.shape[1:]).astype(np.float32)
    return np.concatenate([x, grown]), np.concatenate([y, np.tile(y, copies)])


def evidence(attackers, benign):
    labels = lambda x: np.zeros(len(x), np.int32)
    return Evidence(labels, labels, labels, tuple(attackers), tuple(benign))


def test_growing_set_and_threshold_worked_out_by_hand():
    # One class, 1-D queries 0, 1, 3, 3.1, 10. The first starts the set; distances 1, 2, 0.1, 7 are recorded.
    # After 3 joins, the set's distances are [0, 1, 2]: threshold = mean - std = 1 - sqrt(2/3). 3.1 is nearer
    # than that and stays out; 10 joins, and mean - std of [0, 1, 2, 7] is negative, so the threshold holds.
    rows = np.array([[0.0], [1.0], [3.0], [3.1], [10.0]])
    trace, alarm_row = observe_batch(empty_trace(), rows, np.zeros(5, int), 0.9, 10, 100, {}, "c")
    np.testing.assert_allclose(trace.growing_sets[0][:, 0], [0.0, 1.0, 3.0, 10.0])
    np.testing.assert_allclose(trace.distances[0], [1.0, 2.0, 0.1, 7.0])
    assert trace.thresholds[0] == pytest.approx(1 - math.sqrt(2 / 3))
    assert trace.queries == 5 and alarm_row is None


def test_natural_digits_raise_no_alarm(digits_splits):
    defense = prada()
    state = stream(defense, digits_splits.test.x, digits_splits.test.y, "benign-0")
    trace = state.traces["benign-0"]
    assert trace.alarm is None and trace.min_shapiro_w >= 0.85
    assert defense.report(state, evidence([], ["benign-0"]))["false_positive_rate"] == 0.0


def test_synthetic_queries_raise_an_alarm_and_report_when(digits_splits):
    defense = prada()
    inputs, labels = synthetic_stream(digits_splits)
    state = stream(defense, digits_splits.test.x[:200], digits_splits.test.y[:200], "benign-0")
    state = stream(defense, inputs, labels, "attacker", state=state)
    alarm = state.traces["attacker"].alarm
    assert alarm is not None and alarm.shapiro_w < 0.85 and alarm.queries % 10 == 0
    found = defense.report(state, evidence(["attacker"], ["benign-0"]))
    assert found["detected"] and found["queries_to_detection"] == alarm.queries
    assert found["false_positive_rate"] == 0.0 and found["prada_min_w_attack"] < 0.85


def test_queries_to_detection_sums_a_sybils_identities(digits_splits):
    defense = prada()
    inputs, labels = synthetic_stream(digits_splits)
    state = defense.init()
    for start in range(0, len(inputs), 16):
        client = f"attacker-{(start // 16) % 2}"
        _, state = serve(defense, state, inputs[start : start + 16], labels[start : start + 16], client)
    alarms = [state.traces[name].alarm for name in ("attacker-0", "attacker-1")]
    first = min((alarm for alarm in alarms if alarm), key=lambda alarm: sum(alarm.counts.values()))
    found = defense.report(state, evidence(["attacker-0", "attacker-1"], []))
    assert found["queries_to_detection"] == sum(first.counts.values()) > first.queries
    assert found["false_positive_rate"] is None


def defender_from(dataset, seed=0):
    return DefenderData(dataset.x, dataset.y, dataset.input_shape, dataset.num_classes, seed)


def test_delta_calibrated_on_the_defender_split_spares_unseen_digits_and_catches_synthetic_ones(
    digits_splits,
):
    # Calibrated on the victim's training digits only; the test digits it is then judged on were never seen.
    defense = prada(delta=None, defender=defender_from(digits_splits.victim_train), calibration_streams=10)
    state = stream(defense, digits_splits.test.x, digits_splits.test.y, "benign-0")
    state = stream(defense, *synthetic_stream(digits_splits), "attacker", state=state)
    found = defense.report(state, evidence(["attacker"], ["benign-0"]))
    assert found["prada_min_w_attack"] < found["prada_delta"] < found["prada_min_w_benign"]
    assert found["detected"] and found["false_positive_rate"] == 0.0


def test_calibrated_delta_is_the_smallest_benign_w_less_the_margin(digits_splits):
    defender = defender_from(digits_splits.victim_train, seed=3)
    delta = calibrate_delta(defender, streams=5, queries=300, margin=0.0)
    assert calibrate_delta(defender, streams=5, queries=300, margin=0.04) == pytest.approx(delta - 0.04)
    assert calibrate_delta(defender, streams=10, queries=300, margin=0.0) <= delta  # more streams, lower min
    one_stream = calibrate_delta(defender, streams=1, queries=300, margin=0.0)
    order = np.random.default_rng([3, 0x5072]).permutation(len(defender.x))[:300]
    trace, _ = observe_batch(
        empty_trace(),
        defender.x[order].reshape(300, -1).astype(float),
        defender.y[order],
        0.0,
        10,
        100,
        {},
        "c",
    )
    assert one_stream == trace.min_shapiro_w


def test_an_honest_client_resending_perturbed_copies_of_a_few_inputs_is_alarmed(digits_splits):
    # A known limit of the distance test: 30 digits, each re-sent 10 times with pixel noise of std 0.03 (a
    # client retrying re-encoded images), give many tiny distances, as synthetic queries do.
    rng = np.random.default_rng(0)
    originals, labels = digits_splits.test.x[:30], digits_splits.test.y[:30]
    copies = np.clip(originals[None] + rng.normal(0, 0.03, (10, *originals.shape)), 0, 1).astype(np.float32)
    order = rng.permutation(300)
    inputs, classes = copies.reshape(300, *originals.shape[1:])[order], np.tile(labels, 10)[order]
    defense = prada(delta=None, defender=defender_from(digits_splits.victim_train), calibration_streams=10)
    state = stream(defense, inputs, classes, "benign-0")
    found = defense.report(state, evidence([], ["benign-0"]))
    assert found["false_positive_rate"] == 1.0
    assert state.traces["benign-0"].alarm.queries <= 150 and found["prada_min_w_benign"] < 0.5


def test_calibration_needs_enough_defender_data(digits_splits):
    with pytest.raises(ValueError, match="prada: delta=null calibrates on the defender's data"):
        prada(delta=None)
    small = defender_from(digits_splits.victim_train)._replace(x=digits_splits.victim_train.x[:50])
    with pytest.raises(ValueError, match="calibration streams of 50 defender inputs never reach the test"):
        prada(delta=None, defender=small)
    with pytest.raises(ValueError, match=r"calibration_margin must be a number in \[0, 1\), got 1.5"):
        prada(delta=None, defender=small, calibration_margin=1.5)


def test_refuse_action_refuses_an_alarmed_client_only(digits_splits):
    defense = prada(action="refuse")
    inputs, labels = synthetic_stream(digits_splits)
    state = stream(defense, inputs, labels, "attacker")
    verdict, _ = defense.admit(state, Request("attacker", 1, 0.0))
    assert not verdict.admitted and verdict.reason == "prada alarm" and verdict.delay == math.inf
    assert defense.admit(state, Request("someone-else", 1, 0.0))[0].admitted


def test_switch_action_serves_the_fallback_from_the_row_after_the_alarm(digits_splits):
    defense = prada(action="switch", fallback=label_only())
    inputs, labels = synthetic_stream(digits_splits)
    soft = np.full((len(inputs), CLASSES), 0.02, np.float32)
    soft[np.arange(len(inputs)), labels] = 0.82
    state, served = defense.init(), []
    for start in range(0, len(inputs), 32):
        context = QueryContext(inputs[start : start + 32], KEY, client="attacker")
        answer, state = defense.apply(soft[start : start + 32], state, context)
        served.append(np.asarray(answer))
    served = np.concatenate(served)
    switched = state.traces["attacker"].alarm.queries
    np.testing.assert_allclose(served[:switched], soft[:switched])
    np.testing.assert_array_equal(served[switched:], one_hot(labels[switched:]))


def test_switching_to_a_rate_limit_hands_it_the_admission(digits_splits):
    defense = prada(action="switch", fallback=rate_limit(rate=1.0, burst=10))
    inputs, labels = synthetic_stream(digits_splits)
    state = stream(defense, inputs, labels, "attacker")
    assert defense.admit(state, Request("attacker", 11, 0.0))[0].reason.startswith("batch of 11")
    assert defense.admit(state, Request("benign", 11, 0.0))[0].admitted


def test_apply_leaves_the_old_state_untouched(digits_splits):
    defense = prada()
    x, y = digits_splits.test.x, digits_splits.test.y
    before = stream(defense, x[:50], y[:50], "c")
    frozen = {label: members.copy() for label, members in before.traces["c"].growing_sets.items()}
    _, after = serve(defense, before, x[50:100], y[50:100], "c")
    assert after.traces["c"].queries == 100 and before.traces["c"].queries == 50
    for label, members in before.traces["c"].growing_sets.items():
        np.testing.assert_array_equal(members, frozen[label])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"delta": 0.0}, "delta must be a number in"),
        ({"delta": 1.5}, "delta must be a number in"),
        ({"action": "block"}, "action must be one of log, refuse, switch; got 'block'"),
        ({"action": "switch"}, "action 'switch' needs fallback to be a Defense, got None"),
        ({"fallback": label_only()}, "fallback is only used with action 'switch'"),
        ({"check_every": 0}, "check_every must be an int >= 1"),
        ({"min_distances": 2}, "min_distances must be an int >= 3"),
    ],
)
def test_bad_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        prada(**arguments)


def row_by_row_observe(trace, rows, labels, delta, check_every, min_distances, counts, client):
    """The detector as a plain row-by-row scan (the implementation before distances were batched): each row's
    distance to its whole class set, Shapiro-Wilk through scipy's public entry point."""
    growing_sets = dict(trace.growing_sets)
    set_distances = {label: list(values) for label, values in trace.set_distances.items()}
    thresholds = dict(trace.thresholds)
    distances = {label: list(values) for label, values in trace.distances.items()}
    queries, min_w, alarm, alarm_row = trace.queries, trace.min_shapiro_w, trace.alarm, None
    for index, (row, label) in enumerate(zip(rows, labels.tolist(), strict=True)):
        queries += 1
        if label not in growing_sets:
            growing_sets[label], set_distances[label], thresholds[label] = row[None], [0.0], 0.0
            distances.setdefault(label, [])
        else:
            nearest = float(np.sqrt(np.min(np.sum((growing_sets[label] - row) ** 2, axis=1))))
            distances[label].append(nearest)
            if nearest > thresholds[label]:
                growing_sets[label] = np.concatenate([growing_sets[label], row[None]])
                set_distances[label].append(nearest)
                spread = np.asarray(set_distances[label])
                thresholds[label] = max(thresholds[label], float(spread.mean() - spread.std()))
        if queries % check_every == 0:
            pooled = [values for values in distances.values() if len(values) >= 10]
            if not pooled:
                continue
            values = np.concatenate(pooled)
            kept = values[np.abs(values - values.mean()) < 3.0 * values.std()]
            if len(kept) <= min_distances or np.ptp(kept) == 0:
                continue
            w = float(stats.shapiro(kept).statistic)
            min_w = min(min_w, w)
            if alarm is None and w < delta:
                alarm, alarm_row = Alarm(queries, w, {**counts, client: queries}), index
    sets = {label: tuple(values) for label, values in set_distances.items()}
    recorded = {label: tuple(values) for label, values in distances.items()}
    new = ClientTrace(growing_sets, sets, thresholds, recorded, queries, min_w, alarm)
    return new, alarm_row


def assert_same_trace(got, expected):
    assert list(got.growing_sets) == list(expected.growing_sets)
    for label, members in expected.growing_sets.items():
        np.testing.assert_array_equal(got.growing_sets[label], members)
    assert got.set_distances == expected.set_distances and got.distances == expected.distances
    assert list(got.distances) == list(expected.distances)
    assert got.thresholds == expected.thresholds
    assert got[4:] == expected[4:]


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
@pytest.mark.parametrize("kind", ["natural", "synthetic", "repeated", "resampled"])
def test_batched_distances_equal_the_row_by_row_scan(digits_splits, kind, batch):
    if kind == "natural":
        inputs, labels = digits_splits.test.x, digits_splits.test.y
    elif kind == "repeated":  # exact duplicates: zero distances and ties at every threshold
        inputs = np.resize(digits_splits.test.x, (1000, *digits_splits.test.x.shape[1:]))
        labels = np.resize(digits_splits.test.y, 1000)
    elif kind == "resampled":  # repeats at random times, some of inputs that never joined their set
        order = np.random.default_rng(0).integers(0, 120, 600)
        inputs, labels = digits_splits.test.x[order], digits_splits.test.y[order]
    else:
        inputs, labels = synthetic_stream(digits_splits)
    rows = np.asarray(inputs, np.float64).reshape(len(inputs), -1)
    fast = slow = empty_trace()
    for start in range(0, len(rows), batch):
        chunk, chunk_labels = rows[start : start + batch], np.asarray(labels[start : start + batch])
        fast, fast_row = observe_batch(fast, chunk, chunk_labels, 0.85, 10, 100, {"other": 3}, "c")
        slow, slow_row = row_by_row_observe(slow, chunk, chunk_labels, 0.85, 10, 100, {"other": 3}, "c")
        assert fast_row == slow_row
        assert_same_trace(fast, slow)
    if kind in ("natural", "synthetic"):
        assert (fast.alarm is not None) == (kind == "synthetic")


@pytest.mark.parametrize("kind", ["natural", "resampled"])
def test_rows_joining_one_by_one_give_the_distances_of_all_pairs_at_once(digits_splits, kind, monkeypatch):
    if kind == "natural":
        inputs, labels = digits_splits.test.x, digits_splits.test.y
    else:
        order = np.random.default_rng(1).integers(0, 200, 700)
        inputs, labels = digits_splits.test.x[order], digits_splits.test.y[order]
    rows = np.asarray(inputs, np.float64).reshape(len(inputs), -1)
    all_pairs = slow = empty_trace()
    monkeypatch.setattr(prada_module, "PAIRWISE_ELEMENTS", 0)
    one_by_one = empty_trace()
    for start in range(0, len(rows), 100):
        chunk, chunk_labels = rows[start : start + 100], np.asarray(labels[start : start + 100])
        one_by_one, _ = observe_batch(one_by_one, chunk, chunk_labels, 0.85, 10, 100, {}, "c")
        slow, _ = row_by_row_observe(slow, chunk, chunk_labels, 0.85, 10, 100, {}, "c")
    monkeypatch.undo()
    for start in range(0, len(rows), 100):
        chunk, chunk_labels = rows[start : start + 100], np.asarray(labels[start : start + 100])
        all_pairs, _ = observe_batch(all_pairs, chunk, chunk_labels, 0.85, 10, 100, {}, "c")
    assert_same_trace(one_by_one, slow)
    assert_same_trace(all_pairs, slow)


def test_distinct_rows_compare_bytes_when_hashes_collide(monkeypatch):
    rows = np.random.default_rng(0).random((50, 8))[np.random.default_rng(1).integers(0, 20, 200)]
    rows[3] = -0.0  # equal to 0.0 in value, not in bytes: a distinct row, as the detector's sums allow
    expected = distinct_rows(rows, np.float64)
    monkeypatch.setattr(base_module, "_row_weights", lambda width, dtype: np.zeros(width, dtype))
    for got, want in zip(distinct_rows(rows, np.float64), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    first, occurrence = expected
    np.testing.assert_array_equal(rows[first][occurrence], rows)
    assert first.tolist() == sorted(first.tolist())
    assert len(np.unique(rows[first].view(np.uint64), axis=0)) == len(first)  # no two alike


@pytest.mark.parametrize("size", [101, 150, 999, 2048, 5001])
@pytest.mark.parametrize("routine", ["swilk", "public"])
def test_pooled_w_is_scipys_shapiro_w_bit_for_bit(size, routine, monkeypatch):
    if routine == "public":  # a scipy without the private routine: its public test
        shapiro = prada_module._shapiro_routines()[0]
        monkeypatch.setattr(prada_module, "_shapiro_routines", lambda: (shapiro, None))
    rng = np.random.default_rng(size)
    values = np.abs(rng.normal(size=size)) ** 2
    values[rng.random(size) < 0.4] = 0.0  # ties, as repeated queries give
    mean, std = values.mean(), values.std()
    kept = values[np.abs(values - mean) < 3.0 * std]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scipy's p-value warning past 5000 samples
        expected = float(stats.shapiro(kept).statistic)
    assert prada_module.pooled_shapiro_w(values, 50) == expected
    assert prada_module.pooled_shapiro_w(values, 50) == expected  # again, from the kept coefficients
    assert prada_module.pooled_shapiro_w(values, len(kept)) is None
    assert prada_module.pooled_shapiro_w(np.zeros(size), 50) is None
