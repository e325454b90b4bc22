"""Configs a run cannot honour are refused before any work: one line on stderr, exit status 2, no victim
trained (``heistlab.checks``, ``python -m experiments.run``).

The entry point runs in-process on the default digits data, with the victim's loader replaced by one that
fails the test: a refusal that came after training would be caught by it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra._internal.core_plugins.basic_launcher
import hydra._internal.hydra
import hydra.core.utils
import pytest

import heistlab.experiment
from heistlab import checks
from heistlab.checks import ConfigError
from heistlab.experiments import run
from tests.test_configs import composed

REPO = Path(__file__).resolve().parent.parent
TINY = ["attack.budget=120", "surrogate.train.epochs=3", "eval.uniform_samples=64"]
HYDRA_LOG_CONFIGURERS = (hydra._internal.hydra, hydra._internal.core_plugins.basic_launcher, hydra.core.utils)


@pytest.fixture
def no_training(monkeypatch):
    """Replaces the victim loader: any run that gets as far as the victim fails the test."""
    loaded = []

    def refuse_to_train(*arguments, **keywords):
        loaded.append(True)
        raise AssertionError("the victim was loaded or trained before the config was refused")

    monkeypatch.setattr(heistlab.experiment, "load_victim", refuse_to_train)
    return loaded


def refused_line(arguments: list[str], tmp_path: Path, monkeypatch, capsys) -> str:
    """Runs the entry point with ``arguments``; asserts exit status 2 and returns its one stderr line."""
    command = [*arguments, f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]
    monkeypatch.setattr(sys, "argv", ["experiments.run", *command])
    monkeypatch.setenv("CI", "true")
    # Hydra finds ../configs beside the entry point's file, as under `python -m experiments.run`, and leaves
    # logging alone (its dictConfig would close pytest's capture).
    monkeypatch.setenv("HYDRA_MAIN_MODULE", "__main__")
    for module in HYDRA_LOG_CONFIGURERS:
        monkeypatch.setattr(module, "configure_log", lambda *arguments, **keywords: None)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run.cli()
    assert exited.value.code == checks.REFUSED_STATUS
    errors = capsys.readouterr().err
    lines = [line for line in errors.splitlines() if line.strip()]
    assert len(lines) == 1, errors
    assert lines[0].startswith("heistlab: refused: ") and "Traceback" not in errors
    return lines[0]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["seed=abc"], ["seed must be an integer", "'abc'"]),
        (
            ["attack=equation_solving"],
            ["equation_solving extracts only a softmax-regression victim", "victim is mlp",
             "attack.allow_mismatched_victim=true"],
        ),
        (
            ["victim=cnn", "attack=functional_equivalence"],
            ["functional_equivalence extracts only a one-hidden-layer ReLU network", "victim is cnn",
             "victim=relu_one_hidden"],
        ),
        (["defense=top_k", "defense.k=11"], ["k=11 exceeds the 10 classes", "accepted: 1 to 10"]),
        (["defense=edm", "defense.members=1"], ["defense: edm: members must be an int >= 2, got 1"]),
        (
            ["defense=chain",
             "defense.members=[{_target_: heistlab.defenses.rounding}, {_target_: heistlab.defenses.edm}]"],
            ["defense.members[1] is heistlab.defenses.edm", "would discard", "the chain's first member"],
        ),
        (
            ["attack=cloudleak", "attack.budget=50"],
            ["attack: cloudleak: budget=50 leaves no FeatureFool queries after seed_size=100",
             "a smaller seed_size"],
        ),
        (["api.output=top_k", "api.top_k=11"], ["api.top_k=11 exceeds the 10 classes", "accepted: 1 to 10"]),
        (
            ["attack.budget=1000000000000"],
            ["attack.budget=1000000000000 needs about", "GiB", "available", "accepted: attack.budget up to"],
        ),
        (
            ["defense=chain", "defense.members=[{_target_: heistlab.defenses.firewall}]"],
            ["defense.members[0] names an unknown defense 'heistlab.defenses.firewall'",
             "heistlab.defenses.rounding", "heistlab.defenses.top_k"],
        ),
        (
            ["defense=chain", "defense.members=[rounding, top_k]"],
            ["defense.members[0] is 'rounding'", "not names",
             "{_target_: heistlab.defenses.rounding, decimals: 2}"],
        ),
        (["api=http"], ["api=http needs api.key_file", "experiments.keys create"]),
        (
            ["evasion=square", "api.output=labels"],
            ["evasion square needs scores", "api.output=labels", "evasion=hopskipjump"],
        ),
        (["defense=rounding", "defense.decimals=-1"], ["defense: rounding", "decimals"]),
        (["num_seeds=0"], ["num_seeds must be an integer >= 1"]),
        (["victim=lenet5"], ["victim: LeNet-5 needs inputs of at least 12x12 pixels, got 8x8"]),
        (["surrogate=lenet5"], ["surrogate: LeNet-5 needs inputs of at least 12x12 pixels, got 8x8"]),
        (
            ["attack=maze", "api.output=labels"],
            ["attack maze needs scores", "api.output=labels", "accepted: api.output=probabilities"],
        ),
        (["attack=maze", "attack.budget=100"], ["maze: budget=100 cannot pay", "accepted: budget >= 192"]),
        (
            ["defense=proof_of_work", "defense.base_bits=80"],
            ["defense: proof_of_work: base_bits must be an int in [0, 64], got 80"],
        ),
    ],
)  # fmt: skip
def test_refused_in_one_line_before_the_victim(
    arguments, expected, tmp_path, monkeypatch, capsys, no_training
):
    line = refused_line(arguments, tmp_path, monkeypatch, capsys)
    for fragment in expected:
        assert fragment in line
    assert not no_training
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "refused" and record["error"] == line.removeprefix("heistlab: refused: ")


def test_missing_launcher_plugin_names_the_pip_command(tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.setattr(checks, "installed", lambda module: False)
    line = refused_line(["-m", "hydra/launcher=slurm", "seed=0,1"], tmp_path, monkeypatch, capsys)
    assert "hydra/launcher=slurm needs the hydra-submitit-launcher plugin" in line
    assert 'pip install hydra-submitit-launcher (in a checkout: pip install -e ".[slurm]")' in line


def test_launcher_check_passes_installed_plugins_and_other_arguments():
    checks.check_launcher(["hydra/launcher=ray_local", "seed=0"], is_installed=lambda module: True)
    checks.check_launcher(["seed=0", "defense=none"], is_installed=lambda module: False)
    with pytest.raises(ConfigError, match=r"pip install hydra-ray-launcher \(in a checkout: pip install -e"):
        checks.check_launcher(["hydra/launcher=ray_local"], is_installed=lambda module: False)


def test_memory_check_compares_the_transfer_set_with_what_is_available():
    """digits' 8x8x1 inputs and 10 scores are 296 float32 bytes a query: 100 million queries are 27.6 GiB."""
    available = (16 * 2**30, "a test's 16 GiB")
    checks.check_transfer_set_memory(50_000_000, (8, 8, 1), 10, 1, available)
    with pytest.raises(
        ConfigError, match=r"needs about 27\.6 GiB .* the 16\.0 GiB available .* up to about 58040098"
    ):
        checks.check_transfer_set_memory(100_000_000, (8, 8, 1), 10, 1, available)
    with pytest.raises(ConfigError, match=r"x 4 seed\(s\)"):
        checks.check_transfer_set_memory(20_000_000, (8, 8, 1), 10, 4, available)
    checks.check_transfer_set_memory(10**15, (8, 8, 1), 10, 1, None)


def test_memory_check_skips_attacks_that_do_not_keep_their_queries(no_training, tmp_path):
    cfg = composed("attack=dfme", "attack.budget=1000000000000", f"cache_dir={tmp_path}")
    with pytest.raises(AssertionError, match="the victim was loaded or trained"):
        heistlab.experiment.prepare(cfg)


def test_available_memory_reads_the_machine():
    free, source = checks.available_memory()
    assert free > 0 and source


@pytest.mark.slow
def test_an_allowed_mismatch_runs_and_is_recorded(tmp_path, cache_dir):
    """equation_solving against the MLP victim, opted in: it runs, and results.json says what was wrong."""
    cfg = composed(
        "attack=equation_solving",
        "attack.budget=65",
        "attack.allow_mismatched_victim=true",
        "victim.train.epochs=2",
        "eval.uniform_samples=64",
        f"cache_dir={cache_dir}",
    )
    metrics = heistlab.experiment.run_experiment(cfg, tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "complete" and metrics["queries_served"] == 65
    assert record["metrics"]["victim_mismatch"].startswith(
        "attack equation_solving extracts only a softmax-regression victim (victim=softmax_regression), "
        "but the victim is mlp"
    )


def test_a_matching_victim_needs_no_opt_in():
    from heistlab.attacks import equation_solving, functional_equivalence
    from heistlab.models import MLP, SoftmaxRegression

    assert checks.check_victim_family(equation_solving(), SoftmaxRegression(10), "x", False) is None
    assert checks.check_victim_family(functional_equivalence(), MLP(10, (32,)), "x", False) is None
    with pytest.raises(ConfigError, match="one-hidden-layer ReLU"):
        checks.check_victim_family(functional_equivalence(), MLP(10, (32, 32)), "mlp", False)


@pytest.mark.slow
def test_a_sweep_stops_at_its_refused_job_with_one_line(tmp_path, cache_dir):
    """Job 0 runs; job 1 (seed=abc) is refused in one line, exit status 2, whatever Hydra wraps."""
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "-m",
        "seed=0,abc",
        *TINY,
        f"hydra.sweep.dir={tmp_path}",
    ]
    environment = {**os.environ, "HEISTLAB_CACHE_DIR": str(cache_dir), "CI": "true"}
    finished = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == checks.REFUSED_STATUS, finished.stderr
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in finished.stderr
    assert lines[0].startswith("heistlab: refused: sweep ") and "job 2/2 (seed=abc" in lines[0]
    assert json.loads((tmp_path / "0" / "results.json").read_text())["status"] == "complete"
    assert json.loads((tmp_path / "1" / "results.json").read_text())["status"] == "refused"
