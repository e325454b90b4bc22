import hashlib
import importlib

import jax
import numpy as np
import pytest

from heistlab import data
from heistlab.api import Oracle
from heistlab.attacks.evasion.square import square_search
from heistlab.defenses.base import DefenderData, Evidence, QueryContext, Request
from heistlab.defenses.blacklight import REFUSAL_REASON, blacklight, check_input_size, fingerprint
from heistlab.defenses.label_only import label_only

CLASSES = 10
blacklight_module = importlib.import_module("heistlab.defenses.blacklight")
DIGITS = dict(quantisation_step=50.0, window=12, stride=1, fingerprint_size=50, match_threshold=25)


@pytest.fixture(scope="module")
def digits_splits():
    return data.make_splits(data.load_digits(), seed=0)


def send(defense, state, inputs, client):
    inputs = np.asarray(inputs, np.float32)
    return defense.admit(state, Request(client, len(inputs), 0.0, inputs))


def stream(defense, inputs, client, batch=16, state=None):
    state = defense.init() if state is None else state
    for start in range(0, len(inputs), batch):
        _, state = send(defense, state, inputs[start : start + batch], client)
    return state


def evidence(attackers=(), benign=(), evaders=()):
    labels = lambda x: np.zeros(len(x), np.int32)
    return Evidence(labels, labels, labels, tuple(attackers), tuple(benign), tuple(evaders))


def test_fingerprint_worked_out_by_hand():
    # 0.1 * 255 / 50 = 0.51 rounds to level 1 (50), 0.09 to level 0: a constant image has one distinct window.
    assert len(fingerprint(np.full(64, 0.1), 50.0, 12, 1, 50)) == 1
    # A ramp 0..63 / 255 * 50 quantises to 0..63, so its 53 windows of 12 all differ; 50 of them are kept.
    ramp = np.arange(64) * 50.0 / 255.0
    assert len(fingerprint(ramp, 50.0, 12, 1, 50)) == 50
    # Changes that stay within a grid cell leave the fingerprint unchanged; crossing the cells changes it.
    image = np.random.default_rng(0).choice([0.0, 0.4, 0.8], size=64)
    assert fingerprint(image + 0.05, 50.0, 12, 1, 50) == fingerprint(image, 50.0, 12, 1, 50)
    assert fingerprint(image + 0.15, 50.0, 12, 1, 50) != fingerprint(image, 50.0, 12, 1, 50)


def test_flags_a_square_attack_and_not_a_shuffled_benign_stream(digits_splits):
    # The defining property: Square's queries near a digit share most of their windows; natural digits don't.
    defense = blacklight(**DIGITS)
    benign = digits_splits.test.x[np.random.default_rng(1).permutation(len(digits_splits.test.x))]
    state = stream(defense, benign, "benign-0")
    state_box = [state]

    def answer(inputs):
        verdict, state_box[0] = send(defense, state_box[0], inputs, "evader")
        assert verdict.admitted  # action=log
        score = 20.0 * (inputs.reshape(len(inputs), -1).mean(axis=1) - 0.6)
        return np.stack([1 / (1 + np.exp(score)), 1 / (1 + np.exp(-score))], axis=1).astype(np.float32)

    oracle = Oracle(answer, lambda: None, (8, 8, 1), 2, "probabilities", ("evader",))
    inputs = digits_splits.test.x[:4]
    square_search(
        oracle, inputs, np.zeros(4, np.int64), jax.random.key(0),
        epsilon=0.1, max_queries=50, p_init=0.3, query_batch=4,
    )  # fmt: skip
    found = defense.report(state_box[0], evidence(benign=("benign-0",), evaders=("evader",)))
    assert found["false_positive_rate"] == 0.0 and found["blacklight_benign_flag_rate"] == 0.0
    assert found["evasion_detected"] and found["evasion_queries_to_detection"] <= 20
    assert found["blacklight_evasion_flag_rate"] > 0.5


def test_the_table_is_per_api_so_sybil_keys_meet_each_other(digits_splits):
    defense = blacklight(**DIGITS)
    digit = digits_splits.test.x[:1]
    state = stream(defense, digit, "sybil-0")
    _, state = send(defense, state, np.clip(digit + 0.02, 0, 1), "sybil-1")
    found = defense.report(state, evidence(attackers=("sybil-0", "sybil-1")))
    # sybil-1's only query re-sends sybil-0's digit: flagged when the two had sent 2 queries together.
    assert found["detected"] and found["queries_to_detection"] == 2
    assert state.clients["sybil-0"].flagged == 0 and state.clients["sybil-1"].flagged == 1


def test_refuse_declines_only_flagged_requests(digits_splits):
    defense = blacklight(**DIGITS, action="refuse")
    digits = digits_splits.test.x[:2]
    verdict, state = send(defense, defense.init(), digits[:1], "client")
    assert verdict.admitted
    verdict, state = send(defense, state, digits[:1], "client")
    assert not verdict.admitted and verdict.reason == REFUSAL_REASON
    verdict, state = send(defense, state, digits[1:], "client")
    assert verdict.admitted
    assert state.clients["client"].queries == 3 and state.clients["client"].flagged == 1


def test_switch_answers_flagged_rows_through_the_fallback(digits_splits):
    defense = blacklight(**DIGITS, action="switch", fallback=label_only())
    digits = digits_splits.test.x[:3]
    probs = np.full((2, CLASSES), 0.05, np.float32)
    probs[:, 0] = 0.55
    _, state = send(defense, defense.init(), digits[:1], "client")
    batch = np.concatenate([digits[1:2], digits[:1]])  # a new digit, then a re-send
    verdict, state = send(defense, state, batch, "client")
    assert verdict.admitted
    served, state = defense.apply(probs, state, QueryContext(batch, jax.random.key(0), "client"))
    np.testing.assert_array_equal(served[0], probs[0])
    np.testing.assert_array_equal(served[1], np.eye(CLASSES, dtype=np.float32)[0])


def test_an_older_state_replays_without_seeing_later_queries(digits_splits):
    defense = blacklight(**DIGITS)
    digits = digits_splits.test.x[:2]
    _, before = send(defense, defense.init(), digits[:1], "client")
    _, _ = send(defense, before, digits[1:2], "client")  # advances the shared table
    _, replayed = send(defense, before, digits[1:2], "client")
    assert replayed.stored == 2 and replayed.clients["client"].flagged == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(quantisation_step=0), "quantisation_step must be a number in \\(0, 255\\]"),
        (dict(quantisation_step=300), "quantisation_step must be a number in \\(0, 255\\]"),
        (dict(window=0), "window must be an int >= 1"),
        (dict(match_threshold=0), "match_threshold must be an int in \\[1, fingerprint_size=50\\]"),
        (dict(match_threshold=51), "match_threshold must be an int in \\[1, fingerprint_size=50\\]"),
        (dict(action="ban"), "action must be one of log, refuse, switch"),
        (dict(action="switch"), "action 'switch' needs fallback"),
        (dict(fallback=label_only()), "fallback is only used with action 'switch'"),
    ],
)
def test_bad_arguments_name_what_is_wrong(arguments, message):
    with pytest.raises(ValueError, match=f"blacklight: {message}"):
        blacklight(**{**DIGITS, **arguments})


def test_inputs_too_small_to_ever_match_are_refused_up_front():
    defender = DefenderData(np.zeros((1, 4, 4, 1)), np.zeros(1), (4, 4, 1), CLASSES, 0)
    with pytest.raises(ValueError, match="inputs of 16 values hold 5 windows of 12 at stride 1, fewer than"):
        blacklight(**DIGITS, defender=defender)


def reference_fingerprint(row, quantisation_step, window, stride, size):
    """Blacklight's fingerprint computed row by row, window by window (the straightforward definition)."""
    levels = np.round(np.asarray(row, np.float64).reshape(-1) * 255.0 / quantisation_step) * quantisation_step
    quantised = levels.astype(np.int16)
    starts = range(0, len(quantised) - window + 1, stride)
    digests = {hashlib.sha256(quantised[start : start + window].tobytes()).digest() for start in starts}
    return tuple(sorted(digests, reverse=True)[:size])


def reference_admit(table, clients, rows, client, settings):
    """Row-by-row Blacklight admission over a list of every stored fingerprint: (flags, first flag)."""
    record_queries = clients.get(client, 0)
    counts = dict(clients)
    flags, shared_counts, first = [], [], None
    for index, row in enumerate(rows):
        prints = reference_fingerprint(row, *settings[:4])
        shared = max((len(set(prints) & set(stored)) for stored in table), default=0)
        table.append(prints)
        flags.append(shared >= settings[4])
        shared_counts.append(shared)
        if flags[-1] and first is None:
            queries = record_queries + index + 1
            first = (queries, {**counts, client: queries}, shared)
    clients[client] = record_queries + len(rows)
    return np.array(flags), first


def mixed_batches(digits, seed):
    """Batches from several clients with exact repeats, near repeats inside one grid cell, small
    perturbations, blank rows and fresh digits."""
    rng = np.random.default_rng(seed)
    batches = []
    for step in range(8):
        picks = digits[rng.integers(0, 40, size=24)]
        nudged = np.clip(picks + rng.normal(0, 0.08, picks.shape), 0, 1)
        blank = np.zeros((2, digits.shape[1]))
        batch = np.concatenate(
            [picks[:8], nudged[8:], picks[:3], blank, digits[100 + 5 * step : 105 + 5 * step]]
        )
        batches.append((f"client{step % 3}", batch[rng.permutation(len(batch))]))
    return batches


@pytest.mark.parametrize(
    "settings",
    [(50.0, 12, 1, 50, 25), (50.0, 20, 1, 50, 25), (30.0, 8, 3, 10, 4), (50.0, 80, 1, 50, 25)],
    ids=["digits", "paper-window", "stride-3", "window-longer-than-input"],
)
def test_batched_admission_equals_the_row_by_row_definition(digits_splits, settings):
    digits = np.asarray(digits_splits.test.x, np.float32).reshape(len(digits_splits.test.x), -1)
    for row in digits[:30]:
        assert fingerprint(row, *settings[:4]) == reference_fingerprint(row, *settings[:4])
    fits = settings[1] <= digits.shape[1]
    if fits:
        check_input_size(digits.shape[1], settings[1], settings[2], settings[4])
    defense = blacklight(**dict(zip(list(DIGITS), settings, strict=True)))
    state, table, clients, first_flags = defense.init(), [], {}, {}
    for client, batch in mixed_batches(digits, seed=settings[1]):
        _, state = send(defense, state, batch, client)
        flags, first = reference_admit(table, clients, np.asarray(batch, np.float32), client, settings)
        np.testing.assert_array_equal(state.pending_flags, flags)
        first_flags.setdefault(client, first)
        first_flags[client] = first_flags[client] or first
        record = state.clients[client]
        assert record.queries == clients[client]
        assert (None if record.first_flag is None else tuple(record.first_flag)) == first_flags[client]
    assert state.stored == len(table)
    assert (sum(record.flagged for record in state.clients.values()) > 0) == fits


def test_a_cut_back_table_equals_one_built_from_its_own_queries(digits_splits):
    defense = blacklight(**DIGITS)
    digits = np.asarray(digits_splits.test.x, np.float32).reshape(len(digits_splits.test.x), -1)
    batches = mixed_batches(digits, seed=1)
    state = defense.init()
    for client, batch in batches[:3]:
        _, state = send(defense, state, batch, client)
    older = state
    for client, batch in batches[3:]:
        _, state = send(defense, state, batch, client)
    _, replayed = send(defense, older, batches[4][1], "late")
    fresh = defense.init()
    for client, batch in [*batches[:3], ("late", batches[4][1])]:
        _, fresh = send(defense, fresh, batch, client)
    np.testing.assert_array_equal(replayed.pending_flags, fresh.pending_flags)
    assert replayed.table.known == fresh.table.known and replayed.table.ids == fresh.table.ids
    assert list(replayed.table.first_query) == list(fresh.table.first_query)


def test_forgetting_fingerprints_or_hashing_row_by_row_changes_nothing(digits_splits, monkeypatch):
    digits = np.asarray(digits_splits.test.x, np.float32).reshape(len(digits_splits.test.x), -1)
    outcomes = []
    for limit, block in ((0, 1), (blacklight_module.MEMO_LIMIT, blacklight_module.WINDOW_VALUES_PER_BLOCK)):
        monkeypatch.setattr(blacklight_module, "MEMO_LIMIT", limit)
        monkeypatch.setattr(blacklight_module, "WINDOW_VALUES_PER_BLOCK", block)
        defense = blacklight(**DIGITS)
        state, flags = defense.init(), []
        for client, batch in mixed_batches(digits, seed=3):
            _, state = send(defense, state, batch, client)
            flags.append(state.pending_flags)
        outcomes.append((np.concatenate(flags), state.clients, state.table.known))
    np.testing.assert_array_equal(outcomes[0][0], outcomes[1][0])
    assert outcomes[0][1:] == outcomes[1][1:]
