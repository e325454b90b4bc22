"""Prediction API throughput, queries (input rows) per second, for every defense and batch sizes 1, 128, 4096.

A query runs the whole server path: validation, budget and admission checks, SHA-256 of every row for the
record, the victim's probabilities, the defense, the client's view. Every call comes from a new client name,
so per-client state (budgets, rate limits, detectors' histories) starts empty each time. A defense that
refuses sustained traffic all the same (a global cap on all clients together) is skipped, never timed with
refusals mixed in; the report names it.
"""

from __future__ import annotations

import itertools
import time

import jax
import numpy as np
import pytest

from benchmarks.conftest import composed, config_options
from heistlab.api import PredictionAPI, QueryRefused
from heistlab.compose import build_defense, defender_data, load_victim

BATCH_SIZES = (1, 128, 4096)
# Every defense gets the same number of rounds at a batch size, so that their fastest rounds are minima over
# equally many tries (left to pytest-benchmark, a slow defense gets fewer rounds in its second of timing).
ROUNDS = {1: 300, 128: 100, 4096: 30}
CLIENT_NAMES = (f"client-{index}" for index in itertools.count())


@pytest.fixture(scope="module")
def apis(splits, bench_cache):
    """One API per defense config, behind the victim that config's experiment would use."""
    built = {}

    def api_for(name: str) -> PredictionAPI:
        if name not in built:
            cfg = composed(f"defense={name}")
            defense = build_defense(cfg.defense, defender_data(cfg, splits))
            victim, _ = load_victim(cfg, splits, defense)
            built[name] = PredictionAPI(victim, defense, key=jax.random.key(0), budget=None)
        return built[name]

    return api_for


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("defense", config_options("defense"))
def test_prediction_api_throughput(benchmark, apis, splits, defense, batch):
    api = apis(defense)
    inputs = np.resize(splits.test.x, (batch, *splits.input_shape))

    def query() -> np.ndarray:
        try:
            return api.query(inputs, client=next(CLIENT_NAMES))
        except QueryRefused as refusal:
            pytest.skip(f"{defense} refuses sustained traffic from fresh clients: {refusal.reason}")

    query()  # a defense that refuses this traffic is skipped here, before anything is timed
    benchmark.group = "api"
    benchmark.extra_info.update(kind="api", defense=defense, batch=batch, items_per_round=batch)
    benchmark.pedantic(query, rounds=ROUNDS[batch], warmup_rounds=2)


# Defenses whose host work is per distinct row: the stream above repeats the 359 test digits, so they are
# timed again on batches in which no row repeats (fresh uniform noise per call), beside ``none``.
PER_DISTINCT_ROW = ("none", "blacklight", "dawn", "edm", "prada", "proof_of_work")


@pytest.mark.parametrize("defense", PER_DISTINCT_ROW)
def test_prediction_api_throughput_on_distinct_rows(benchmark, apis, splits, defense):
    api, batch = apis(defense), 4096
    rng = np.random.default_rng(0)

    def fresh_batch() -> tuple[tuple, dict]:
        inputs = rng.uniform(size=(batch, *splits.input_shape)).astype(np.float32)
        return (inputs,), {"client": next(CLIENT_NAMES)}

    benchmark.group = "api distinct rows"
    benchmark.extra_info.update(kind="api_distinct", defense=defense, batch=batch, items_per_round=batch)
    benchmark.pedantic(api.query, setup=fresh_batch, rounds=5, warmup_rounds=1)


SIDE_BY_SIDE_ROUNDS = 20


def test_defenses_side_by_side_at_4096(benchmark, apis, splits):
    """Every defense and ``none`` called in turn, one 4096-row call each per round: each defense's median
    call time against ``none``'s from the same rounds, so that the machine's speed drifting between tests
    (timed one after another above) cannot move the ratios."""
    inputs = np.resize(splits.test.x, (4096, *splits.input_shape))
    served = []
    for name in config_options("defense"):
        try:
            apis(name).query(inputs, client=next(CLIENT_NAMES))
            served.append(name)
        except QueryRefused:  # refuses this traffic by design: left out, as above
            pass
    times = {name: [] for name in served}

    def one_call_each() -> None:
        for name in served:
            api, client = apis(name), next(CLIENT_NAMES)
            start = time.perf_counter()
            api.query(inputs, client=client)
            times[name].append(time.perf_counter() - start)

    benchmark.group = "api side by side"
    benchmark.pedantic(one_call_each, rounds=SIDE_BY_SIDE_ROUNDS, warmup_rounds=1)
    medians = {name: float(np.median(seconds[-SIDE_BY_SIDE_ROUNDS:])) for name, seconds in times.items()}
    benchmark.extra_info.update(
        kind="api_side_by_side", name="every defense in turn, 4096 rows", batch=4096, items_per_round=4096,
        median_seconds=medians,
    )  # fmt: skip
