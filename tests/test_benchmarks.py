"""Every paper preset composes with its sweep, and BENCHMARKS.md is generated from results, not typed."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from heistlab import benchmarks
from tests.test_configs import CONFIGS


@pytest.mark.parametrize("preset", benchmarks.presets(), ids=lambda preset: preset.name)
def test_every_preset_composes_and_states_its_claim(preset):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={preset.name}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params, "a preset defines its sweep"
    assert preset.command.startswith(("python -m experiments.run -m experiment=", "HEISTLAB_DAWN_KEY"))
    assert preset.runtime and preset.claim and preset.expected


def test_markdown_reports_measured_cells_from_results(tmp_path):
    preset = benchmarks.presets(["lee2019"])[0]
    for job, (beta, seed, fidelity) in enumerate([(0.0, 0, 0.9), (0.0, 1, 0.8), (0.7, 0, 0.5)]):
        folder = tmp_path / "runs" / "lee2019" / str(job)
        folder.mkdir(parents=True)
        record = {
            "config": {"defense": {"_target_": "defenses.reverse_sigmoid", "beta": beta}, "seed": seed},
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
