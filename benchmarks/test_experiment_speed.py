"""The whole default experiment (Knockoff Nets, digits, MLP 64-256-256-10, budget 1000, 50 epochs): warm in
one process, as a fresh ``python -m experiments.run`` process, its compile time, and sweeps of many runs.

"Warm" means the victim is in the cache and every program has been compiled (in memory for the in-process
benchmark, in the persistent compilation cache for the fresh process). The cold-compile benchmark runs a fresh
process against an empty compilation cache (victim still cached) and reports the compile seconds it spent.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks.conftest import BENCH_CACHE, REPO, composed
from heistlab.experiment import execute
from heistlab.results import read_results

FRESH_ROUNDS = 3
SWEEP_DEFENSES = ("none", "rounding", "top_k", "label_only", "gaussian_noise", "reverse_sigmoid")
SWEEP_SEEDS = 4
SWEEP_SETTINGS = ("attack.budget=200", "surrogate.train.epochs=5", "eval.uniform_samples=256")
BUDGET_SWEEP = (300, 400, 500, 600, 700, 800, 900, 1000)


def run_cli(arguments: list[str], cache_dir: Path = BENCH_CACHE) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HEISTLAB_CACHE_DIR": str(cache_dir), "CI": "true", "WANDB_MODE": "disabled"}
    finished = subprocess.run(
        [sys.executable, "-m", "experiments.run", *arguments],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-4000:]
    return finished


@pytest.fixture(scope="module")
def run_folders():
    with tempfile.TemporaryDirectory(prefix="heistlab-bench-") as root:
        folders = (Path(root) / str(index) for index in itertools.count())
        yield folders


def test_knockoff_steady_state(benchmark, default_victim):
    cfg = composed()
    found = {}
    benchmark.group = "experiment"
    benchmark.pedantic(lambda: found.update(execute(cfg)), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        kind="experiment", name="knockoff, warm in-process", system="heistlab", mode="steady",
        fidelity_test=found["fidelity_test"], surrogate_accuracy=found["surrogate_accuracy"],
        compile_seconds=found["compile_seconds"], items_per_round=1,
    )  # fmt: skip


def test_knockoff_fresh_process(benchmark, default_victim, run_folders):
    """``python -m experiments.run`` end to end: interpreter start, imports, cached victim and programs."""
    last = {}

    def fresh_run():
        folder = next(run_folders)
        run_cli([f"hydra.run.dir={folder}"])
        last.update(read_results(folder)["metrics"])

    benchmark.group = "experiment"
    benchmark.pedantic(fresh_run, rounds=FRESH_ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        kind="experiment", name="knockoff, fresh process", system="heistlab", mode="fresh",
        fidelity_test=last["fidelity_test"], compile_seconds=last["compile_seconds"],
        run_wall_seconds=last["wall_seconds"], items_per_round=1,
    )  # fmt: skip


def test_knockoff_fresh_process_with_an_empty_compilation_cache(benchmark, default_victim, run_folders):
    """What a first run pays: every program traced and compiled; the victim comes from the cache."""
    compile_seconds = []

    def empty_cache():
        cache = Path(tempfile.mkdtemp(prefix="heistlab-cold-"))
        shutil.copytree(BENCH_CACHE / "victims", cache / "victims")
        return (cache,), {}

    def cold_run(cache: Path):
        folder = next(run_folders)
        try:
            run_cli([f"hydra.run.dir={folder}"], cache_dir=cache)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        compile_seconds.append(read_results(folder)["metrics"]["compile_seconds"])

    benchmark.group = "experiment"
    benchmark.pedantic(cold_run, setup=empty_cache, rounds=2, iterations=1)
    benchmark.extra_info.update(
        kind="experiment", name="knockoff, fresh process, empty compilation cache", system="heistlab",
        mode="cold", compile_seconds=min(compile_seconds), items_per_round=1,
    )  # fmt: skip


def sweep_records(folder: Path) -> list[dict]:
    jobs = sorted((path for path in folder.iterdir() if path.name.isdigit()), key=lambda path: int(path.name))
    return [read_results(job) for job in jobs]


def timed_sweep(benchmark, run_folders, overrides: list[str]) -> list[dict]:
    """Times one multirun of ``overrides`` (after a warm-up one) and returns the timed sweep's records."""
    records = []

    def sweep():
        folder = next(run_folders)
        run_cli([*overrides, f"hydra.sweep.dir={folder}"])
        records[:] = sweep_records(folder)

    benchmark.group = "experiment"
    benchmark.pedantic(sweep, rounds=1, iterations=1, warmup_rounds=1)
    return records


def test_sweep_of_24_runs(benchmark, default_victim, run_folders):
    """Defenses x seeds as one Hydra multirun (one process, runs one after another), tiny settings."""
    overrides = ["-m", f"defense={','.join(SWEEP_DEFENSES)}", f"seed=range({SWEEP_SEEDS})", *SWEEP_SETTINGS]
    records = timed_sweep(benchmark, run_folders, overrides)
    assert len(records) == len(SWEEP_DEFENSES) * SWEEP_SEEDS
    assert all(record["status"] == "complete" for record in records)
    benchmark.extra_info.update(
        kind="sweep", name=f"{len(records)} runs: {len(SWEEP_DEFENSES)} defenses x {SWEEP_SEEDS} seeds",
        system="heistlab", items_per_round=len(records),
        defenses=[record["config"]["defense"]["_target_"] for record in records],
        compile_seconds=[record["metrics"]["compile_seconds"] for record in records],
        run_wall_seconds=[record["metrics"]["wall_seconds"] for record in records],
    )  # fmt: skip


def test_sweep_over_budgets(benchmark, default_victim, run_folders):
    """Budgets 300..1000 in one multirun: training data pad to 512-, 1024- and 2048-row buckets, so only a
    run that opens a new bucket compiles its training program."""
    overrides = ["-m", f"attack.budget={','.join(map(str, BUDGET_SWEEP))}", *SWEEP_SETTINGS[1:]]
    records = timed_sweep(benchmark, run_folders, overrides)
    benchmark.extra_info.update(
        kind="sweep", name=f"{len(records)} runs: budgets {BUDGET_SWEEP[0]}..{BUDGET_SWEEP[-1]}",
        system="heistlab", items_per_round=len(records),
        budgets=[record["config"]["attack"]["budget"] for record in records],
        compile_seconds=[record["metrics"]["compile_seconds"] for record in records],
        run_wall_seconds=[record["metrics"]["wall_seconds"] for record in records],
    )  # fmt: skip
