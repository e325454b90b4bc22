"""Metrics the field reports, on label arrays and probability batches.

Fidelity follows Jagielski et al. (USENIX Security 2020): the fraction of inputs on which the surrogate's
top-1 agrees with the victim's, measured on the task's test data and on uniform noise.
"""

from __future__ import annotations

import numpy as np


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``predicted`` labels equal to ``labels``."""
    return agreement(predicted, labels)


def agreement(first: np.ndarray, second: np.ndarray) -> float:
    """Fraction of positions where two label arrays agree (fidelity when one is the victim's)."""
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape or first.size == 0:
        raise ValueError(
            f"label arrays must be non-empty and equal in shape, got {first.shape} and {second.shape}"
        )
    return float(np.mean(first == second))


def mean_l1_distance(first: np.ndarray, second: np.ndarray) -> float:
    """Mean over rows of the L1 distance between two probability batches (distortion a defense adds)."""
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if first.shape != second.shape:
        raise ValueError(f"probability batches must match in shape, got {first.shape} and {second.shape}")
    return float(np.mean(np.sum(np.abs(first - second), axis=-1)))
