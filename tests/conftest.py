"""Shared fixtures: one digits split and one small trained victim per session, compiled programs cached."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from heistlab import data, training, victims
from heistlab.attacks.base import Surrogate
from heistlab.compose import enable_compilation_cache
from heistlab.models import MLP

REPO = Path(__file__).resolve().parent.parent
TEST_CACHE = Path(os.environ.get("HEISTLAB_TEST_CACHE", REPO / ".cache" / "tests"))
enable_compilation_cache(TEST_CACHE)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """A cache folder shared by the whole session (victims and compiled programs)."""
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    return TEST_CACHE


@pytest.fixture(scope="session")
def run_tmp(tmp_path_factory) -> Path:
    """A folder of this test run that every pytest-xdist worker sees (each worker's base folder is inside it),
    for work done once per run rather than once per worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def digits_splits() -> data.Splits:
    return data.make_splits(data.load_digits(), seed=0)


SMALL_MLP = MLP(num_classes=10, hidden=(32,))
FAST_TRAINING = training.TrainConfig(epochs=20, batch_size=64, learning_rate=3e-3)


@pytest.fixture(scope="session")
def small_victim(digits_splits, cache_dir) -> victims.Victim:
    """A 64-32-10 MLP trained on the digits victim split (about 0.95 test accuracy)."""
    victim, _ = victims.load_or_train(
        SMALL_MLP,
        digits_splits,
        FAST_TRAINING,
        seed=0,
        identity={"test": "small_victim"},
        cache_dir=cache_dir,
    )
    return victim


@pytest.fixture(scope="session")
def small_surrogate() -> Surrogate:
    return Surrogate(SMALL_MLP, FAST_TRAINING)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)
