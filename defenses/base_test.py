import jax
import jax.numpy as jnp
import numpy as np

from heistlab.defenses.base import QueryContext, chain, identity, stateless

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
