import functools
import hashlib
import hmac

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heistlab import data, victims
from heistlab.api import PredictionAPI
from heistlab.defenses.base import DefenderData, Evidence, QueryContext
from heistlab.defenses.edm import (
    DEFAULT_KEY_ENV,
    all_members,
    check_settings,
    coherence,
    distinct_rows,
    edm,
    ensemble_probabilities,
    grouped_probabilities,
    select_members,
    selected_members,
    trained_ensemble,
)
from heistlab.models import MLP

KEY = b"edm test key"


@functools.cache
def digits() -> data.Splits:
    return data.make_splits(data.load_digits(), seed=0)


@functools.cache
def small_edm(key: str = "k1", diversity_weight: float = 1.0):
    """A 3-member ensemble of 64-32-10 MLPs on the digits victim split, keyed by ``key``."""
    splits = digits()
    defender = DefenderData(splits.victim_train.x, splits.victim_train.y, splits.input_shape, 10, 0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DEFAULT_KEY_ENV, key)
        return edm(defender, members=3, diversity_weight=diversity_weight, hidden=[32], epochs=30)


def ask(defense, inputs, state=None, client="attacker"):
    state = defense.init() if state is None else state
    probs = jnp.full((len(inputs), 10), 0.1, jnp.float32)
    return defense.apply(probs, state, QueryContext(inputs, jax.random.key(0), client))


def noise(count, seed=0):
    return np.random.default_rng(seed).uniform(size=(count, 8, 8, 1)).astype(np.float32)


def test_selection_is_the_keyed_hash_worked_out_by_hand():
    inputs = noise(20)
    expected = [
        int.from_bytes(hmac.new(KEY, row.tobytes(), hashlib.sha256).digest()[:8], "big") % 5 for row in inputs
    ]
    np.testing.assert_array_equal(select_members(KEY, inputs, 5), expected)


def test_selection_is_stable_keyed_and_roughly_uniform():
    inputs = noise(3000)
    chosen = select_members(KEY, inputs, 5)
    np.testing.assert_array_equal(select_members(KEY, inputs.copy(), 5), chosen)
    np.testing.assert_array_equal(select_members(KEY, inputs[::-1], 5), chosen[::-1])
    other = select_members(b"another key", inputs, 5)
    # under an independent key a row keeps its member with probability 1/5
    assert 0.15 < np.mean(other == chosen) < 0.25
    shares = np.bincount(chosen, minlength=5) / len(chosen)
    assert np.all(np.abs(shares - 0.2) < 0.03), shares


def test_coherence_by_hand():
    # members' outputs on one input: (1, 0), (0, 1), (0.6, 0.8): the most similar pair is the second and
    # third, cos = 0.8
    outputs = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]], [[0.6, 0.8]]])
    np.testing.assert_allclose(coherence(outputs), [0.8], rtol=1e-6)


@pytest.mark.slow
def test_members_disagree_out_of_distribution_and_agree_in_it():
    defense = small_edm()
    splits = digits()
    _, state = ask(defense, splits.test.x, client="in")
    _, state = ask(defense, noise(len(splits.test.x)), state, client="out")
    disputed_in = state.disputed["in"] / state.answered["in"]
    disputed_out = state.disputed["out"] / state.answered["out"]
    assert disputed_in < 0.25 and disputed_out > 0.6 and disputed_out > 3 * disputed_in, (
        disputed_in,
        disputed_out,
    )


@pytest.mark.slow
def test_serves_the_keyed_member_and_the_same_answer_to_a_repeat():
    splits = digits()
    inputs = noise(64)
    first, _ = ask(small_edm("k1"), inputs)
    again, _ = ask(small_edm("k1"), inputs.copy())
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(np.asarray(first).sum(-1), 1.0, atol=1e-5)
    # the same trained members under another key: the answers change where the selected member does
    rekeyed, _ = ask(small_edm("k2"), inputs)
    moved = select_members(b"k1", inputs, 3) != select_members(b"k2", inputs, 3)
    assert moved.any()
    top_first, top_rekeyed = np.argmax(first, -1), np.argmax(rekeyed, -1)
    assert np.mean(top_first[moved] != top_rekeyed[moved]) > 0.5
    np.testing.assert_array_equal(first[~moved], rekeyed[~moved])
    # in distribution every member is accurate, so the served accuracy is the members'
    served, _ = ask(small_edm("k1"), splits.test.x)
    assert np.mean(np.argmax(served, -1) == splits.test.y) > 0.9


@pytest.mark.slow
def test_report_gives_member_and_served_accuracy_and_attacker_statistics():
    defense = small_edm()
    _, state = ask(defense, noise(300))
    evidence = Evidence(None, None, None, attackers=("attacker",), benign=())
    found = defense.report(state, evidence)
    members = [found[f"edm_member{index}_accuracy_holdout"] for index in range(3)]
    assert min(members) > 0.75 and found["edm_served_accuracy_holdout"] > 0.75
    assert found["edm_member_accuracy_holdout"] == pytest.approx(np.mean(members))
    assert found["edm_disputed_fraction"] > 0.6
    assert 1 / 3 <= found["edm_member_share_max"] < 0.45


class UniformVictim:
    """A victim that knows nothing: every answer the API serves under EDM comes from the ensemble."""

    input_shape, num_classes = (8, 8, 1), 10

    def predict_proba(self, inputs):
        return np.full((len(inputs), 10), 0.1, np.float32)


@pytest.mark.slow
def test_repeating_a_query_through_the_api_gets_the_same_member_so_averaging_is_no_help():
    api = PredictionAPI(UniformVictim(), small_edm(), key=jax.random.key(0), budget=None)
    query = noise(32, seed=5)
    answers = np.stack([api.query(query, client="attacker") for _ in range(4)])
    np.testing.assert_array_equal(answers, answers[:1].repeat(4, axis=0))
    assert api.report(Evidence(None, None, None, ("attacker",), ()))["edm_disputed_fraction"] > 0.6


def test_requires_the_defender_data():
    with pytest.raises(ValueError, match="edm: defender must be a DefenderData"):
        edm()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"members": 1}, "members must be an int >= 2, got 1"),
        ({"diversity_weight": -1.0}, "diversity_weight must be a finite number >= 0"),
        ({"ood": ["gaussian"]}, "ood must be a non-empty list of uniform, shuffled"),
        ({"hidden": []}, "hidden must be a non-empty list of ints >= 1"),
        ({"epochs": 0}, "epochs must be an int >= 1, got 0"),
        ({"holdout_fraction": 1.0}, r"holdout_fraction must be a number in \[0, 1\)"),
        ({"holdout_fraction": 0.9}, "holdout_fraction=0.9 leaves none of the defender's 2 samples"),
    ],
)
def test_rejects_bad_parameters_before_training(kwargs, message):
    defender = DefenderData(np.zeros((2, 1), np.float32), np.zeros(2, np.int32), (1,), 2, 0)
    with pytest.raises(ValueError, match=f"edm: {message}"):
        edm(defender, **kwargs)


@pytest.mark.parametrize("members", [1, 2, 3, 7])
def test_selection_equals_hmac_per_row_for_any_member_count_and_repeats(members):
    inputs = np.concatenate([noise(30), noise(30)[:5], noise(1, seed=3)])
    expected = [
        int.from_bytes(hmac.new(KEY, row.tobytes(), hashlib.sha256).digest()[:8], "big") % members
        for row in inputs
    ]
    np.testing.assert_array_equal(select_members(KEY, inputs, members), expected)
    assert select_members(KEY, inputs[:0], members).shape == (0,)


@functools.cache
def quick_edm(dispute_rows: int | None = 256):
    """A barely trained 3-member ensemble (the serving paths are compared, not its accuracy)."""
    splits = digits()
    defender = DefenderData(splits.victim_train.x, splits.victim_train.y, splits.input_shape, 10, 0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DEFAULT_KEY_ENV, "quick")
        return edm(defender, members=3, hidden=[16], epochs=1, dispute_rows=dispute_rows)


def with_repeats(count: int) -> np.ndarray:
    """Noise rows, some of them sent again later in the batch, and digits."""
    fresh = noise(count // 2, seed=7)
    return np.resize(np.concatenate([fresh, digits().test.x[: count // 4], fresh[::3]]), (count, 8, 8, 1))


def assert_same_answers(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 rounding of a different batch shape (XLA may pick other kernels), same top-1."""
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(expected, -1))


def test_distinct_rows_are_byte_identical_rows_in_order_of_first_sending():
    row = noise(1, seed=1)
    zero, negative_zero, trailing = np.zeros_like(row), -np.zeros_like(row), row.copy()
    trailing.reshape(-1)[-3:] = 0.0
    inputs = np.concatenate([row, zero, negative_zero, trailing, row, zero, noise(2), trailing])
    first, occurrence = distinct_rows(inputs)
    np.testing.assert_array_equal(first, [0, 1, 2, 3, 6, 7])
    np.testing.assert_array_equal(occurrence, [0, 1, 2, 3, 0, 1, 4, 5, 3])
    assert inputs[first][occurrence].tobytes() == inputs.tobytes()
    empty_first, empty_occurrence = distinct_rows(inputs[:0])
    assert empty_first.shape == empty_occurrence.shape == (0,)


@pytest.mark.parametrize("skew", ["uniform", "one_member", "one_empty"])
def test_each_member_on_its_own_rows_gives_its_answers_among_all_members(skew):
    model = MLP(10, (32, 32))
    keys = jax.random.split(jax.random.key(1), 4)
    params = jax.vmap(lambda key: model.init(key, jnp.zeros((1, 8, 8, 1))))(keys)
    inputs = noise(700, seed=2)
    chosen = {
        "uniform": np.random.default_rng(0).integers(0, 4, len(inputs)),
        "one_member": np.full(len(inputs), 2),
        "one_empty": np.arange(len(inputs)) % 3,
    }[skew]
    every = all_members(ensemble_probabilities(model), params, inputs)
    served = selected_members(grouped_probabilities(model), params, inputs, chosen, 4)
    assert_same_answers(served, every[chosen, np.arange(len(inputs))])


@pytest.mark.slow
@pytest.mark.parametrize("count", [40, 300])
def test_bounding_dispute_rows_changes_no_answer_and_checks_the_first_rows(count):
    inputs = with_repeats(count)
    bounded, complete = quick_edm(dispute_rows=16), quick_edm(dispute_rows=None)
    served, state = ask(bounded, inputs)
    expected, complete_state = ask(complete, inputs)
    assert served.dtype == expected.dtype == np.float32
    assert_same_answers(served, expected)
    assert state.answered == complete_state.answered == {"attacker": count}
    assert state.by_member == complete_state.by_member
    assert state.checked == {"attacker": 16} and complete_state.checked == {"attacker": count}
    _, first_rows = ask(complete, inputs[:16])
    assert state.disputed == first_rows.disputed


@pytest.mark.slow
def test_each_row_is_served_by_its_keyed_member_alone():
    inputs = with_repeats(300)
    served, _ = ask(quick_edm(dispute_rows=0), inputs)
    splits = digits()
    defender = DefenderData(splits.victim_train.x, splits.victim_train.y, splits.input_shape, 10, 0)
    settings = check_settings(defender, 3, 1.0, ("uniform", "shuffled"), [16], 1, 64, 1e-3, 0.1)
    ensemble = trained_ensemble(defender, settings)  # quick_edm's members, from the in-process cache
    every = all_members(ensemble_probabilities(ensemble.model), ensemble.params, inputs)
    nearest = np.abs(every - served[None]).max(axis=-1).argmin(axis=0)
    np.testing.assert_array_equal(nearest, select_members(b"quick", inputs, 3))
    assert_same_answers(served, every[nearest, np.arange(len(inputs))])


@pytest.mark.slow
def test_report_gives_the_disputed_fraction_over_the_rows_checked():
    defense = quick_edm(dispute_rows=16)
    _, state = ask(defense, with_repeats(300))
    _, state = ask(defense, with_repeats(10), state)
    _, state = ask(defense, with_repeats(40), state, client="benign")
    found = defense.report(state, Evidence(None, None, None, attackers=("attacker",), benign=()))
    assert found["edm_disputed_rows"] == 26
    assert found["edm_disputed_fraction"] == state.disputed["attacker"] / 26
    assert found["edm_member_share_max"] == max(state.by_member["attacker"]) / 310
    _, state = ask(quick_edm(dispute_rows=0), with_repeats(40))
    found = quick_edm(dispute_rows=0).report(state, Evidence(None, None, None, ("attacker",), ()))
    assert found["edm_disputed_rows"] == 0 and "edm_disputed_fraction" not in found


@pytest.mark.parametrize("value", [-1, 2.5, True, "256"])
def test_rejects_bad_dispute_rows(value):
    defender = DefenderData(np.zeros((2, 1), np.float32), np.zeros(2, np.int32), (1,), 2, 0)
    with pytest.raises(ValueError, match="edm: dispute_rows must be an int >= 0 or null"):
        edm(defender, dispute_rows=value)


@pytest.mark.slow
@pytest.mark.parametrize("size", [5, 300, 4096])
def test_the_api_serves_edm_without_its_victim_exactly_as_with_it(size):
    splits = digits()
    model = MLP(10, (16,))
    victim = victims.Victim(model, model.init(jax.random.key(0), splits.test.x[:1]), splits.input_shape)
    defense = quick_edm()
    assert defense.replaces_victim
    skipping = PredictionAPI(victim, defense, key=jax.random.key(0))
    running = PredictionAPI(victim, defense._replace(replaces_victim=False), key=jax.random.key(0))
    inputs = np.resize(with_repeats(300), (size, *splits.input_shape))
    for client in ("alice", "bob"):
        np.testing.assert_array_equal(skipping.query(inputs, client), running.query(inputs, client))
    assert skipping.defense_state() == running.defense_state()
