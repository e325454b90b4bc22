"""Sweeps: local parallel runs (joblib), resuming an interrupted sweep, launcher configs, W&B grouping."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from hydra import compose, initialize_config_dir

from heistlab import sweep
from heistlab.results import RESULTS_FILE, read_results, write_results
from tests.test_configs import CONFIGS

REPO = Path(__file__).resolve().parent.parent
# Eight tiny runs: two defenses x two query budgets x two seeds, on two joblib workers.
GRID = ["defense=none,rounding", "attack.budget=60,120", "seed=0,1"]
TINY = ["surrogate.train.epochs=3", "eval.uniform_samples=64"]
SWEEP_SIZE = 8
HALF_WRITTEN = '{"config": {"seed": 1, "attack": {"budget'


class ResumedSweep(NamedTuple):
    folder: Path
    finished_before: dict[int, tuple[int, bytes]]  # job -> (mtime_ns, bytes) of results complete at the kill
    half_written_job: int
    failed_job: int
    relaunch: subprocess.CompletedProcess


def sweep_command(sweep_dir: Path, launcher: str) -> list[str]:
    overrides = [f"hydra/launcher={launcher}", *GRID, *TINY, f"hydra.sweep.dir={sweep_dir}"]
    return [sys.executable, "-m", "experiments.run", "-m", *overrides]


def sweep_environment(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "HEISTLAB_CACHE_DIR": str(cache_dir), "CI": "true"}


def complete_jobs(sweep_dir: Path) -> dict[int, Path]:
    found = {}
    for path in sweep_dir.glob(f"[0-9]*/{RESULTS_FILE}"):
        try:
            if json.loads(path.read_text()).get("status") == "complete":
                found[int(path.parent.name)] = path
        except (OSError, json.JSONDecodeError):
            continue
    return found


def kill_group_when_a_run_completes(process: subprocess.Popen, sweep_dir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not complete_jobs(sweep_dir):
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"no run completed before the sweep ended (exit {process.returncode})")
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    while time.monotonic() < deadline:  # any worker processes belong to the same process group
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def interrupted_then_resumed_sweep(root: Path, cache_dir: Path) -> ResumedSweep:
    """Launches the tiny sweep (Hydra's basic launcher, one process), SIGKILLs it once a run completes, plants
    a half-written and a failed record in two unfinished jobs, and launches the same sweep again on two joblib
    workers: resuming does not depend on the launcher.

    Done once per test run under ``root`` (``run_tmp``, shared by the xdist workers) and shared by the report
    and notebook tests: remembered on disk, built by one worker while the others wait (pytest may also import
    this module twice, under two names)."""
    with exclusive(root / "resumed-sweep.lock"):
        remembered = root / "resumed-sweep.json"
        if remembered.exists():
            return remembered_sweep(json.loads(remembered.read_text()))
        resumed = launch_interrupt_and_resume(root / "sweep", cache_dir)
        remembered.write_text(json.dumps(remembering(resumed)))
        return resumed


@contextlib.contextmanager
def exclusive(lock_file: Path):
    """Holds an exclusive lock on ``lock_file`` (other processes wait at it) while the block runs."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def launch_interrupt_and_resume(sweep_dir: Path, cache_dir: Path) -> ResumedSweep:
    environment = sweep_environment(cache_dir)
    first = subprocess.Popen(
        sweep_command(sweep_dir, "basic"),
        cwd=REPO,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    kill_group_when_a_run_completes(first, sweep_dir, timeout=240)
    finished = {
        job: (path.stat().st_mtime_ns, path.read_bytes()) for job, path in complete_jobs(sweep_dir).items()
    }
    unfinished = [job for job in range(SWEEP_SIZE) if job not in finished]
    assert len(unfinished) >= 2, "the sweep finished before it could be interrupted"
    half_written_job, failed_job = unfinished[-1], unfinished[-2]
    (sweep_dir / str(half_written_job)).mkdir(parents=True, exist_ok=True)
    (sweep_dir / str(half_written_job) / RESULTS_FILE).write_text(HALF_WRITTEN)
    write_results(
        sweep_dir / str(failed_job), {"config": {}, "metrics": {}, "status": "failed", "error": "boom"}
    )
    relaunch = subprocess.run(
        sweep_command(sweep_dir, "parallel"),
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return ResumedSweep(sweep_dir, finished, half_written_job, failed_job, relaunch)


def remembering(resumed: ResumedSweep) -> dict:
    finished = {job: [mtime, content.decode()] for job, (mtime, content) in resumed.finished_before.items()}
    relaunch = [resumed.relaunch.returncode, resumed.relaunch.stdout, resumed.relaunch.stderr]
    return {
        **resumed._asdict(),
        "folder": str(resumed.folder),
        "finished_before": finished,
        "relaunch": relaunch,
    }


def remembered_sweep(saved: dict) -> ResumedSweep:
    finished = {
        int(job): (mtime, content.encode()) for job, (mtime, content) in saved["finished_before"].items()
    }
    relaunch = subprocess.CompletedProcess([], *saved["relaunch"])
    return ResumedSweep(
        Path(saved["folder"]), finished, saved["half_written_job"], saved["failed_job"], relaunch
    )


@pytest.fixture(scope="module")
def resumed(run_tmp, cache_dir) -> ResumedSweep:
    return interrupted_then_resumed_sweep(run_tmp, cache_dir)


@pytest.mark.slow
def test_parallel_sweep_completes_every_cell_on_two_workers(resumed):
    assert resumed.relaunch.returncode == 0, resumed.relaunch.stderr[-3000:]
    records = {job: read_results(path.parent) for job, path in complete_jobs(resumed.folder).items()}
    assert sorted(records) == list(range(SWEEP_SIZE))
    cells = {
        (r["config"]["defense"]["_target_"], r["config"]["attack"]["budget"], r["seed"])
        for r in records.values()
    }
    assert len(cells) == SWEEP_SIZE
    assert all(r["metrics"]["queries_served"] == r["config"]["attack"]["budget"] for r in records.values())
    launcher = json.dumps(read_multirun_launcher(resumed.folder))
    assert "JoblibLauncher" in launcher and '"n_jobs": 2' in launcher
    spans = sorted(
        (path.stat().st_mtime - read_results(path.parent)["metrics"]["wall_seconds"], path.stat().st_mtime)
        for job, path in complete_jobs(resumed.folder).items()
        if job not in resumed.finished_before
    )
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), spans


def read_multirun_launcher(sweep_dir: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(sweep_dir / "multirun.yaml").hydra.launcher)


@pytest.mark.slow
def test_relaunched_sweep_keeps_finished_runs_and_reruns_the_rest(resumed):
    assert resumed.relaunch.returncode == 0, resumed.relaunch.stderr[-3000:]
    assert 0 < len(resumed.finished_before) < SWEEP_SIZE - 1
    complete = complete_jobs(resumed.folder)
    for job, (mtime_ns, content) in resumed.finished_before.items():
        assert complete[job].stat().st_mtime_ns == mtime_ns and complete[job].read_bytes() == content
    skipped = {
        int(line.split(" job ")[1].split("/")[0]) - 1
        for line in resumed.relaunch.stdout.splitlines()
        if "skipped, complete results.json" in line
    }
    assert skipped == set(resumed.finished_before)
    for job in set(complete) - set(resumed.finished_before):
        assert read_results(complete[job].parent)["metrics"]["victim_from_cache"] is True
    attempts = {job: resumed.folder / str(job) / sweep.ATTEMPTS_FOLDER / "1" for job in range(SWEEP_SIZE)}
    assert (attempts[resumed.half_written_job] / RESULTS_FILE).read_text() == HALF_WRITTEN
    assert json.loads((attempts[resumed.failed_job] / RESULTS_FILE).read_text())["status"] == "failed"
    assert len(list(resumed.folder.glob(f"[0-9]*/{RESULTS_FILE}"))) == SWEEP_SIZE


@pytest.mark.slow
def test_sweep_size_counts_the_grid_from_multirun_yaml(resumed):
    assert sweep.sweep_size(resumed.folder) == SWEEP_SIZE
    assert f"job 1/{SWEEP_SIZE} (" in resumed.relaunch.stdout


CONFIG = {"seed": 1, "attack": {"budget": 60, "labels": "soft"}, "victim": {"hidden": (64, 32)}}


def test_previous_run_is_complete_only_for_a_finished_identical_config(tmp_path):
    assert sweep.RESULTS_FILE == RESULTS_FILE
    assert sweep.previous_run(tmp_path, CONFIG) == (False, "no results.json yet")
    write_results(tmp_path, {"config": sweep.comparable(CONFIG), "metrics": {"a": 1.0}, "status": "complete"})
    assert sweep.previous_run(tmp_path, CONFIG).complete
    write_results(tmp_path, {"config": sweep.comparable(CONFIG), "metrics": {}, "status": "failed"})
    assert "'failed'" in sweep.previous_run(tmp_path, CONFIG).reason
    write_results(tmp_path, {"config": sweep.comparable(CONFIG), "metrics": {}, "status": "complete"})
    assert not sweep.previous_run(tmp_path, CONFIG).complete
    (tmp_path / RESULTS_FILE).write_text(HALF_WRITTEN)
    assert "unreadable" in sweep.previous_run(tmp_path, CONFIG).reason


def test_a_finished_run_of_another_config_is_never_overwritten(tmp_path):
    other = {**CONFIG, "attack": {"budget": 120, "labels": "soft"}}
    write_results(tmp_path, {"config": sweep.comparable(other), "metrics": {"a": 1.0}, "status": "complete"})
    job = sweep.Job(tmp_path, tmp_path.parent, 0, ("seed=1",))
    with pytest.raises(sweep.SweepConflict, match=r"attack\.budget: 120 -> 60"):
        sweep.resume(job, CONFIG)
    assert read_results(tmp_path)["config"]["attack"]["budget"] == 120


def test_resume_sets_earlier_attempts_aside_and_single_runs_always_run(tmp_path):
    job = sweep.Job(tmp_path, tmp_path.parent, 0, ())
    for attempt in (1, 2):
        write_results(tmp_path, {"config": {}, "metrics": {}, "status": "failed", "error": str(attempt)})
        (tmp_path / sweep.LOG_FILE).write_text(f"attempt {attempt}\n")
        assert sweep.resume(job, CONFIG) is False
        assert not (tmp_path / RESULTS_FILE).exists() and not (tmp_path / sweep.LOG_FILE).exists()
        kept = tmp_path / sweep.ATTEMPTS_FOLDER / str(attempt)
        assert read_results(kept)["error"] == str(attempt)
        assert (kept / sweep.LOG_FILE).read_text() == f"attempt {attempt}\n"
    write_results(tmp_path, {"config": sweep.comparable(CONFIG), "metrics": {"a": 1.0}, "status": "complete"})
    assert sweep.resume(job, CONFIG) is True
    assert sweep.resume(sweep.Job(tmp_path), CONFIG) is False


def test_a_sweeps_wandb_group_defaults_to_its_folder_name(tmp_path):
    in_sweep = sweep.Job(tmp_path / "3", Path("multirun/2026-11-29/06-38-03"), 3)
    assert sweep.logger_arguments({"group": None}, in_sweep) == {"group": "2026-11-29/06-38-03"}
    assert sweep.logger_arguments({"group": "mine"}, in_sweep) == {}
    assert sweep.logger_arguments({"filename": "log.jsonl"}, in_sweep) == {}
    assert sweep.logger_arguments({"group": None}, sweep.Job(tmp_path)) == {}
    assert sweep.sweep_group(Path("/data/sweeps/rounding-vs-budget")) == "rounding-vs-budget"


class RecordingLogger:
    def __init__(self):
        self.events = []

    def log_config(self, config):
        self.events.append(("config", config, None))

    def log_metrics(self, metrics, step=None):
        self.events.append(("metrics", metrics, step))

    def finish(self, status):
        self.events.append(("finish", status, None))


def test_round_curves_are_logged_as_steps_before_the_final_metrics(tmp_path):
    rounds = [{"round": 0, "queries": 150, "known": 150}, {"round": 1, "queries": 150, "known": 300}]
    write_results(
        tmp_path, {"config": {}, "metrics": {"fidelity_test": 0.8}, "status": "complete", "rounds": rounds}
    )
    inner = RecordingLogger()
    logger = sweep.RoundCurves(inner, tmp_path / RESULTS_FILE)
    logger.log_config({"seed": 0})
    logger.log_metrics({"fidelity_test": 0.8})
    logger.finish("complete")
    assert inner.events == [
        ("config", {"seed": 0}, None),
        ("metrics", {"round/round": 0, "round/queries": 150, "round/known": 150}, 0),
        ("metrics", {"round/round": 1, "round/queries": 150, "round/known": 300}, 1),
        ("metrics", {"fidelity_test": 0.8}, None),
        ("finish", "complete", None),
    ]


def test_without_rounds_only_the_final_metrics_are_logged(tmp_path):
    write_results(tmp_path, {"config": {}, "metrics": {"fidelity_test": 0.8}, "status": "complete"})
    inner = RecordingLogger()
    sweep.RoundCurves(inner, tmp_path / RESULTS_FILE).log_metrics({"fidelity_test": 0.8})
    assert inner.events == [("metrics", {"fidelity_test": 0.8}, None)]


def composed_launcher(name: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)


def test_slurm_launcher_config_selects_submitit_with_requeue():
    launcher = composed_launcher("slurm").hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.max_num_timeout == 2 and launcher.cpus_per_task == 4 and launcher.timeout_min == 120
    assert launcher.submitit_folder.endswith("/.submitit/%j")


def test_parallel_launcher_config_runs_two_joblib_workers():
    launcher = composed_launcher("parallel").hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2


def test_a_presets_description_does_not_block_resuming(tmp_path):
    from heistlab.sweep import previous_run

    config = {"seed": 0, "benchmark": {"metrics": None}}
    record = {"config": config, "metrics": {"fidelity_test": 0.9}, "status": "complete"}
    (tmp_path / "results.json").write_text(json.dumps(record))
    edited = {"seed": 0, "benchmark": {"metrics": ["fidelity_test"], "note": "added later"}}
    assert previous_run(tmp_path, edited).complete
