"""Fixtures shared by the benchmarks: one cache folder, the default experiment's config, splits and victim.

The benchmarks keep their own cache (``HEISTLAB_CACHE_DIR``, default ``.cache/benchmarks``) so that "warm"
means warmed by this suite: the victim trained and every program compiled once before anything is timed.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import jax
import pytest
from hydra import compose, initialize_config_dir

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from heistlab import data, victims
from heistlab.compose import build_defense, defender_data, enable_compilation_cache, load_victim

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
BENCH_CACHE = Path(os.environ.get("HEISTLAB_CACHE_DIR", REPO / ".cache" / "benchmarks")).expanduser()
os.environ["HEISTLAB_CACHE_DIR"] = str(BENCH_CACHE)
enable_compilation_cache(BENCH_CACHE)


def composed(*overrides: str):
    """The config ``python -m experiments.run <overrides>`` composes, with the benchmarks' cache."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=[f"cache_dir={BENCH_CACHE}", *overrides])


def config_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture(scope="session")
def bench_cache() -> Path:
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    return BENCH_CACHE


@pytest.fixture(scope="session")
def splits() -> data.Splits:
    return data.make_splits(data.load_digits(), seed=0)


@pytest.fixture(scope="session")
def default_victim(splits, bench_cache) -> victims.Victim:
    """The default experiment's victim (MLP 64-256-256-10, 100 epochs), trained once into the bench cache."""
    cfg = composed()
    defense = build_defense(cfg.defense, defender_data(cfg, splits))
    victim, _ = load_victim(cfg, splits, defense)
    return victim


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cores"] = os.cpu_count()
    machine_info["jax_devices"] = [str(device) for device in jax.devices()]
    machine_info["jax"] = jax.__version__
    machine_info["platform"] = platform.platform()
