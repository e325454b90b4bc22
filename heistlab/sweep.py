"""Sweeps that resume: skip finished runs, rerun the rest, report one progress line per job.

A Hydra multirun gives every job the same folder when it is launched again with the same overrides and the
same ``hydra.sweep.dir``: ``<sweep dir>/<job number>``. ``previous_run`` reads what a job's folder already
holds; a ``results.json`` that is complete, with metrics and an identical resolved config, means the job is
done and is skipped. Anything else (missing, failed, unreadable: half-written) is run again, after
``set_aside`` has moved the earlier attempt's files into ``.attempts/<n>/`` so that nothing is lost and no
report counts them twice. A complete record for a *different* config is never overwritten: the job stops
with a ``SweepConflict`` naming the differing keys.

The check runs inside each job, so it works the same under every launcher (basic, joblib, Slurm, Ray).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from heistlab.checks import ConfigError

log = logging.getLogger("heistlab.sweep")

# heistlab.results.RESULTS_FILE; not imported from there, since that module loads JAX and this one must not.
RESULTS_FILE = "results.json"
ATTEMPTS_FOLDER = ".attempts"
LOG_FILE = "log.jsonl"
TRACKER_LOGGERS = ("heistlab.loggers.WandbLogger",)
_DATE_FOLDER = re.compile(r"\d{4}-\d{2}-\d{2}")


class SweepConflict(RuntimeError):
    """A job folder holds a complete result for a different config: resuming would overwrite it."""


class Job(NamedTuple):
    """Where one Hydra job writes and which sweep it belongs to (``sweep_dir`` is None for a single run)."""

    output_dir: Path
    sweep_dir: Path | None = None
    number: int | None = None
    overrides: tuple[str, ...] = ()

    @property
    def in_sweep(self) -> bool:
        return self.sweep_dir is not None


class PreviousRun(NamedTuple):
    """What a job's folder held before this launch: ``complete`` (skip it), else why it must run."""

    complete: bool
    reason: str


def current_job() -> Job:
    """The running Hydra job (call it inside a ``@hydra.main`` function)."""
    hydra_config = HydraConfig.get()
    output_dir = Path(hydra_config.runtime.output_dir)
    overrides = tuple(hydra_config.overrides.task)
    if hydra_config.mode != RunMode.MULTIRUN:
        return Job(output_dir, overrides=overrides)
    return Job(output_dir, Path(hydra_config.sweep.dir), int(hydra_config.job.num), overrides)


# Top-level keys that describe a run without changing it (a paper preset's claim and table columns).
DESCRIPTIVE_KEYS = ("benchmark",)


def comparable(config: Any) -> Any:
    """``config`` as it reads back from ``results.json`` (tuples become lists, keys strings), less the keys
    that only describe the run."""
    read_back = json.loads(json.dumps(config, default=str))
    if isinstance(read_back, dict):
        read_back = {key: value for key, value in read_back.items() if key not in DESCRIPTIVE_KEYS}
    return read_back


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs, with both values (``a.b: 1 -> 2``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}{key}"
            if key not in old:
                found.append(f"{name}: (absent) -> {new[key]!r}")
            elif key not in new:
                found.append(f"{name}: {old[key]!r} -> (absent)")
            else:
                found.extend(config_differences(old[key], new[key], f"{name}."))
        return found
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def previous_run(output_dir: Path, config: dict) -> PreviousRun:
    """Reads ``output_dir/results.json``; complete means finished, with metrics, for an identical ``config``.

    Raises ``SweepConflict`` when the folder holds a complete result for a different config.
    """
    path = Path(output_dir) / RESULTS_FILE
    if not path.exists():
        return PreviousRun(False, "no results.json yet")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return PreviousRun(False, f"results.json is unreadable (half-written?): {error}")
    if not isinstance(record, dict):
        return PreviousRun(False, "results.json does not hold a record")
    status = record.get("status")
    if status != "complete":
        return PreviousRun(False, f"the previous attempt ended with status {status!r}")
    if not record.get("metrics"):
        return PreviousRun(False, "the previous attempt is marked complete but has no metrics")
    differences = config_differences(comparable(record.get("config")), comparable(config))
    if differences:
        raise SweepConflict(
            f"{path} holds a complete result for a different config ({'; '.join(differences[:5])}"
            f"{'; ...' if len(differences) > 5 else ''}). Resume a sweep with the same overrides, or choose "
            "a new hydra.sweep.dir; the finished result was left untouched."
        )
    return PreviousRun(True, "complete results.json with an identical config")


def set_aside(output_dir: Path) -> Path | None:
    """Moves an earlier attempt's ``results.json`` and ``log.jsonl`` into ``.attempts/<n>/``.

    Returns the folder they went to, or None when there was nothing to move.
    """
    output_dir = Path(output_dir)
    leftovers = [output_dir / name for name in (RESULTS_FILE, LOG_FILE) if (output_dir / name).exists()]
    if not leftovers:
        return None
    attempts = output_dir / ATTEMPTS_FOLDER
    taken = (
        [int(path.name) for path in attempts.glob("*") if path.name.isdigit()] if attempts.exists() else []
    )
    destination = attempts / str(max(taken, default=0) + 1)
    destination.mkdir(parents=True)
    for path in leftovers:
        shutil.move(path, destination / path.name)
    return destination


def sweep_group(sweep_dir: Path) -> str:
    """The W&B group of a sweep's runs: the sweep folder's name, with its date folder for Hydra's default
    ``multirun/<date>/<time>`` layout (``2026-11-29/06-38-03``)."""
    sweep_dir = Path(sweep_dir)
    if _DATE_FOLDER.fullmatch(sweep_dir.parent.name):
        return f"{sweep_dir.parent.name}/{sweep_dir.name}"
    return sweep_dir.name


def logger_arguments(logger_config: Any, job: Job) -> dict:
    """Extra arguments for the logger: a tracker's ``group`` defaults to the sweep's name inside a sweep."""
    if job.in_sweep and "group" in logger_config and logger_config.get("group") is None:
        return {"group": sweep_group(job.sweep_dir)}
    return {}


def tracks_curves(logger_config: Any) -> bool:
    return logger_config.get("_target_") in TRACKER_LOGGERS


def numeric_fields(record: dict) -> dict:
    return {key: value for key, value in record.items() if isinstance(value, int | float | bool)}


class RoundCurves:
    """Wraps a logger: before the final metrics, logs each attack round found in ``results.json`` as one step.

    ``run_experiment`` writes ``results.json`` before it logs the final metrics, so the rounds are on disk by
    then when the record carries them (``record["rounds"]``: one dict per round, see ``AttackResult.rounds``).
    """

    def __init__(self, logger: Any, results_path: Path):
        self.logger = logger
        self.results_path = Path(results_path)

    def log_config(self, config: dict) -> None:
        self.logger.log_config(config)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if step is None:
            for index, round_record in enumerate(recorded_rounds(self.results_path)):
                curves = {f"round/{key}": value for key, value in numeric_fields(round_record).items()}
                self.logger.log_metrics(curves, step=int(round_record.get("round", index)))
        self.logger.log_metrics(metrics, step=step)

    def finish(self, status: str) -> None:
        self.logger.finish(status)


def recorded_rounds(results_path: Path) -> list[dict]:
    """The per-round records of a results file, or an empty list."""
    try:
        record = json.loads(Path(results_path).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    rounds = record.get("rounds") if isinstance(record, dict) else None
    return [entry for entry in rounds if isinstance(entry, dict)] if isinstance(rounds, list) else []


def sweep_size(sweep_dir: Path) -> int | None:
    """How many jobs the sweep in ``sweep_dir`` launches, from its ``multirun.yaml`` (None if unknown)."""
    try:
        saved = OmegaConf.load(Path(sweep_dir) / "multirun.yaml")
        if not str(saved.hydra.sweeper._target_).endswith("BasicSweeper"):
            return None
        params = saved.hydra.sweeper.get("params") or {}
        arguments = [f"{key}={value}" for key, value in params.items()] + list(saved.hydra.overrides.task)
        overrides = OverridesParser.create().parse_overrides(arguments)
        return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))
    except Exception:  # the count only decorates a progress line: never fail a job over it
        return None


def job_label(job: Job) -> str:
    overrides = " ".join(job.overrides) or "defaults"
    if not job.in_sweep:
        return f"run ({overrides})"
    total = sweep_size(job.sweep_dir)
    position = f"{job.number + 1}/{total}" if total else f"#{job.number}"
    return f"sweep {sweep_group(job.sweep_dir)} job {position} ({overrides})"


@contextlib.contextmanager
def job_progress(job: Job, headline: str = "fidelity_test") -> Iterator[Callable[[dict], None]]:
    """Logs one line when the job ends: complete (with its time and ``headline`` metric) or failed."""
    started = time.perf_counter()
    finished: dict = {}
    try:
        yield finished.update
    except ConfigError:
        raise  # a refusal is printed once, by the entry point
    except BaseException as error:
        log.info("%s: failed after %.1f s: %s", job_label(job), time.perf_counter() - started, error)
        raise
    value = finished.get(headline)
    shown = f", {headline} {value:.4f}" if isinstance(value, float) else ""
    log.info("%s: complete in %.1f s%s", job_label(job), time.perf_counter() - started, shown)


def resume(job: Job, config: dict) -> bool:
    """True when ``job`` already finished (it is skipped); otherwise readies its folder for a new attempt.

    Only sweeps resume; a single run always runs.
    """
    if not job.in_sweep:
        return False
    previous = previous_run(job.output_dir, config)
    if previous.complete:
        log.info("%s: skipped, %s", job_label(job), previous.reason)
        return True
    moved = set_aside(job.output_dir)
    if moved is not None:
        log.info(
            "%s: running again (%s); the earlier attempt is in %s", job_label(job), previous.reason, moved
        )
    return False
