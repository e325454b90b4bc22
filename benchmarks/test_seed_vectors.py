"""Seeds as a vector (``heistlab.seeds``): 8 knockoff surrogates in one vmapped program against 8 sequential
``train_classifier`` runs, on the default surrogate (MLP 64-256-256-10, 1000 answered queries), 10 epochs; and
the whole default experiment with ``num_seeds=8`` against 8 single-seed experiments."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks.conftest import composed
from heistlab import seeds, training
from heistlab.compose import build_model_from, train_config_from
from heistlab.experiment import execute, execute_seeds

SEEDS, EPOCHS = 8, 10


@pytest.mark.parametrize("mode", ["vmapped", "sequential"])
def test_seed_vector_training(benchmark, splits, default_victim, mode):
    spec = composed().surrogate
    model = build_model_from(spec, splits.num_classes)
    config = train_config_from(spec.train)._replace(epochs=EPOCHS)
    inputs = np.resize(splits.pool, (1000, *splits.input_shape))
    targets = default_victim.predict_proba(inputs)
    keys = seeds.seed_keys(0, SEEDS)
    if mode == "vmapped":
        run = lambda: jax.block_until_ready(seeds.train_classifiers(model, inputs, targets, keys, config))
    else:
        run = lambda: [
            jax.block_until_ready(training.train_classifier(model, inputs, targets, key, config))
            for key in keys
        ]
    benchmark.group = "seeds"
    benchmark.extra_info.update(
        kind="seeds", name=f"{SEEDS} seeds, {mode}", mode=mode, seeds=SEEDS, items_per_round=SEEDS,
        devices=len(jax.devices()),
    )  # fmt: skip
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("mode", ["num_seeds", "seed after seed"])
def test_experiment_over_seeds(benchmark, default_victim, mode):
    """The whole default experiment for 8 seeds: ``num_seeds=8`` (one vmapped training program) against the
    same 8 single-seed experiments run one after another in the process."""
    if mode == "num_seeds":
        cfg = composed(f"num_seeds={SEEDS}")
        run = lambda: execute_seeds(cfg)
    else:
        configs = [composed(f"seed={seed}") for seed in range(SEEDS)]
        run = lambda: [execute(cfg) for cfg in configs]
    benchmark.group = "seeds"
    benchmark.extra_info.update(
        kind="seeds", name=f"default experiment, {SEEDS} seeds, {mode}", mode=mode, seeds=SEEDS,
        items_per_round=SEEDS, devices=len(jax.devices()),
    )  # fmt: skip
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
