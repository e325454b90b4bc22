"""Runs one attack against one defended victim; ``-m`` sweeps the grid given on the command line.

    python -m experiments.run attack=knockoff defense=rounding defense.decimals=1 attack.budget=2000 seed=3
    python -m experiments.run -m defense=none,rounding,reverse_sigmoid 'seed=range(3)'

Each run writes ``results.json`` (and ``log.jsonl``) in its Hydra output folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from heistlab.experiment import cache_directory, enable_compilation_cache, run_experiment


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
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    enable_compilation_cache(cache_directory(cfg))
    logger = instantiate(cfg.logger, output_dir=output_dir)
    metrics = run_experiment(cfg, output_dir, logger)
    overrides = " ".join(HydraConfig.get().overrides.task) or "defaults"
    Console().print(metrics_table(metrics, f"heistlab: {overrides}"))
    Console().print(f"results: {output_dir / 'results.json'}")


if __name__ == "__main__":
    main()
