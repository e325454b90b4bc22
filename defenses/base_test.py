import jax
import jax.numpy as jnp
import numpy as np

from defenses.base import QueryContext, chain, identity, stateless

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
