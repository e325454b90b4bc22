"""Runs one attack against one defended victim; ``-m`` sweeps the grid given on the command line.

    python -m experiments.run attack=knockoff defense=rounding defense.decimals=1 attack.budget=2000 seed=3
    python -m experiments.run -m defense=none,rounding,reverse_sigmoid 'seed=range(3)'
    python -m experiments.run -m hydra/launcher=parallel defense=none,rounding 'seed=range(3)'
    python -m experiments.run num_seeds=8       # seeds 0..7 in one process, surrogates trained by one program

Each run writes ``results.json`` (and ``log.jsonl``) in its Hydra output folder. A sweep launched again
with the same ``hydra.sweep.dir`` skips the jobs whose results are complete for the same config
(``heistlab.sweep``). A config the run cannot honour is refused before any work, in one line on stderr,
with exit status 2 (``heistlab.checks``).
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from heistlab import sweep
from heistlab.checks import REFUSED_STATUS, ConfigError, check_launcher


def metrics_table(metrics: dict, title: str) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    job = sweep.current_job()
    if sweep.resume(job, OmegaConf.to_container(cfg, resolve=True)):
        return
    # Imported here: the process that launches a parallel sweep never runs an experiment, nor loads JAX.
    from heistlab.experiment import cache_directory, enable_compilation_cache, run_experiment

    enable_compilation_cache(cache_directory(cfg))
    logger = instantiate(cfg.logger, output_dir=job.output_dir, **sweep.logger_arguments(cfg.logger, job))
    if sweep.tracks_curves(cfg.logger):
        logger = sweep.RoundCurves(logger, job.output_dir / sweep.RESULTS_FILE)
    try:
        with sweep.job_progress(job) as progress:
            metrics = run_experiment(cfg, job.output_dir, logger)
            progress(metrics)
    except ConfigError as error:
        refuse(error, job)
    if job.in_sweep:
        return  # the sweep's one line for this job was logged by job_progress
    title = f"heistlab: {' '.join(job.overrides) or 'defaults'}"
    if cfg.num_seeds > 1:
        title += f" (mean of {cfg.num_seeds} seeds; each seed's metrics are in results.json)"
    Console().print(metrics_table(metrics, title))
    Console().print(f"results: {job.output_dir / sweep.RESULTS_FILE}")


def refuse(error: ConfigError, job: sweep.Job | None = None) -> None:
    """Prints the refusal once, on one line of stderr, and exits with status 2 (no traceback)."""
    where = f"{sweep.job_label(job)}: " if job is not None and job.in_sweep else ""
    print(f"heistlab: refused: {where}{error}", file=sys.stderr, flush=True)
    raise SystemExit(REFUSED_STATUS)


def cli() -> None:
    """The entry point: refuses a launcher whose plugin is missing before Hydra composes, then runs."""
    try:
        check_launcher(sys.argv[1:])
    except ConfigError as error:
        refuse(error)
    main()


if __name__ == "__main__":
    cli()
