import hashlib
import hmac
import logging

import jax
import numpy as np
import pytest
from scipy import stats

from heistlab.defenses.base import Evidence, QueryContext, chain
from heistlab.defenses.dawn import (
    DEFAULT_KEY_ENV,
    dawn,
    input_bytes,
    keyed_tags,
    rows_as_bytes,
    watermark_label,
)
from heistlab.defenses.top_k import top_k

KEY = "correct horse battery staple"
CLASSES = 10


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv(DEFAULT_KEY_ENV, KEY)


def queries(count, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.uniform(size=(count, 4, 4, 1)).astype(np.float32)
    return inputs, rng.dirichlet(np.ones(CLASSES), count).astype(np.float32)


def ask(defense, state, inputs, probs, client="attacker"):
    return defense.apply(probs, state, QueryContext(inputs, jax.random.key(0), client))


def is_marked(query, rate):
    tag = hmac.new(KEY.encode(), query.tobytes(), hashlib.sha256).digest()
    return tag[0] * 256 + tag[1] < 65536 * rate, tag


def test_marks_exactly_the_keyed_queries_with_a_keyed_wrong_label(keyed):
    defense = dawn(rate=0.1)
    inputs, probs = queries(200)
    served, state = ask(defense, defense.init(), inputs, probs)
    for query, answer, original in zip(inputs, served, probs, strict=True):
        marked, tag = is_marked(query, 0.1)
        if marked:
            offset = int.from_bytes(tag[2:10], "big") % (CLASSES - 1)
            label = (original.argmax() + 1 + offset) % CLASSES
            np.testing.assert_array_equal(answer, np.eye(CLASSES)[label])
            assert label != original.argmax()
        else:
            np.testing.assert_array_equal(answer, original)
    assert len(state.records) == sum(is_marked(query, 0.1)[0] for query in inputs) > 0
    record = state.records[0]
    assert record.client == "attacker" and record.digest == hashlib.sha256(record.input.tobytes()).hexdigest()
    assert state.answered == {"attacker": 200} and state.classes == CLASSES


def test_the_same_input_gets_the_same_answer(keyed):
    defense = dawn(rate=0.2)
    inputs, probs = queries(50)
    first, state = ask(defense, defense.init(), inputs, probs)
    again, state = ask(defense, state, inputs, probs)
    np.testing.assert_array_equal(first, again)
    assert len(state.records) == 2 * int(np.sum(np.any(first != probs, axis=-1)))


def test_marked_fraction_matches_the_rate(keyed):
    inputs, probs = queries(20000, seed=1)
    _, state = ask(dawn(rate=0.005), dawn(rate=0.005).init(), inputs, probs)
    # binomial(20000, 0.005): mean 100, standard deviation 10
    assert 60 <= len(state.records) <= 140


def test_wrong_labels_cover_every_other_class():
    labels = {watermark_label(bytes([0, 0, *offset.to_bytes(8, "big")]), 4, CLASSES) for offset in range(9)}
    assert labels == set(range(CLASSES)) - {4}


def test_report_counts_only_attackers_and_tests_by_binomial_tail(keyed):
    defense = dawn(rate=0.3)
    inputs, probs = queries(300)
    _, state = ask(defense, defense.init(), inputs[:200], probs[:200], client="attacker-0")
    _, state = ask(defense, state, inputs[200:], probs[200:], client="benign-0")
    marked = [record for record in state.records if record.client == "attacker-0"]
    labels = {record.digest: record.label for record in marked}

    def copies_watermark(x):  # agrees on all but the first two watermarked inputs
        found = np.array([labels[hashlib.sha256(input_bytes(row)).hexdigest()] for row in x])
        found[:2] = (found[:2] + 1) % CLASSES
        return found

    evidence = Evidence(
        surrogate_labels=copies_watermark,
        independent_labels=lambda x: np.zeros(len(x), np.int64),
        victim_labels=lambda x: np.zeros(len(x), np.int64),
        attackers=("attacker-0",),
        benign=("benign-0",),
    )
    found = defense.report(state, evidence)
    n = len(marked)
    assert found["watermarked_queries"] == found["watermarked_inputs"] == n
    assert found["watermark_fraction"] == n / 200
    assert found["watermark_accuracy"] == (n - 2) / n
    np.testing.assert_allclose(found["watermark_p_value"], stats.binom.sf(n - 3, n, 1 / 9))
    zero_labels = sum(record.label == 0 for record in marked)
    np.testing.assert_allclose(
        found["watermark_p_value_independent"], stats.binom.sf(zero_labels - 1, n, 1 / 9)
    )
    assert found["watermark_p_value"] < 1e-20 < 0.05 < found["watermark_p_value_independent"]


def test_report_without_watermarked_queries_claims_nothing(keyed):
    defense = dawn()
    evidence = Evidence(*(lambda x: x,) * 3, attackers=("attacker",), benign=())
    found = defense.report(defense.init(), evidence)
    assert found["watermarked_queries"] == found["watermarked_inputs"] == 0
    assert found["watermark_accuracy"] is None and found["watermark_p_value"] == 1.0
    assert found["watermark_confidence_bits"] == 0.0 and not found["watermark_meets_paper_bar"]
    assert str(found["watermark_confidence_bits"]) == "0.0"  # not -0.0 in results.json


def copies_every_watermark(state):
    """Label function of a perfect copy: the watermark label of every marked input."""
    labels = {record.digest: record.label for record in state.records}
    return lambda x: np.array([labels[hashlib.sha256(input_bytes(row)).hexdigest()] for row in x])


def attacker_evidence(surrogate_labels):
    return Evidence(
        surrogate_labels=surrogate_labels,
        independent_labels=lambda x: np.zeros(len(x), np.int64),
        victim_labels=lambda x: np.zeros(len(x), np.int64),
        attackers=("attacker",),
        benign=(),
    )


def test_requerying_the_pool_five_times_proves_no_more_than_querying_it_once(keyed):
    defense = dawn(rate=0.2)
    inputs, probs = queries(150)
    _, once = ask(defense, defense.init(), inputs, probs)
    five_times = defense.init()
    for _ in range(5):
        _, five_times = ask(defense, five_times, inputs, probs)
    found_once = defense.report(once, attacker_evidence(copies_every_watermark(once)))
    found_five = defense.report(five_times, attacker_evidence(copies_every_watermark(five_times)))
    n = found_once["watermarked_inputs"]
    assert n > 0 and found_five["watermarked_queries"] == 5 * n == 5 * found_once["watermarked_queries"]
    assert found_five["watermarked_inputs"] == n
    # a perfect copy of n distinct watermarks: p = 9^-n, however often each was served
    np.testing.assert_allclose(found_once["watermark_p_value"], 9.0**-n)
    for metric in ("watermark_accuracy", "watermark_p_value", "watermark_confidence_bits"):
        assert found_five[metric] == found_once[metric]
        assert found_five[f"{metric}_independent"] == found_once[f"{metric}_independent"]


def test_a_repeated_input_is_judged_against_the_label_first_served_for_it(keyed):
    defense = dawn(rate=1.0)
    inputs, probs = queries(1)
    _, state = ask(defense, defense.init(), inputs, probs)
    flipped = probs.copy()
    flipped[0] = np.roll(probs[0], 1)  # another top-1 class, as a noise defense earlier in a chain may cause
    _, state = ask(defense, state, inputs, flipped)
    first, second = state.records
    assert first.digest == second.digest and first.label != second.label
    found = defense.report(state, attacker_evidence(lambda x: np.array([second.label])))
    assert found["watermarked_queries"] == 2 and found["watermarked_inputs"] == 1
    assert found["watermark_accuracy"] == 0.0 and found["watermark_p_value"] == 1.0


@pytest.mark.parametrize(("inputs", "meets_bar"), [(20, False), (21, True)])
def test_paper_bar_needs_p_below_two_to_the_minus_64(keyed, inputs, meets_bar):
    # A perfect copy of n watermarks among 10 classes scores p = 9^-n: 20 give 2^-63.4, 21 give 2^-66.6.
    defense = dawn(rate=1.0)
    _, state = ask(defense, defense.init(), *queries(inputs))
    found = defense.report(state, attacker_evidence(copies_every_watermark(state)))
    np.testing.assert_allclose(found["watermark_confidence_bits"], inputs * np.log2(9))
    assert found["watermark_meets_paper_bar"] is meets_bar
    assert found["watermark_meets_paper_bar_independent"] is False


def test_confidence_stays_finite_where_the_p_value_underflows(keyed):
    defense = dawn(rate=1.0)
    _, state = ask(defense, defense.init(), *queries(400))
    found = defense.report(state, attacker_evidence(copies_every_watermark(state)))
    assert found["watermark_p_value"] == 0.0  # 9^-400 underflows float64
    np.testing.assert_allclose(found["watermark_confidence_bits"], 400 * np.log2(9))
    assert found["watermark_meets_paper_bar"]


def test_key_file_wins_and_a_missing_key_is_random_and_logged(tmp_path, monkeypatch, caplog):
    inputs, probs = queries(400)
    key_file = tmp_path / "dawn.key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv(DEFAULT_KEY_ENV, "another key")
    from_file = dawn(rate=0.1, key_file=str(key_file))
    monkeypatch.setenv(DEFAULT_KEY_ENV, KEY)
    from_env = dawn(rate=0.1)
    np.testing.assert_array_equal(
        ask(from_file, from_file.init(), inputs, probs)[0], ask(from_env, from_env.init(), inputs, probs)[0]
    )
    monkeypatch.delenv(DEFAULT_KEY_ENV)
    with caplog.at_level(logging.WARNING, logger="heistlab.defenses.dawn"):
        first, second = dawn(rate=0.1), dawn(rate=0.1)
    assert "random key for this run" in caplog.text
    assert not np.array_equal(
        ask(first, first.init(), inputs, probs)[0], ask(second, second.init(), inputs, probs)[0]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0.0}, "rate must be a number in \\(0, 1\\], got 0.0"),
        ({"rate": 1.5}, "rate must be a number in \\(0, 1\\], got 1.5"),
        ({"key_file": "/nonexistent/dawn.key"}, "key_file '/nonexistent/dawn.key' cannot be read"),
    ],
)
def test_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=f"dawn: {message}"):
        dawn(**kwargs)


def test_rejects_an_empty_key(tmp_path, monkeypatch):
    (tmp_path / "empty.key").write_text("\n")
    with pytest.raises(ValueError, match="dawn: key_file .* is empty"):
        dawn(key_file=str(tmp_path / "empty.key"))
    monkeypatch.setenv(DEFAULT_KEY_ENV, "")
    with pytest.raises(
        ValueError, match="dawn: key_env 'HEISTLAB_DAWN_KEY' names an empty environment variable"
    ):
        dawn()


def test_composes_in_a_chain_on_the_host(keyed):
    defense = chain(top_k(3), dawn(rate=0.2))
    inputs, probs = queries(100)
    served, state = ask(defense, defense.init(), inputs, probs, client="attacker-1")
    records = state[1].records
    assert defense.host and defense.report is not None and len(records) > 0
    assert {record.client for record in records} == {"attacker-1"}
    marked = np.isin(
        np.arange(100), [np.flatnonzero((inputs == r.input).all(axis=(1, 2, 3)))[0] for r in records]
    )
    np.testing.assert_array_equal(served[marked].max(axis=-1), 1.0)
    assert np.all((served[~marked] > 0).sum(axis=-1) == 3)


def served_row_by_row(probs, inputs, rate, client, key=None):
    """The filter one row at a time (the implementation before the batch was hashed in one pass)."""
    served, records = np.array(probs, copy=True), []
    classes, key = served.shape[-1], key or KEY.encode()
    for row, query in enumerate(inputs):
        tag = hmac.new(key, input_bytes(query), hashlib.sha256).digest()
        if int.from_bytes(tag[:2], "big") < 2**16 * rate:
            label = watermark_label(tag, int(np.argmax(served[row])), classes)
            served[row] = np.eye(classes, dtype=served.dtype)[label]
            records.append((client, hashlib.sha256(input_bytes(query)).hexdigest(), label))
    return served, records


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
@pytest.mark.parametrize("count", [0, 1, 300])
def test_batched_hashing_serves_and_records_as_the_row_by_row_filter(keyed, dtype, count):
    inputs, probs = queries(count, seed=count)
    inputs = (inputs * 255).astype(dtype)
    defense = dawn(rate=0.2)
    served, state = ask(defense, defense.init(), inputs, probs, client="c")
    expected, records = served_row_by_row(probs, inputs, 0.2, "c")
    np.testing.assert_array_equal(served, expected)
    assert [(record.client, record.digest, record.label) for record in state.records] == records
    assert all(record.input.dtype == inputs.dtype for record in state.records)
    assert count < 300 or records  # the seeded stream exercises the watermark path


@pytest.mark.parametrize("key_length", [0, 1, 32, 63, 64, 65, 200])
def test_keyed_tags_are_hmac_sha256_for_keys_shorter_equal_and_longer_than_a_block(key_length):
    key = bytes(np.random.default_rng(key_length).integers(0, 256, key_length, dtype=np.uint8))
    inputs, _ = queries(40, seed=key_length)
    inputs = np.concatenate([inputs, inputs[:5], inputs[3:4]])  # repeated rows get repeated tags
    expected = [hmac.digest(key, input_bytes(row), "sha256") for row in inputs]
    assert keyed_tags(key, rows_as_bytes(inputs)) == expected
    messages = [b"", b"abc"]
    assert keyed_tags(key, messages) == [hmac.digest(key, message, "sha256") for message in messages]


def test_rows_as_bytes_are_each_rows_input_bytes():
    inputs = (queries(7)[0] * 255).astype(np.uint8)[:, ::2]  # not contiguous, not float32
    assert [bytes(row) for row in rows_as_bytes(inputs)] == [input_bytes(row) for row in inputs]
    assert rows_as_bytes(np.zeros((0, 3), np.float32)) == []
    assert [bytes(row) for row in rows_as_bytes(np.zeros((3, 0), np.float32))] == [b"", b"", b""]


@pytest.mark.parametrize("classes", [2, 3, 10, 100])
@pytest.mark.parametrize("rate", [0.3, 1.0])
def test_serves_and_records_as_the_row_by_row_filter_on_repeats_and_ties(monkeypatch, classes, rate):
    key = b"k" * 70  # longer than SHA-256's block: hashed first
    monkeypatch.setenv(DEFAULT_KEY_ENV, key.decode())
    rng = np.random.default_rng(classes)
    inputs = rng.uniform(size=(500, 4, 4, 1)).astype(np.float32)
    inputs = inputs[rng.integers(0, 200, 500)]  # most rows repeated, in no order
    probs = rng.dirichlet(np.ones(classes), 500).astype(np.float32)
    probs[::7] = 1.0 / classes  # ties: the first top class wins, as np.argmax per row
    defense = dawn(rate=rate)
    served, state = ask(defense, defense.init(), inputs, probs, client="c")
    again, state = ask(defense, state, inputs, probs, client="c")
    expected, records = served_row_by_row(probs, inputs, rate, "c", key)
    np.testing.assert_array_equal(served, expected)
    np.testing.assert_array_equal(again, expected)
    assert served.dtype == expected.dtype
    assert [(record.client, record.digest, record.label) for record in state.records] == records + records
    marked = [row for row in range(500) if not np.array_equal(expected[row], probs[row])]
    for record, row in zip(state.records[: len(marked)], marked, strict=True):
        np.testing.assert_array_equal(record.input, inputs[row])
