import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heistlab.defenses.base import (
    PAIRWISE_RANK_MAX_CLASSES,
    QueryContext,
    chain,
    descending_ranks,
    distinct_rows,
    identity,
    project_to_simplex,
    sorted_descending,
    stateless,
)

PROBS = jnp.array([[0.2, 0.3, 0.5]], jnp.float32)
CONTEXT = QueryContext(inputs=jnp.zeros((1, 1)), key=jax.random.key(7))


def serve(defense):
    return defense.apply(PROBS, defense.init(), CONTEXT)[0]


def draw():
    """A defense that serves a uniform draw from its key, to see which key each chain member gets."""
    return stateless(lambda probs, context: jax.random.uniform(context.key, probs.shape))


def test_chain_applies_in_order():
    double = stateless(lambda probs, context: probs * 2)
    add_one = stateless(lambda probs, context: probs + 1)
    np.testing.assert_allclose(serve(chain(double, add_one)), PROBS * 2 + 1)
    np.testing.assert_allclose(serve(chain(add_one, double)), (PROBS + 1) * 2)


def test_chain_gives_each_defense_its_own_key():
    first = chain(draw(), identity())
    second = chain(identity(), draw())
    np.testing.assert_array_equal(
        serve(first), jax.random.uniform(jax.random.fold_in(CONTEXT.key, 0), (1, 3))
    )
    np.testing.assert_array_equal(
        serve(second), jax.random.uniform(jax.random.fold_in(CONTEXT.key, 1), (1, 3))
    )
    assert not np.allclose(serve(first), serve(second))


def test_appending_a_defense_keeps_the_earlier_randomness():
    np.testing.assert_array_equal(serve(chain(draw())), serve(chain(draw(), identity())))


def test_chain_state_is_the_tuple_of_member_states():
    defense = chain(identity(), identity())
    served, state = defense.apply(PROBS, defense.init(), CONTEXT)
    assert len(state) == 2
    np.testing.assert_array_equal(served, PROBS)


def fixed_admission(delay, refuse_after=None):
    """Admits with ``delay`` and counts admissions in its state; refuses once ``refuse_after`` are counted."""

    def admit(count, request):
        from heistlab.defenses.base import Verdict

        if refuse_after is not None and count >= refuse_after:
            return Verdict(admitted=False, delay=5.0, reason="full"), count
        return Verdict(admitted=True, delay=delay), count + request.size

    return identity()._replace(init=lambda: 0, admit=admit)


def test_chain_admission_adds_delays_and_a_refusal_changes_no_state():
    from heistlab.defenses.base import Request

    defense = chain(fixed_admission(1.5), fixed_admission(2.0, refuse_after=3))
    verdict, state = defense.admit(defense.init(), Request("c", 3, 0.0))
    assert verdict.admitted and verdict.delay == 3.5 and state == (3, 3)
    refused, after = defense.admit(state, Request("c", 1, 3.5))
    assert not refused.admitted and refused.reason == "full" and refused.delay == 5.0
    assert after == state


def test_chain_on_host_jits_pure_members_and_hides_the_client_from_them():
    seen = []

    def host_apply(probs, state, context):
        seen.append(context.client)
        return probs, state

    host_member = identity()._replace(apply=host_apply, host=True)
    defense = chain(stateless(lambda probs, context: probs * 1.0), host_member)
    assert defense.host
    context = CONTEXT._replace(client="alice", now=2.0)
    served, _ = defense.apply(PROBS, defense.init(), context)
    np.testing.assert_allclose(served, PROBS)
    assert seen == ["alice"]


def test_chain_composes_preprocessing_reports_and_training_augmentation():
    add = identity()._replace(preprocess=lambda x: x + 1)
    double = identity()._replace(preprocess=lambda x: x * 2)
    np.testing.assert_allclose(chain(add, double).preprocess(jnp.ones(2)), [4.0, 4.0])
    first = identity()._replace(report=lambda state, evidence: {"a": 1})
    second = identity()._replace(report=lambda state, evidence: {"b": 2})
    assert chain(first, second).report(((), ()), None) == {"a": 1, "b": 2}
    extend = identity()._replace(
        augment_training=lambda x, y: (np.concatenate([x, x]), np.concatenate([y, y]))
    )
    x, y = chain(identity(), extend).augment_training(np.zeros((2, 1)), np.zeros(2))
    assert len(x) == len(y) == 4
    assert chain(identity()).admit is None and chain(identity()).preprocess is None


def rows_with_ties(classes: int) -> np.ndarray:
    """Random float32 rows, with repeated values (ties), zeros and a row of one value repeated."""
    rng = np.random.default_rng(classes)
    rows = rng.normal(size=(512, classes)).astype(np.float32)
    rows[::3, -1] = rows[::3, 0]
    rows[1::5, : classes // 2] = 0.0
    rows[2::7] = np.round(rows[2::7])
    rows[4] = 0.25
    return rows


@pytest.mark.parametrize("classes", [1, 2, 10, PAIRWISE_RANK_MAX_CLASSES, PAIRWISE_RANK_MAX_CLASSES + 1])
def test_descending_ranks_are_a_stable_argsorts_ranks(classes):
    rows = rows_with_ties(classes)
    order = np.argsort(-rows, axis=-1, kind="stable")
    expected = np.argsort(order, axis=-1, kind="stable")
    np.testing.assert_array_equal(np.asarray(jax.jit(descending_ranks)(rows)), expected)


@pytest.mark.parametrize("classes", [1, 2, 10, PAIRWISE_RANK_MAX_CLASSES, PAIRWISE_RANK_MAX_CLASSES + 1])
def test_sorted_descending_equals_a_sort(classes):
    rows = rows_with_ties(classes)
    # Equal values, bit for bit but for where a row's 0.0 and -0.0 go (they compare equal).
    np.testing.assert_array_equal(np.asarray(jax.jit(sorted_descending)(rows)), -np.sort(-rows, axis=-1))


@pytest.mark.parametrize("classes", [2, 10, PAIRWISE_RANK_MAX_CLASSES])
def test_simplex_projection_equals_its_sorting_form(classes):
    def sorting_projection(values):
        ordered = -jnp.sort(-values, axis=-1)
        cumulative = jnp.cumsum(ordered, axis=-1) - 1.0
        ranks = jnp.arange(1, values.shape[-1] + 1, dtype=values.dtype)
        rho = jnp.sum(ordered - cumulative / ranks > 0, axis=-1, keepdims=True)
        theta = jnp.take_along_axis(cumulative, rho - 1, axis=-1) / rho.astype(values.dtype)
        return jnp.maximum(values - theta, 0.0)

    rows = rows_with_ties(classes)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(project_to_simplex)(rows)), np.asarray(jax.jit(sorting_projection)(rows))
    )


def test_simplex_projection_by_hand_and_onto_the_simplex():
    # (0.5, 0.5, 0.5): theta = (1.5 - 1) / 3, each coordinate 1/3; (2, 0, 0): theta = 1, (1, 0, 0).
    projected = np.asarray(project_to_simplex(jnp.array([[0.5, 0.5, 0.5], [2.0, 0.0, 0.0]], jnp.float32)))
    np.testing.assert_allclose(projected, [[1 / 3] * 3, [1.0, 0.0, 0.0]], rtol=1e-6)
    rows = project_to_simplex(jnp.asarray(rows_with_ties(10)))
    assert np.all(np.asarray(rows) >= 0)
    np.testing.assert_allclose(np.asarray(rows).sum(axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("count", [0, 1, 500])
def test_distinct_rows_group_byte_identical_rows_whichever_grouping_runs(monkeypatch, count):
    rng = np.random.default_rng(count)
    pool = rng.uniform(size=(max(count // 3, 1), 4, 4, 1)).astype(np.float32)
    inputs = pool[rng.integers(0, len(pool), count)]
    expected_first = [
        row
        for row in range(count)
        if not any(np.array_equal(inputs[row], inputs[earlier]) for earlier in range(row))
    ]
    first, occurrence = distinct_rows(inputs)
    np.testing.assert_array_equal(first, expected_first)
    assert inputs[first][occurrence].tobytes() == inputs.tobytes()
    # Weights that map every row to the same key: the byte check fails and the exact grouping answers.
    monkeypatch.setattr(
        importlib.import_module("heistlab.defenses.base"),
        "_row_weights",
        lambda width, dtype: np.zeros(width, dtype),
    )
    exact_first, exact_occurrence = distinct_rows(inputs)
    np.testing.assert_array_equal(exact_first, first)
    np.testing.assert_array_equal(exact_occurrence, occurrence)
