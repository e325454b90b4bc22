"""Loggers record the run's config and metrics locally, and to W&B offline without a key."""

from __future__ import annotations

import json

import pytest

from heistlab.loggers import JsonlLogger, WandbLogger


def test_jsonl_logger_appends_one_event_per_line(tmp_path):
    logger = JsonlLogger(tmp_path)
    logger.log_config({"seed": 1})
    logger.log_metrics({"fidelity_test": 0.9}, step=2)
    logger.finish("complete")
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [event["event"] for event in events] == ["config", "metrics", "finish"]
    assert events[1]["metrics"] == {"fidelity_test": 0.9} and events[1]["step"] == 2


@pytest.mark.slow
def test_wandb_logger_runs_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(tmp_path, project="heistlab-test")
    logger.log_config({"seed": 1})
    logger.log_metrics({"fidelity_test": 0.9, "note": "text is skipped"})
    assert logger.run.summary["fidelity_test"] == 0.9
    logger.finish("complete")
    assert list((tmp_path / "wandb").glob("offline-run-*"))
