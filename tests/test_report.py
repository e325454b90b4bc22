"""Reports: gathering results.json files, mean ± std over seeds per cell (checked by hand), tables, plots."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

matplotlib.use("Agg")

from heistlab import report
from heistlab.experiments import report as report_command
from heistlab.results import read_results, write_results
from tests.test_sweep import interrupted_then_resumed_sweep

HALF_WRITTEN = '{"config": {"attack": '
TARGETS = {"none": "heistlab.defenses.identity", "rounding": "heistlab.defenses.rounding"}


def write_run(
    folder: Path, defense: str, budget: int, seed: int, metrics: dict, status: str = "complete"
) -> None:
    target = TARGETS[defense]
    config = {
        "attack": {"_target_": "heistlab.attacks.knockoff", "budget": budget},
        "defense": {"_target_": target, **({"decimals": 1} if defense == "rounding" else {})},
        "api": {"budget": budget},
        "seed": seed,
        "cache_dir": f"/caches/{seed}",  # where victims are kept: never a cell of its own
        "logger": {"_target_": "heistlab.loggers.JsonlLogger"},
    }
    record = {"config": config, "metrics": metrics, "seed": seed, "status": status}
    if status != "complete":
        record["error"] = "Traceback (most recent call last):\n  ...\nValueError: the API fell over\n"
    write_results(folder, record)
    (folder / ".hydra").mkdir()
    choices = {"attack": "knockoff", "defense": defense, "hydra/launcher": "basic"}
    (folder / ".hydra" / "hydra.yaml").write_text(json.dumps({"hydra": {"runtime": {"choices": choices}}}))


def metrics(fidelity: float, surrogate: float, served: float, distortion: float, **extra) -> dict:
    return {
        "fidelity_test": fidelity,
        "surrogate_accuracy": surrogate,
        "served_accuracy": served,
        "mean_l1_distortion": distortion,
        "wall_seconds": 1.5,
        **extra,
    }


@pytest.fixture(scope="module")
def hand_made_sweep(tmp_path_factory) -> Path:
    """Three cells: rounding at budget 100 (3 seeds, with detection metrics), no defense at 100 (2 seeds) and
    at 200 (1 seed); plus a failed run, a half-written file, and an earlier attempt in a hidden folder."""
    root = tmp_path_factory.mktemp("hand_made")
    runs = [
        ("rounding", 100, 0, metrics(0.8, 0.7, 0.95, 0.1, detected=True, queries_to_detection=300)),
        ("rounding", 100, 1, metrics(0.9, 0.8, 0.95, 0.2, detected=True, queries_to_detection=500)),
        ("rounding", 100, 2, metrics(1.0, 0.9, 0.95, 0.3, detected=False, queries_to_detection=None)),
        ("none", 100, 0, metrics(0.5, 0.4, 0.97, 0.0)),
        ("none", 100, 1, metrics(0.7, 0.6, 0.97, 0.0)),
        ("none", 200, 0, metrics(0.75, 0.7, 0.97, 0.0)),
    ]
    for job, (defense, budget, seed, found) in enumerate(runs):
        write_run(root / str(job), defense, budget, seed, found)
    write_run(root / "6", "rounding", 100, 3, {"fidelity_test": 0.0}, status="failed")
    (root / "7").mkdir()
    (root / "7" / "results.json").write_text(HALF_WRITTEN)
    write_results(root / "0" / ".attempts" / "1", {"config": {}, "metrics": {"fidelity_test": 99.0}})
    return root


def row_of(summary: pd.DataFrame, defense: str, budget: int) -> pd.Series:
    rows = summary[(summary["defense"] == defense) & (summary["attack.budget"] == budget)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_cells_are_the_varying_config_keys_without_seed_or_storage(hand_made_sweep):
    gathered = report.gather([hand_made_sweep])
    assert gathered.cells == ("attack.budget", "defense", "defense.decimals", "api.budget")
    assert len(gathered.runs) == 8 and set(gathered.runs["status"]) == {"complete", "failed", "unreadable"}
    assert report.distinguishing_keys(report.complete_runs(gathered), gathered.cells) == (
        "attack.budget",
        "defense",
    )


def test_mean_and_std_over_seeds_match_the_hand_computed_values(hand_made_sweep):
    summary = report.summarize(report.gather([hand_made_sweep]))
    assert len(summary) == 3
    rounding = row_of(summary, "rounding", 100)
    assert rounding["runs"] == 3  # the failed seed-3 run (fidelity 0.0) is not averaged
    assert rounding["fidelity_test mean"] == pytest.approx(0.9)
    assert rounding["fidelity_test std"] == pytest.approx(0.1)  # sqrt(((-.1)^2 + 0 + .1^2) / 2)
    assert rounding["mean_l1_distortion mean"] == pytest.approx(0.2)
    assert rounding["detected mean"] == pytest.approx(2 / 3)
    assert rounding["queries_to_detection mean"] == pytest.approx(400.0)
    assert rounding["queries_to_detection std"] == pytest.approx(math.sqrt(2) * 100)
    assert rounding["queries_to_detection n"] == 2
    undefended = row_of(summary, "none", 100)
    assert undefended["fidelity_test mean"] == pytest.approx(0.6)
    assert undefended["fidelity_test std"] == pytest.approx(math.sqrt(0.02))
    single = row_of(summary, "none", 200)
    assert (
        single["runs"] == 1
        and single["fidelity_test mean"] == 0.75
        and math.isnan(single["fidelity_test std"])
    )


@pytest.mark.slow
def test_report_writes_tables_plots_and_lists_failed_runs(hand_made_sweep, tmp_path):
    written = report.write_report([hand_made_sweep], tmp_path)
    names = {path.name for path in written.files}
    assert names == {
        "runs.csv", "runs.parquet", "summary.csv", "summary.md", "summary.tex", "failed.csv",
        "budget.png", "budget.pdf", "tradeoff.png", "tradeoff.pdf", "detection.png", "detection.pdf",
    }  # fmt: skip
    assert pd.read_parquet(tmp_path / "runs.parquet").shape[0] == 8
    assert (
        pd.read_csv(tmp_path / "runs.csv")["fidelity_test"].max() == 1.0
    )  # the hidden attempt's 99 is not in
    assert (tmp_path / "budget.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "budget.pdf").read_bytes()[:5] == b"%PDF-"
    markdown = (tmp_path / "summary.md").read_text()
    assert "| attack.budget=100, defense=rounding | 3 | " in markdown
    assert "0.900 ± 0.100" in markdown and "400 ± 141 [n=2]" in markdown and "0.750 |" in markdown
    assert "failed: ValueError: the API fell over" in markdown and "unreadable: JSONDecodeError" in markdown
    latex = (tmp_path / "summary.tex").read_text()
    assert r"0.900 $\pm$ 0.100" in latex and r"fidelity\_test" in latex and r"\end{tabular}" in latex
    failed = pd.read_csv(tmp_path / "failed.csv")
    assert sorted(failed["status"]) == ["failed", "unreadable"]


def plotted(figure, axis_index: int) -> dict[str, list[tuple[float, float]]]:
    axis = figure.axes[axis_index]
    return {c.get_label(): [tuple(p) for p in c.lines[0].get_xydata()] for c in axis.containers}


def test_budget_plot_draws_one_curve_per_defense_through_the_cell_means(hand_made_sweep):
    figure = report.budget_figure(report.gather([hand_made_sweep]))
    fidelity = plotted(figure, 0)
    assert fidelity["defense=none"] == [(100, pytest.approx(0.6)), (200, pytest.approx(0.75))]
    assert fidelity["defense=rounding"] == [(100, pytest.approx(0.9))]
    assert plotted(figure, 1)["defense=rounding"] == [(100, pytest.approx(0.8))]  # surrogate accuracy
    tradeoff = plotted(report.tradeoff_figure(report.gather([hand_made_sweep])), 1)
    assert tradeoff["defense=rounding"] == [(pytest.approx(0.9), pytest.approx(0.2))]


def test_flatten_names_groups_by_hydra_choice_or_target():
    config = {
        "defense": {"_target_": "heistlab.defenses.identity"},
        "victim": {"options": {"hidden": [64, 32]}},
    }
    assert report.flatten(config, {"defense": "none"}) == {
        "defense": "none",
        "victim.options.hidden": "[64, 32]",
    }
    assert report.flatten(config)["defense"] == "identity"


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a results.json file nor a folder"):
        report.gather([tmp_path / "absent"])
    with pytest.raises(ValueError, match="no results.json under"):
        report.gather([tmp_path])


@pytest.mark.slow
def test_report_command_on_a_real_sweep(tmp_path_factory, run_tmp, cache_dir, capsys):
    sweep = interrupted_then_resumed_sweep(run_tmp, cache_dir)
    out = tmp_path_factory.mktemp("real_report")
    report_command.main([str(sweep.folder), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "8 runs: 8 complete, 0 not complete" in printed  # the set-aside attempts are not runs
    summary = pd.read_csv(out / "summary.csv")
    assert (
        len(pd.read_parquet(out / "runs.parquet")) == 8 and len(summary) == 4 and set(summary["runs"]) == {2}
    )
    fidelities = defaultdict(list)  # worked out from the results files themselves
    for path in sweep.folder.glob("[0-9]*/results.json"):
        record = read_results(path.parent)
        cell = (record["config"]["attack"]["budget"], record["config"]["defense"]["_target_"])
        fidelities[cell].append(record["metrics"]["fidelity_test"])
    for _, cell in summary.iterrows():
        first, second = fidelities[(cell["attack.budget"], TARGETS[cell["defense"]])]
        assert cell["fidelity_test mean"] == pytest.approx((first + second) / 2)
        assert cell["fidelity_test std"] == pytest.approx(abs(first - second) / math.sqrt(2))
    assert {"budget.png", "tradeoff.pdf"} <= {path.name for path in out.iterdir()}
    assert "defense=rounding" in printed and "fidelity_test" in printed


def test_a_run_of_several_seeds_is_summarised_like_one_run_per_seed(tmp_path):
    """A ``num_seeds=2`` run (seeds 0, 1) beside a single run of seed 2 in the same cell: three seeds."""
    write_run(tmp_path / "0", "none", 100, 0, metrics(0.5, 0.4, 0.97, 0.0, num_seeds=2))
    record = read_results(tmp_path / "0")
    record["config"]["num_seeds"] = 2
    record["seeds"] = [
        {"seed": 0, "metrics": metrics(0.5, 0.4, 0.97, 0.0), "rounds": []},
        {"seed": 1, "metrics": metrics(0.7, 0.6, 0.97, 0.0), "rounds": []},
    ]
    write_results(tmp_path / "0", record)
    write_run(tmp_path / "1", "none", 100, 2, metrics(0.9, 0.8, 0.97, 0.0))
    gathered = report.gather([tmp_path])
    assert sorted(gathered.runs["seed"]) == [0, 1, 2] and gathered.cells == ()
    cell = report.summarize(gathered).iloc[0]
    assert cell["runs"] == 3
    assert cell["fidelity_test mean"] == pytest.approx(0.7)
    assert cell["fidelity_test std"] == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)


def test_a_group_swept_as_whole_configs_is_named_by_their_targets(tmp_path):
    # tramer2016 sets the defense group to null and sweeps whole defense configs in its place: Hydra
    # records the choice as null, which names no option, so each run is named by its target instead.
    for job, (target, extra) in enumerate(
        [("heistlab.defenses.identity", {}), ("heistlab.defenses.rounding", {"decimals": 2})]
    ):
        folder = tmp_path / str(job)
        config = {"defense": {"_target_": target, **extra}, "seed": 0}
        write_results(
            folder, {"config": config, "metrics": {"fidelity_test": 1.0}, "seed": 0, "status": "complete"}
        )
        (folder / ".hydra").mkdir()
        choices = {"defense": None, "attack": "equation_solving"}
        (folder / ".hydra" / "hydra.yaml").write_text(
            json.dumps({"hydra": {"runtime": {"choices": choices}}})
        )
    gathered = report.gather([tmp_path])
    assert sorted(gathered.runs["defense"]) == ["identity", "rounding"]
    assert "defense" in gathered.cells
