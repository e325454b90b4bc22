import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from heistlab.defenses.base import Evidence, QueryContext
from heistlab.defenses.feature_squeezing import (
    feature_squeezing,
    median_smooth,
    reduce_bit_depth,
    sorted_by_exchanges,
    squeezing_score,
)


def test_bit_depth_reduction_rounds_to_evenly_spaced_levels():
    values = jnp.array([0.0, 0.1, 0.2, 0.5, 0.76, 1.0])
    np.testing.assert_allclose(reduce_bit_depth(values, 1), [0, 0, 0, 0, 1, 1])  # rint(0.5) is 0, as numpy's
    np.testing.assert_allclose(reduce_bit_depth(values, 2), [0, 0, 1 / 3, 2 / 3, 2 / 3, 1], atol=1e-6)


@pytest.mark.parametrize("window", [1, 2, 3, 4])
@pytest.mark.parametrize("levels", [None, 4])
def test_median_smoothing_matches_scipy_as_the_authors_call_it(window, levels):
    images = np.random.default_rng(window).uniform(size=(3, 8, 7, 2)).astype(np.float32)
    if levels is not None:  # few distinct values: many ties in every window
        images = np.round(images * levels) / levels
    expected = ndimage.median_filter(images, size=(1, window, window, 1), mode="reflect")
    np.testing.assert_array_equal(median_smooth(jnp.asarray(images), window), expected)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 9, 16])
def test_sorting_by_exchanges_sorts_every_position(count):
    values = np.random.default_rng(count).integers(0, 5, size=(count, 50)).astype(np.float32)
    exchanged = sorted_by_exchanges([jnp.asarray(row) for row in values])
    np.testing.assert_array_equal(np.stack(exchanged), np.sort(values, axis=0))


def test_median_smoothing_needs_images():
    with pytest.raises(ValueError, match=r"\(batch, height, width, channels\)"):
        median_smooth(jnp.zeros((2, 64)), 2)


def test_preprocess_composes_bit_depth_then_median_and_is_jittable():
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 1)), jnp.float32)
    defense = feature_squeezing(bit_depth=3, median_window=2)
    expected = median_smooth(reduce_bit_depth(images, 3), 2)
    np.testing.assert_allclose(jax.jit(defense.preprocess)(images), expected)
    np.testing.assert_allclose(feature_squeezing(bit_depth=3, median_window=1).preprocess(images),
                               reduce_bit_depth(images, 3))  # fmt: skip


def test_rows_are_scored_flagged_and_tallied_per_client():
    defense = feature_squeezing(threshold=0.3)
    raw = jnp.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    squeezed = jnp.array([[0.9, 0.1], [1.0, 0.0], [0.0, 1.0]])  # scores 0.2, 1.0, 0.0
    np.testing.assert_allclose(squeezing_score(raw, squeezed), [0.2, 1.0, 0.0], atol=1e-6)
    state = defense.init()
    for client, rows in (("attacker", slice(0, 3)), ("benign-0", slice(0, 1))):
        context = QueryContext(jnp.zeros((3, 8, 8, 1))[rows], jax.random.key(0), client, raw_probs=raw[rows])
        served, state = defense.apply(squeezed[rows], state, context)
        np.testing.assert_array_equal(served, squeezed[rows])
    labels = lambda x: x
    found = defense.report(state, Evidence(labels, labels, labels, ("attacker",), ("benign-0", "benign-1")))
    assert found["squeezing_flagged_fraction_attack"] == pytest.approx(1 / 3)
    assert found["squeezing_mean_score_attack"] == pytest.approx(0.4)
    assert found["squeezing_flagged_fraction_benign"] == 0.0
    no_benign = defense.report(state, Evidence(labels, labels, labels, ("attacker",), ()))
    assert no_benign["squeezing_flagged_fraction_benign"] is None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"bit_depth": 0}, r"bit_depth must be an int in \[1, 16\] or None, got 0"),
        ({"median_window": 0}, "median_window must be an int >= 1 or None, got 0"),
        ({"threshold": 3.0}, r"threshold must be a number in \[0, 2\]"),
        ({"bit_depth": None, "median_window": 1}, "enable a squeezer"),
    ],
)
def test_bad_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        feature_squeezing(**arguments)
