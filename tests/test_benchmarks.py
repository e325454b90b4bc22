"""Every paper preset composes with its sweep, and BENCHMARKS.md is generated from results, not typed."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from heistlab import benchmarks, numerics
from heistlab.experiments import benchmarks as benchmarks_command
from tests.test_configs import CONFIGS


@pytest.mark.parametrize("preset", benchmarks.presets(), ids=lambda preset: preset.name)
def test_every_preset_composes_and_states_its_claim(preset):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={preset.name}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params, "a preset defines its sweep"
    assert preset.command.startswith(("python -m experiments.run -m experiment=", "HEISTLAB_DAWN_KEY"))
    assert preset.runtime and preset.claim and preset.expected
    # The command as written runs its sweep with Hydra's default launcher: sequentially.
    assert "one after another" in preset.runtime and "parallel" not in preset.runtime


def test_markdown_reports_measured_cells_from_results(tmp_path):
    preset = benchmarks.presets(["lee2019"])[0]
    for job, (beta, seed, fidelity) in enumerate([(0.0, 0, 0.9), (0.0, 1, 0.8), (0.7, 0, 0.5)]):
        folder = tmp_path / "runs" / "lee2019" / str(job)
        folder.mkdir(parents=True)
        record = {
            "config": {
                "defense": {"_target_": "heistlab.defenses.reverse_sigmoid", "beta": beta},
                "seed": seed,
            },
            "metrics": {"fidelity_test": fidelity, "served_accuracy": 0.98},
            "seed": seed,
            "status": "complete",
        }
        (folder / "results.json").write_text(json.dumps(record))
    text = benchmarks.preset_section(preset, tmp_path / "runs", tmp_path / "figures")
    assert "| defense.beta=0 | 2 | 0.980 ± 0.000 | 0.850 ± 0.071 |" in text
    assert "| defense.beta=0.7 | 1 | 0.980 | 0.500 |" in text
    missing = benchmarks.preset_section(benchmarks.presets(["adi2018"])[0], tmp_path / "runs", tmp_path)
    assert "Not run yet" in missing


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match=r"unknown preset\(s\) \['nope'\]; accepted: adi2018"):
        benchmarks.presets(["nope"])


def write_lee2019_runs(runs, fidelities=(0.9, 0.8, 0.5), failed=False):
    """Hand-made results for lee2019: beta 0 with seeds 0 and 1, beta 0.7 with seed 0 (and a failed run)."""
    cells = [(0.0, 0), (0.0, 1), (0.7, 0)]
    for job, ((beta, seed), fidelity) in enumerate(zip(cells, fidelities, strict=True)):
        record = {
            "config": {
                "defense": {"_target_": "heistlab.defenses.reverse_sigmoid", "beta": beta},
                "seed": seed,
            },
            "metrics": {"fidelity_test": fidelity, "served_accuracy": 0.98, "wall_seconds": 2.0},
            "seed": seed,
            "status": "complete",
        }
        write_record(runs / "lee2019" / str(job), record)
    if failed:
        record = {"config": {"defense": {"beta": 1.0}, "seed": 0}, "status": "failed", "error": "boom"}
        write_record(runs / "lee2019" / "3", record)


def write_tramer2016_runs(runs, fidelity_at_2_decimals):
    for job, decimals in enumerate((7, 2)):
        record = {
            "config": {
                "defense": {"_target_": "heistlab.defenses.rounding", "decimals": decimals},
                "seed": 0,
            },
            "metrics": {"fidelity_uniform": 1.0 if decimals == 7 else fidelity_at_2_decimals},
            "seed": 0,
            "status": "complete",
        }
        write_record(runs / "tramer2016" / str(job), record)


def write_record(folder, record):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(record))


def test_written_tables_name_runs_relative_to_the_sweep_folder(tmp_path):
    write_lee2019_runs(tmp_path / "runs", failed=True)
    section = benchmarks.preset_section(
        benchmarks.presets(["lee2019"])[0], tmp_path / "runs", tmp_path / "fig"
    )
    written = tmp_path / "fig" / "lee2019"
    runs = pd.read_csv(written / "runs.csv")
    assert sorted(runs["path"]) == ["0/results.json", "1/results.json", "2/results.json", "3/results.json"]
    assert list(pd.read_csv(written / "failed.csv")["path"]) == ["3/results.json"]
    assert "- not complete: lee2019/3/results.json: boom" in section
    for name in ("runs.csv", "failed.csv", "summary.md", "summary.csv", "summary.tex"):
        assert str(tmp_path) not in (written / name).read_text(), name
    assert str(tmp_path) not in pd.read_parquet(written / "runs.parquet").to_string()


def regenerate(tmp_path, *names):
    benchmarks_command.main(
        [
            *names,
            "--report-only",
            f"--runs={tmp_path / 'runs'}",
            f"--figures={tmp_path / 'figures'}",
            f"--out={tmp_path / 'BENCHMARKS.md'}",
            f"--published={tmp_path / 'published.json'}",
        ]
    )


def snapshot(folder):
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(folder.iterdir())}


def test_regenerating_one_preset_rewrites_its_section_alone(tmp_path):
    write_lee2019_runs(tmp_path / "runs")
    write_tramer2016_runs(tmp_path / "runs", fidelity_at_2_decimals=0.6)
    regenerate(tmp_path, "lee2019", "tramer2016")
    before = benchmarks.split_sections((tmp_path / "BENCHMARKS.md").read_text())
    assert set(before) == {preset.name for preset in benchmarks.presets()}
    assert "Not run yet" in before["adi2018"] and "| defense.beta=0 | 2 |" in before["lee2019"]
    lee2019_figures = snapshot(tmp_path / "figures" / "lee2019")
    lee2019_published = json.loads((tmp_path / "published.json").read_text())["presets"]["lee2019"]

    write_tramer2016_runs(tmp_path / "runs", fidelity_at_2_decimals=0.7)
    regenerate(tmp_path, "tramer2016")
    document = (tmp_path / "BENCHMARKS.md").read_text()
    after = benchmarks.split_sections(document)
    assert document.startswith(benchmarks.INTRO)
    assert {name: text for name, text in after.items() if name != "tramer2016"} == {
        name: text for name, text in before.items() if name != "tramer2016"
    }
    assert "| defense.decimals=2 | 1 | 0.600 |" in before["tramer2016"]
    assert "| defense.decimals=2 | 1 | 0.700 |" in after["tramer2016"]
    assert snapshot(tmp_path / "figures" / "lee2019") == lee2019_figures
    published = json.loads((tmp_path / "published.json").read_text())["presets"]
    assert published["lee2019"] == lee2019_published
    at_2_decimals = published["tramer2016"]["groups"][0]
    assert at_2_decimals["cell"]["defense.decimals"] == 2
    assert at_2_decimals["metrics"]["fidelity_uniform"]["mean"] == 0.7


def test_one_preset_is_refused_when_the_document_has_no_section_markers(tmp_path):
    write_tramer2016_runs(tmp_path / "runs", fidelity_at_2_decimals=0.6)
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n\n## Some section\n\nwritten before markers\n")
    with pytest.raises(SystemExit, match="no `<!-- preset: name -->` section markers"):
        regenerate(tmp_path, "tramer2016")
    assert "written before markers" in (tmp_path / "BENCHMARKS.md").read_text()


def test_report_only_names_the_presets_without_results(tmp_path):
    with pytest.raises(SystemExit, match=r"--report-only: no results for adi2018, lee2019 under .*runs"):
        regenerate(tmp_path, "adi2018", "lee2019")


def published_entry(fidelity_mean=0.85, fidelity_std=0.07, served_std=0.0, runs=2):
    """A published.json entry: two cells of lee2019, means and stds as the tool writes them."""
    return {
        "command_seconds": 20.0,
        "groups": [
            {
                "cell": {"defense.beta": 0},
                "label": "defense.beta=0",
                "runs": runs,
                "metrics": {
                    "fidelity_test": {"mean": fidelity_mean, "std": fidelity_std, "n": runs},
                    "served_accuracy": {"mean": 0.98, "std": served_std, "n": runs},
                },
            },
            {
                "cell": {"defense.beta": 0.7},
                "label": "defense.beta=0.7",
                "runs": 1,
                "metrics": {
                    "fidelity_test": {"mean": 0.5, "std": None, "n": 1},
                    "served_accuracy": {"mean": 0.98, "std": None, "n": 1},
                },
            },
        ],
    }


def test_a_mean_within_its_spread_over_seeds_holds():
    moved = benchmarks.moved_metrics("lee2019", published_entry(), published_entry(fidelity_mean=0.91))
    assert moved == []


def test_a_mean_moved_beyond_its_spread_is_named_with_both_means_and_the_spread():
    moved = benchmarks.moved_metrics("lee2019", published_entry(), published_entry(fidelity_mean=0.93))
    assert moved == [
        "lee2019: group defense.beta=0: fidelity_test moved: published mean 0.85, new mean 0.93, "
        "allowed spread 0.07"
    ]


def test_zero_or_unknown_spread_allows_only_the_documented_floor():
    assert benchmarks.allowed_spread({"mean": 0.98, "std": 0}) == benchmarks.SPREAD_FLOOR == 0.005
    assert benchmarks.allowed_spread({"mean": 650.0, "std": None}) == pytest.approx(0.65)
    published = published_entry()
    within_floor = published_entry()
    within_floor["groups"][1]["metrics"]["fidelity_test"]["mean"] = 0.504
    assert benchmarks.moved_metrics("lee2019", published, within_floor) == []
    beyond_floor = published_entry()
    beyond_floor["groups"][1]["metrics"]["fidelity_test"]["mean"] = 0.506
    assert benchmarks.moved_metrics("lee2019", published, beyond_floor) == [
        "lee2019: group defense.beta=0.7: fidelity_test moved: published mean 0.5, new mean 0.506, "
        "allowed spread 0.005"
    ]


def test_a_missing_group_a_new_group_and_a_lost_run_are_named():
    rerun = published_entry(runs=1)
    rerun["groups"][1]["cell"] = {"defense.beta": 1.0}
    rerun["groups"][1]["label"] = "defense.beta=1"
    rerun["groups"][0]["metrics"].pop("served_accuracy")
    assert benchmarks.moved_metrics("lee2019", published_entry(), rerun) == [
        "lee2019: group defense.beta=0: 2 complete runs published, 1 now",
        "lee2019: group defense.beta=0: served_accuracy moved: published mean 0.98, new mean missing, "
        "allowed spread 0.005",
        "lee2019: group defense.beta=0.7: published, missing from the rerun",
        "lee2019: group defense.beta=1: in the rerun, not published",
    ]


def test_check_reruns_the_quick_presets_and_fails_on_a_moved_mean(tmp_path, monkeypatch, capsys):
    published = {
        "presets": {"lee2019": published_entry(), "tramer2016": {"command_seconds": 90.0, "groups": []}}
    }
    (tmp_path / "published.json").write_text(json.dumps(published))
    rerun = []

    def fake_run(preset, runs_dir, jobs):
        rerun.append(preset.name)
        write_lee2019_runs(runs_dir, fidelities=(0.9, 0.8, 0.4))
        return 1.0

    monkeypatch.setattr(benchmarks, "run_preset", fake_run)
    check = ["--check", "lee2019", "tramer2016", f"--published={tmp_path / 'published.json'}"]
    with pytest.raises(SystemExit) as exit_status:
        benchmarks_command.main(check)
    assert exit_status.value.code == 1 and rerun == ["lee2019"]
    problems = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lee2019:")]
    assert problems == [
        "lee2019: group defense.beta=0.7: fidelity_test moved: published mean 0.5, new mean 0.4, "
        "allowed spread 0.005"
    ]
    with pytest.raises(SystemExit) as exit_status:
        benchmarks_command.main([*check, "--under=10"])
    assert exit_status.value.code == 0 and rerun == ["lee2019"]


THIS_MACHINE = {"numerics": "aaaa", "cpu": "Example CPU", "vector_flags": ["avx2"], "cores": 2}
OTHER_MACHINE = {**THIS_MACHINE, "numerics": "bbbb", "vector_flags": ["avx2", "avx512f"]}


def test_means_are_compared_only_with_results_of_the_same_numerics():
    assert benchmarks.comparable_means({"machine": THIS_MACHINE}, THIS_MACHINE)
    assert not benchmarks.comparable_means({"machine": OTHER_MACHINE}, THIS_MACHINE)
    assert benchmarks.comparable_means({}, THIS_MACHINE)  # published before machines were recorded
    moved, lost_group = published_entry(fidelity_mean=0.93), published_entry()
    lost_group["groups"].pop()
    assert benchmarks.moved_metrics("lee2019", published_entry(), moved, compare_means=False) == []
    assert benchmarks.moved_metrics("lee2019", published_entry(), lost_group, compare_means=False) == [
        "lee2019: group defense.beta=0.7: published, missing from the rerun"
    ]


@pytest.mark.parametrize(
    ("published_on", "status"), [(THIS_MACHINE, 1), (OTHER_MACHINE, 0)], ids=["same numerics", "other"]
)
def test_check_holds_a_moved_mean_against_the_machine_it_was_published_on(
    tmp_path, monkeypatch, caplog, published_on, status
):
    published = {"presets": {"lee2019": {**published_entry(), "machine": published_on}}}
    (tmp_path / "published.json").write_text(json.dumps(published))

    def fake_run(preset, runs_dir, jobs):
        write_lee2019_runs(runs_dir, fidelities=(0.9, 0.8, 0.4))
        return 1.0

    monkeypatch.setattr(benchmarks, "run_preset", fake_run)
    monkeypatch.setattr(numerics, "machine", lambda: THIS_MACHINE)
    caplog.set_level("INFO")
    with pytest.raises(SystemExit) as exit_status:
        benchmarks_command.main(["--check", "lee2019", f"--published={tmp_path / 'published.json'}"])
    assert exit_status.value.code == status
    listed = "published on another machine's numerics (Example CPU (avx2, avx512f), 2 cores"
    assert (listed in caplog.text) == (published_on is OTHER_MACHINE)
    if published_on is OTHER_MACHINE:
        assert "fidelity_test moved: published mean 0.5, new mean 0.4" in caplog.text


def test_a_sweep_names_the_machine_it_ran_on_in_its_section_and_entry(tmp_path):
    write_lee2019_runs(tmp_path / "runs")
    folder = tmp_path / "runs" / "lee2019"
    benchmarks.record_machine(folder, THIS_MACHINE)
    benchmarks.record_machine(folder, THIS_MACHINE)
    assert benchmarks.sweep_machines(folder) == [THIS_MACHINE]
    lee2019 = benchmarks.presets(["lee2019"])[0]
    measured = benchmarks.measure_preset(lee2019, tmp_path / "runs", tmp_path / "f")
    assert measured.published["machine"] == THIS_MACHINE
    assert "**Measured** on Example CPU (avx2), 2 cores" in measured.section
    benchmarks.record_machine(folder, OTHER_MACHINE)  # resumed elsewhere: no single machine to name
    mixed = benchmarks.measure_preset(lee2019, tmp_path / "runs", tmp_path / "f")
    assert "machine" not in mixed.published and "**Measured** (" in mixed.section


def test_check_without_published_means_fails_clearly(tmp_path, caplog):
    code = benchmarks_command.check(
        benchmarks_command.parse_arguments(["--check", f"--published={tmp_path / 'absent.json'}"])
    )
    assert code == 1 and "absent.json does not exist: regenerate the benchmarks first" in caplog.text


@pytest.mark.slow
def test_published_time_is_the_sweep_from_scratch_not_a_resumed_one(tmp_path, monkeypatch):
    took = iter([42.0, 3.0])

    def fake_run(preset, runs_dir, jobs):
        write_lee2019_runs(runs_dir)
        return next(took)

    monkeypatch.setattr(benchmarks, "run_preset", fake_run)
    arguments = [
        "lee2019",
        f"--runs={tmp_path / 'runs'}",
        f"--figures={tmp_path / 'figures'}",
        f"--out={tmp_path / 'BENCHMARKS.md'}",
        f"--published={tmp_path / 'published.json'}",
    ]
    for _ in range(2):  # from scratch, then resumed (every run already finished)
        benchmarks_command.main(arguments)
        entry = json.loads((tmp_path / "published.json").read_text())["presets"]["lee2019"]
        assert (entry["command_seconds"], entry["jobs"], entry["run_seconds"]) == (42.0, 2, 6.0)
        assert benchmarks.recorded_seconds(entry) == 42.0


PAPER_SCALE = ["orekondy2019_cifar10", "truong2021_cifar10"]


def test_paper_scale_presets_name_their_needs_and_run_only_when_named():
    marked = [preset.name for preset in benchmarks.presets() if preset.paper_scale]
    assert marked == PAPER_SCALE
    for preset in benchmarks.presets(PAPER_SCALE):
        assert "GPU" in preset.hardware and "CIFAR-10" in preset.data
    default = [preset.name for preset in benchmarks.chosen_presets([])]
    assert not set(PAPER_SCALE) & set(default) and "lee2019" in default
    assert [preset.name for preset in benchmarks.chosen_presets(PAPER_SCALE[:1])] == PAPER_SCALE[:1]


def test_a_paper_scale_section_not_run_says_what_it_needs_and_estimates_nothing():
    section = benchmarks.not_run_section(benchmarks.presets(["truong2021_cifar10"])[0])
    assert "**Paper scale.** Needs one GPU" in section and "CIFAR-10 (170 MB download" in section
    assert "**Expected at paper scale.**" in section and "nothing is estimated" in section


def test_check_without_names_never_reruns_a_paper_scale_preset(tmp_path, monkeypatch):
    published = {"presets": {name: {"command_seconds": 1.0, "groups": []} for name in PAPER_SCALE}}
    (tmp_path / "published.json").write_text(json.dumps(published))
    rerun = []
    monkeypatch.setattr(benchmarks, "run_preset", lambda preset, runs_dir, jobs: rerun.append(preset.name))
    with pytest.raises(SystemExit):
        benchmarks_command.main(["--check", f"--published={tmp_path / 'published.json'}"])
    assert rerun == []


def test_a_paper_scale_preset_needs_its_hardware_and_data(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("benchmark: {title: t, claim: c, expected: e, scale: paper, hardware: one GPU}\n")
    with pytest.raises(ValueError, match="names the `hardware` and `data` it needs"):
        benchmarks.load_preset(path)
    path.write_text("benchmark: {title: t, claim: c, expected: e, scale: huge}\n")
    with pytest.raises(ValueError, match="benchmark.scale must be one of digits, paper, got 'huge'"):
        benchmarks.load_preset(path)
