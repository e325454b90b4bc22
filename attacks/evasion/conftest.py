"""A model-free oracle for the evasion unit tests: a linear rule whose minimal perturbations are known."""

from __future__ import annotations

import numpy as np
import pytest

from heistlab.api import Oracle, QueryRefused

# The session's digits split and small trained victim (and the persistent compilation cache) from tests/.
from tests.conftest import cache_dir, digits_splits, small_victim  # noqa: F401

SHAPE = (8, 8, 1)


class LinearRule:
    """Class 1 when an input's mean pixel exceeds ``threshold``, else class 0; counts every row it answers.

    From a constant image at ``c < threshold`` the nearest class-1 point is ``threshold`` everywhere: L-inf
    distance ``threshold - c`` and L2 distance ``(threshold - c) * 8`` on 8x8 images. ``cap`` is a budget
    the oracle reports; ``refuse_after`` refuses batches past that many rows without warning (as admission
    control does).
    """

    def __init__(self, output="probabilities", cap=None, refuse_after=None, threshold=0.5):
        self.output, self.cap, self.refuse_after, self.threshold = output, cap, refuse_after, threshold
        self.served, self.refused, self.batches = 0, 0, 0

    def answer(self, inputs: np.ndarray) -> np.ndarray:
        assert inputs.dtype == np.float32 and inputs.shape[1:] == SHAPE
        assert np.all((inputs >= 0) & (inputs <= 1)), "the API refuses inputs outside [0, 1]"
        limit = min(limit for limit in (self.cap, self.refuse_after, np.inf) if limit is not None)
        if self.served + len(inputs) > limit:
            self.refused += len(inputs)
            raise QueryRefused("evader", len(inputs), None, "test limit")
        self.served += len(inputs)
        self.batches += 1
        score = 20.0 * (inputs.reshape(len(inputs), -1).mean(axis=1) - self.threshold)
        probs = np.stack([1 / (1 + np.exp(score)), 1 / (1 + np.exp(-score))], axis=1).astype(np.float32)
        return probs.argmax(axis=1).astype(np.int32) if self.output == "labels" else probs

    def oracle(self) -> Oracle:
        remaining = lambda: None if self.cap is None else self.cap - self.served
        return Oracle(self.answer, remaining, SHAPE, 2, self.output, ("evader",))


@pytest.fixture
def constant_images():
    """Eight 8x8 images at 0.3 everywhere (class 0 for the rule), and their labels."""
    return np.full((8, *SHAPE), 0.3, np.float32), np.zeros(8, np.int64)
