"""Functionally-equivalent extraction's parts: where its segments run and how it refines a hyperplane (the
whole attack on digits victims is tested in tests/test_attacks_extraction.py)."""

from __future__ import annotations

import numpy as np
import pytest

from heistlab.attacks.functional_equivalence import (
    Unit,
    functional_equivalence,
    next_segments,
    pool_rows,
    refined_hyperplane,
)


def test_every_segment_starts_at_an_endpoint_already_visited():
    rng = np.random.default_rng(0)
    pool = np.full((3, 4), 0.25)
    visited: list[np.ndarray] = []
    segments = next_segments(rng, visited, pool, (0.5, 0.25), 40)
    assert len(visited) == 41
    for index, segment in enumerate(segments):
        # The start was visited before this segment; its end is the next endpoint visited.
        assert any(np.array_equal(segment.start, point) for point in visited[: index + 1])
        np.testing.assert_array_equal(segment.start + segment.direction, visited[index + 1])
    ends = np.array(visited)
    from_pool = np.all(ends == 0.25, axis=1)
    vertices = np.all((ends == 0.0) | (ends == 1.0), axis=1)
    assert from_pool.any() and vertices.any() and (~from_pool & ~vertices).any()


def test_endpoints_come_only_from_the_pool_when_pool_fraction_is_one():
    pool = np.random.default_rng(1).uniform(size=(5, 4)).astype(np.float32).astype(np.float64)
    visited: list[np.ndarray] = []
    next_segments(np.random.default_rng(0), visited, pool, (1.0, 0.0), 20)
    assert all(any(np.array_equal(point, row) for row in pool) for point in visited)


def test_a_pool_of_another_shape_or_range_gives_no_endpoints():
    assert pool_rows(np.zeros((0, 8, 8, 1)), 64).shape == (0, 64)
    assert pool_rows(np.full((2, 64), 2.0), 64).shape == (0, 64)
    assert pool_rows(np.full((2, 8, 8, 1), 0.5), 64).shape == (2, 64)


def test_a_hyperplane_seen_at_more_kinks_than_unknowns_is_their_least_squares_plane():
    # 80 kinks on a plane of [0, 1]^64, located to 1e-5; the first row is off by about 1e-3. Projecting the
    # first row onto the solutions of all 80 equations leaves only noise (it was off by 0.6 here).
    rng = np.random.default_rng(0)
    normal = rng.normal(size=64)
    normal /= np.linalg.norm(normal)
    bias = -normal.sum() / 2
    points = rng.uniform(size=(80, 64))
    points -= np.outer(points @ normal + bias, normal)
    points += rng.normal(scale=1e-5, size=points.shape)
    rough = normal + rng.normal(scale=1e-3, size=64)
    rough /= np.linalg.norm(rough)
    weights, refined_bias = refined_hyperplane(
        Unit(rough, float(-rough @ points[0]), np.zeros(10), list(points))
    )
    np.testing.assert_allclose(weights, normal, atol=1e-4)
    assert refined_bias == pytest.approx(bias, abs=1e-4)


def test_a_hyperplane_seen_at_few_kinks_passes_through_them():
    normal = np.array([0.6, 0.8, 0.0])
    points = [np.array([0.5, 0.0, 0.2]), np.array([0.1, 0.3, 0.9])]
    unit = Unit(normal, -0.2, np.zeros(10), points)
    weights, bias = refined_hyperplane(unit)
    assert np.linalg.norm(weights) == pytest.approx(1.0)
    np.testing.assert_allclose([weights @ point + bias for point in points], 0.0, atol=1e-9)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"pool_fraction": 1.5}, "pool_fraction must be a number in \\[0, 1\\], got 1.5"),
        ({"vertex_fraction": -0.1}, "vertex_fraction must be a number in \\[0, 1\\], got -0.1"),
        (
            {"pool_fraction": 0.8, "vertex_fraction": 0.4},
            "pool_fraction \\+ vertex_fraction must be at most 1",
        ),
    ],
)
def test_bad_endpoint_fractions_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        functional_equivalence(**arguments)
