"""Metrics on cases worked out by hand."""

import numpy as np
import pytest

from heistlab import metrics


def test_accuracy_and_fidelity_by_hand():
    assert metrics.accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == 0.75
    assert metrics.agreement(np.array([3, 3]), np.array([3, 4])) == 0.5


def test_mean_l1_distance_by_hand():
    first = np.array([[1.0, 0.0], [0.5, 0.5]])
    second = np.array([[0.0, 1.0], [0.5, 0.5]])
    assert metrics.mean_l1_distance(first, second) == pytest.approx(1.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="equal in shape"):
        metrics.agreement(np.zeros(3), np.zeros(4))
