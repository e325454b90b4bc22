import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heistlab.defenses.base import DefenderData, QueryContext
from heistlab.defenses.mad import (
    ARGMAX_MARGIN,
    angular_objective,
    argmax_preserving_target,
    best_class_set_target,
    distance_objective,
    last_layer_factors,
    last_layer_gram,
    mad,
    mad_argmax,
    mix_within_l1_ball,
    random_proxy,
)


def serve(defense, probs, inputs=None):
    probs = jnp.asarray(probs, jnp.float32)
    inputs = jnp.zeros((probs.shape[0], 1)) if inputs is None else inputs
    context = QueryContext(inputs=inputs, key=jax.random.key(0))
    return np.asarray(jax.jit(defense.apply)(probs, defense.init(), context)[0])


def random_rows(seed, count, classes, concentration=0.3):
    return np.random.default_rng(seed).dirichlet(np.full(classes, concentration), count).astype(np.float32)


@pytest.mark.slow
def test_gram_matches_the_autodiff_jacobian_of_the_last_layer():
    proxy = random_proxy(6, 5, (8, 6), seed=3)
    inputs = jax.random.uniform(jax.random.key(1), (4, 3, 2, 1))

    def class_nlls(last_layer, x):
        *hidden, _ = proxy
        features = x.reshape(1, -1)
        for kernel, bias in hidden:
            features = jax.nn.relu(features @ kernel + bias)
        return -jax.nn.log_softmax(features @ last_layer[0] + last_layer[1])[0]

    kernel_jacobian, bias_jacobian = jax.vmap(jax.jacrev(class_nlls), in_axes=(None, 0))(proxy[-1], inputs)
    flat = np.concatenate([kernel_jacobian.reshape(4, 5, -1), bias_jacobian], axis=-1)
    np.testing.assert_allclose(
        jax.jit(last_layer_gram)(proxy, inputs), np.einsum("bkd,bjd->bkj", flat, flat), rtol=1e-4, atol=1e-6
    )


def test_the_proxy_is_a_seeded_lecun_normal_mlp():
    proxy = random_proxy(64, 10, (256, 256), seed=0)
    assert [kernel.shape for kernel, _ in proxy] == [(64, 256), (256, 256), (256, 10)]
    assert all(not bias.any() for _, bias in proxy)
    np.testing.assert_allclose(proxy[1][0].std(), 1 / 16, rtol=0.02)
    np.testing.assert_array_equal(proxy[0][0], random_proxy(64, 10, (256, 256), seed=0)[0][0])
    assert not np.array_equal(proxy[0][0], random_proxy(64, 10, (256, 256), seed=1)[0][0])


def test_extreme_oracle_and_line_search_by_hand():
    # The distance objective ranks one-hot targets by ||e_k - y||_2, so the least likely class 2 wins;
    # ||e_2 - y||_1 = 0.7 + 0.2 + 0.9 = 1.8, alpha = 0.4 / 1.8 = 2/9, y' = 7/9 y + 2/9 e_2.
    served = serve(mad(0.4), [[0.7, 0.2, 0.1]])
    expected = np.array([[7 / 9 * 0.7, 7 / 9 * 0.2, 7 / 9 * 0.1 + 2 / 9]])
    np.testing.assert_allclose(served, expected, rtol=1e-5)
    np.testing.assert_allclose(np.abs(served - [[0.7, 0.2, 0.1]]).sum(), 0.4, rtol=1e-5)


@pytest.mark.slow
def test_line_search_stays_put_at_zero_and_reaches_a_close_target():
    probs = jnp.array([[0.5, 0.3, 0.2]])
    target = jnp.array([[0.0, 0.0, 1.0]])
    np.testing.assert_allclose(mix_within_l1_ball(probs, target, 0.0), probs)
    np.testing.assert_allclose(mix_within_l1_ball(probs, target, 1.6), target)
    np.testing.assert_allclose(mix_within_l1_ball(probs, target, 2.0), target)
    np.testing.assert_allclose(mix_within_l1_ball(probs, probs, 1.0), probs)


@pytest.mark.slow
@pytest.mark.parametrize(("objective", "preserve_argmax"), [("distance", False), ("angular", True)])
def test_answers_stay_in_the_l1_ball_on_the_simplex(objective, preserve_argmax):
    probs = random_rows(1, 32, 10)
    inputs = jax.random.uniform(jax.random.key(2), (32, 64))
    served = serve(mad(0.6, preserve_argmax=preserve_argmax, objective=objective), probs, inputs)
    assert np.all(served >= 0)
    np.testing.assert_allclose(served.sum(axis=-1), 1.0, atol=1e-5)
    assert np.all(np.abs(served - probs).sum(axis=-1) <= 0.6 + 1e-5)
    if preserve_argmax:
        np.testing.assert_array_equal(served.argmax(axis=-1), probs.argmax(axis=-1))
    else:
        assert np.any(served.argmax(axis=-1) != probs.argmax(axis=-1))


def numpy_distance(candidate, probs, gram):
    delta = candidate - probs
    return delta @ gram @ delta


def numpy_angle(candidate, probs, gram):
    factor = np.linalg.cholesky(gram + 1e-9 * np.eye(len(gram)))
    u, v = factor.T @ candidate, factor.T @ probs
    return np.sum((u / np.linalg.norm(u) - v / np.linalg.norm(v)) ** 2)


@pytest.mark.parametrize(
    ("objective", "reference"), [(distance_objective, numpy_distance), (angular_objective, numpy_angle)]
)
def test_argmax_preserving_oracle_finds_the_best_class_set(objective, reference):
    classes, rows = 5, 6
    probs = random_rows(3, rows, classes)
    factors = np.random.default_rng(4).normal(size=(rows, classes, 7))
    gram = np.einsum("bkd,bjd->bkj", factors, factors)
    oracle = jax.jit(argmax_preserving_target, static_argnums=2)
    target = np.asarray(oracle(jnp.asarray(probs), jnp.asarray(gram, jnp.float32), objective))
    for row in range(rows):
        top = probs[row].argmax()
        best = -np.inf
        for members in itertools.product([0.0, 1.0], repeat=classes):
            weights = np.array(members)
            weights[top] = 1.0 + ARGMAX_MARGIN
            best = max(best, reference(weights / weights.sum(), probs[row], gram[row]))
        np.testing.assert_allclose(reference(target[row], probs[row], gram[row]), best, rtol=1e-4)
        assert target[row].argmax() == top


@pytest.mark.slow
def test_angular_objective_by_hand():
    # With G G^T = I the objective is ||c / |c| - y / |y|||^2: c = e_0, y = (0.6, 0.8) gives |y| = 1 and
    # (1 - 0.6)^2 + 0.8^2 = 0.8.
    value = angular_objective(jnp.array([[[1.0, 0.0]]]), jnp.array([[0.6, 0.8]]), jnp.eye(2)[None])
    np.testing.assert_allclose(value, [[0.8]], rtol=1e-6)


@pytest.mark.slow
def test_greedy_search_beyond_ten_classes_keeps_argmax_and_the_ball():
    probs = random_rows(5, 16, 12, concentration=0.5)
    served = serve(
        mad_argmax(1.0, objective="angular"), probs, jax.random.uniform(jax.random.key(6), (16, 4))
    )
    np.testing.assert_array_equal(served.argmax(axis=-1), probs.argmax(axis=-1))
    assert np.all(np.abs(served - probs).sum(axis=-1) <= 1.0 + 1e-5)
    assert np.all(np.abs(served - probs).sum(axis=-1) > 0.01)


@pytest.mark.slow
def test_the_defender_seed_picks_the_proxy_and_its_shape_is_enforced():
    defender = DefenderData(np.zeros((1, 4, 4, 1)), np.zeros(1), (4, 4, 1), 10, seed=7)
    probs = random_rows(7, 16, 10)
    inputs = jax.random.uniform(jax.random.key(8), (16, 4, 4, 1))
    first = serve(mad(0.8, defender, objective="angular"), probs, inputs)
    other = serve(mad(0.8, defender._replace(seed=8), objective="angular"), probs, inputs)
    assert not np.array_equal(first, other)
    with pytest.raises(ValueError, match=r"mad: the proxy was built for inputs \(4, 4, 1\)"):
        serve(mad(0.8, defender), probs, jnp.zeros((16, 3)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": -0.1}, "mad: epsilon must be a finite number >= 0, got -0.1"),
        ({"epsilon": float("nan")}, "mad: epsilon must be a finite number >= 0, got nan"),
        ({"objective": "cosine"}, "mad: objective must be one of distance, angular; got 'cosine'"),
        ({"proxy_hidden": []}, r"mad: proxy_hidden must be a non-empty list of ints >= 1, got \[\]"),
        ({"preserve_argmax": 1}, "mad: preserve_argmax must be a bool, got 1"),
        ({"defender": (1, 2)}, "mad: defender must be a DefenderData or None, got tuple"),
    ],
)
def test_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mad(**kwargs)


def test_argmax_variant_names_itself_in_errors():
    with pytest.raises(ValueError, match="mad_argmax: epsilon must be"):
        mad_argmax(-1.0)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["distance", "angular"])
@pytest.mark.parametrize("epsilon", [0.4, 1.7])
def test_class_set_search_from_gram_factors_equals_the_search_over_the_gram(objective, epsilon):
    """The served answers equal the generic oracle's on the explicit ``(batch, classes, classes)`` gram."""
    classes, rows = 10, 600
    inputs = jax.random.uniform(jax.random.key(7), (rows, 8, 8, 1))
    probs = jnp.asarray(
        np.concatenate([random_rows(8, rows // 2, classes, 0.1), random_rows(9, rows // 2, classes, 2.0)])
    )
    proxy = random_proxy(64, classes, (256, 256), seed=0)
    score = {"distance": distance_objective, "angular": angular_objective}[objective]

    @jax.jit
    def over_the_gram(probs, inputs):
        target = argmax_preserving_target(probs, last_layer_gram(proxy, inputs), score)
        return target, mix_within_l1_ball(probs, target, epsilon)

    target, expected = over_the_gram(probs, inputs)
    served = serve(mad_argmax(epsilon, objective=objective), probs, inputs)
    chosen = jax.jit(lambda p, x: best_class_set_target(p, *last_layer_factors(proxy, x), objective))
    np.testing.assert_array_equal(chosen(probs, inputs), target)
    np.testing.assert_array_equal(served, expected)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["distance", "angular"])
def test_class_set_search_equals_the_gram_search_on_peaked_and_uniform_answers(objective):
    """Victim-like answers, from nearly flat to one-hot, and exactly uniform ones (the API's padding rows):
    scoring only the sets of the non-top classes picks the target the search over all sets picks."""
    classes, rows = 10, 512
    temperature = np.repeat([0.3, 3.0, 10.0, 30.0], rows // 4)[:, None]
    logits = np.random.default_rng(3).normal(size=(rows, classes)) * temperature
    probs = np.array(jax.nn.softmax(logits), np.float32)
    probs[:16] = 1.0 / classes
    inputs = jax.random.uniform(jax.random.key(5), (rows, 8, 8, 1))
    proxy = random_proxy(64, classes, (256, 256), seed=0)
    score = {"distance": distance_objective, "angular": angular_objective}[objective]
    expected = jax.jit(lambda p, x: argmax_preserving_target(p, last_layer_gram(proxy, x), score))(
        probs, inputs
    )
    chosen = jax.jit(lambda p, x: best_class_set_target(p, *last_layer_factors(proxy, x), objective))
    np.testing.assert_array_equal(chosen(probs, inputs), expected)
