"""Where a run reports its configuration and metrics: a local JSONL file, or Weights & Biases.

Loggers are configured by ``configs/logger/*.yaml`` and built with the run's output folder. Both have
``log_config(config)``, ``log_metrics(metrics, step=None)`` and ``finish(status)``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

MONITOR = "monitor/"


class JsonlLogger:
    """Appends one JSON object per event to ``<output_dir>/<filename>`` (flushed at once, crash-safe)."""

    def __init__(self, output_dir: str | Path, filename: str = "log.jsonl"):
        self.path = Path(output_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, event: str, payload: dict) -> None:
        line = json.dumps({"event": event, "time": time.time(), **payload}, default=str)
        with self.path.open("a") as handle:
            handle.write(line + "\n")

    def log_config(self, config: dict) -> None:
        self._write("config", {"config": config})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._write("metrics", {"step": step, "metrics": metrics})

    def finish(self, status: str) -> None:
        self._write("finish", {"status": status})


class WandbLogger:
    """Logs to Weights & Biases; runs offline when no API key is set (``WANDB_API_KEY`` or a netrc login).

    ``wandb`` is imported only when this logger is chosen (``logger=wandb``).
    """

    def __init__(
        self,
        output_dir: str | Path,
        project: str = "heistlab",
        group: str | None = None,
        mode: str | None = None,
        tags: list[str] | None = None,
    ):
        import wandb

        self._wandb = wandb
        resolved_mode = mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(
            project=project, group=group, mode=resolved_mode, dir=str(output_dir), tags=tags, reinit=True
        )
        # The defense report read during the attack (heistlab.experiment.monitored_oracle), plotted against
        # the queries served; wandb's own step stays the round's.
        self.run.define_metric(f"{MONITOR}queries")
        self.run.define_metric(f"{MONITOR}*", step_metric=f"{MONITOR}queries")

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        numeric = {key: value for key, value in metrics.items() if isinstance(value, int | float | bool)}
        if numeric and all(key.startswith(MONITOR) for key in numeric):
            self.run.log(numeric)  # its x-axis is monitor/queries; a step here would rewind wandb's
            return
        self.run.log(numeric, step=step)
        self.run.summary.update(numeric)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "complete" else 1)
