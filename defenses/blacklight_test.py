import jax
import numpy as np
import pytest
from heistlab.attacks.evasion.square import square_search
from heistlab.defenses.base import DefenderData, Evidence, QueryContext, Request
from heistlab.defenses.blacklight import REFUSAL_REASON, blacklight, fingerprint
from heistlab.defenses.label_only import label_only

from heistlab import data
from heistlab.api import Oracle

CLASSES = 10
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
