"""Experiments from the command line through Hydra, and the foundation's headline result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from heistlab.experiment import execute, run_experiment
from heistlab.results import read_results
from tests.test_configs import composed

REPO = Path(__file__).resolve().parent.parent
TINY = ["attack.budget=120", "surrogate.train.epochs=3", "eval.uniform_samples=64"]
METRICS = {
    "victim_accuracy", "served_accuracy", "mean_l1_distortion", "surrogate_accuracy", "fidelity_test",
    "fidelity_uniform", "queries_served", "queries_refused", "wall_seconds", "compile_seconds",
}  # fmt: skip


def run_cli(
    arguments: list[str], cache_dir: Path, python_options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HEISTLAB_CACHE_DIR": str(cache_dir), "CI": "true"}
    command = [sys.executable, *python_options, "-m", "experiments.run", *arguments]
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_single_run_writes_complete_results(tmp_path, cache_dir):
    overrides = ["attack=knockoff", "defense=rounding", "defense.decimals=1", "seed=3", *TINY]
    finished = run_cli([*overrides, f"hydra.run.dir={tmp_path}"], cache_dir, ("-X", "importtime"))
    assert finished.returncode == 0, finished.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in finished.stderr.splitlines() if "|" in line}
    assert "jax" in imported and not imported & {"scipy", "httpx"}  # a fresh process loads only what it uses
    record = read_results(tmp_path)
    assert set(record) >= {"config", "metrics", "versions", "seed"} and record["status"] == "complete"
    assert record["seed"] == 3 and record["config"]["defense"]["decimals"] == 1
    assert set(record["metrics"]) >= METRICS
    assert record["metrics"]["queries_served"] == 120 and record["metrics"]["queries_refused"] == 0
    assert record["versions"]["jax"] and "fidelity_test" in finished.stdout
    events = [json.loads(line)["event"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert events == ["config", "metrics", "finish"]


@pytest.mark.slow
def test_multirun_sweeps_defenses_and_seeds(tmp_path, cache_dir):
    sweep = ["-m", "defense=none,label_only", "seed=range(2)", *TINY, f"hydra.sweep.dir={tmp_path}"]
    finished = run_cli(sweep, cache_dir)
    assert finished.returncode == 0, finished.stderr
    # One line per job, no table per job.
    assert finished.stdout.count(": complete in ") == 4 and "metric" not in finished.stdout
    records = [read_results(folder) for folder in sorted(tmp_path.glob("[0-9]*"))]
    cells = {(record["config"]["defense"]["_target_"], record["seed"]) for record in records}
    assert len(records) == 4 and len(cells) == 4
    label_only = [r["metrics"] for r in records if r["config"]["defense"]["_target_"].endswith("label_only")]
    assert all(metrics["mean_l1_distortion"] > 0 for metrics in label_only)


def test_a_crashing_run_leaves_a_failed_record(tmp_path, cache_dir, monkeypatch):
    def crash(cfg):
        raise RuntimeError("the disk holding the data set went away")

    monkeypatch.setattr("heistlab.experiment.build_splits", crash)
    cfg = composed(f"cache_dir={cache_dir}", *TINY)
    with pytest.raises(RuntimeError):
        run_experiment(cfg, tmp_path)
    record = read_results(tmp_path)
    assert record["status"] == "failed" and "Traceback" in record["error"] and "went away" in record["error"]


def test_undefended_knockoff_reaches_art_fidelity(cache_dir):
    """1000 soft-label queries on digits (MLP victim): fidelity_test >= 0.95 (ART's KnockoffNets: 0.97)."""
    metrics = execute(composed(f"cache_dir={cache_dir}"))
    assert metrics["queries_served"] == 1000
    assert metrics["fidelity_test"] >= 0.95
    assert metrics["victim_accuracy"] >= 0.95 and metrics["served_accuracy"] == metrics["victim_accuracy"]


def test_rounding_to_one_decimal_distorts_answers_but_keeps_most_top1(cache_dir):
    metrics = execute(composed(f"cache_dir={cache_dir}", "defense=rounding", "defense.decimals=1", *TINY))
    assert 0 < metrics["mean_l1_distortion"] < 0.5
    assert metrics["served_accuracy"] >= metrics["victim_accuracy"] - 0.05
