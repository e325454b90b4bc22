"""Notebooks: each .ipynb matches its jupytext .py pair, syncing the committed pair changes nothing, the
example sweeps in the docs compose, and the analysis notebook runs as README.md's Notebook section says."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from jupytext.cli import jupytext as jupytext_cli

from tests.test_sweep import interrupted_then_resumed_sweep

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
SWEEP_COMMAND = re.compile(r"^python -m experiments\.run -m (.+)$", re.MULTILINE)


def cell_sources(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def readme_notebook_commands() -> str:
    """The bash block of README.md's Notebook section."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("```bash\n", readme.index("### Notebook")) + len("```bash\n")
    return readme[start : readme.index("```", start)]


def readme_command(containing: str) -> str:
    """The README Notebook section's one command line that contains ``containing``, comment removed."""
    lines = [line for line in readme_notebook_commands().splitlines() if containing in line]
    assert len(lines) == 1, f"expected one README notebook command with {containing!r}, found {lines}"
    return lines[0].split("  #")[0].strip()


def test_every_notebook_matches_its_percent_script():
    pairs = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert [path.stem for path in pairs] == ["analysis"]
    for notebook_path in pairs:
        notebook = nbformat.read(notebook_path, as_version=4)
        script = jupytext.read(notebook_path.with_suffix(".py"))
        assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"
        assert cell_sources(notebook) == cell_sources(script), f"run: jupytext --sync {notebook_path}"


@pytest.mark.parametrize("synced", ["analysis.py", "analysis.ipynb"])
def test_jupytext_sync_leaves_the_committed_pair_unchanged(tmp_path, synced):
    for name in ("analysis.py", "analysis.ipynb"):
        shutil.copy2(NOTEBOOKS / name, tmp_path / name)
    assert readme_command("jupytext --sync") == "jupytext --sync notebooks/analysis.py"
    jupytext_cli(["--sync", str(tmp_path / synced)])
    for name in ("analysis.py", "analysis.ipynb"):
        unchanged = (tmp_path / name).read_bytes() == (NOTEBOOKS / name).read_bytes()
        assert unchanged, f"jupytext --sync changed {name}"


def sweep_choices(arguments: str) -> list[list[str]]:
    """Each override's values in the sweep ``python -m experiments.run -m <arguments>``, expanded as Hydra's
    basic sweeper expands them (its jobs are their product)."""
    overrides = OverridesParser.create().parse_overrides(shlex.split(arguments))
    return [
        [f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()]
        if override.is_sweep_override()
        else [override.input_line]
        for override in overrides
    ]


@pytest.mark.slow
def test_the_documented_example_sweep_composes():
    header = nbformat.read(NOTEBOOKS / "analysis.ipynb", as_version=4).cells[0].source
    sweeps = SWEEP_COMMAND.findall(header) + SWEEP_COMMAND.findall(readme_notebook_commands())
    assert len(sweeps) == 2 and sweeps[0] == sweeps[1], "the notebook header and README give one sweep"
    choices = sweep_choices(sweeps[0])
    assert len(list(itertools.product(*choices))) == 18
    # every value of every key once, the other keys at their first value (composing all 18 takes ~10 s)
    firsts = [values[0] for values in choices]
    jobs = {
        (*firsts[:position], value, *firsts[position + 1 :])
        for position, values in enumerate(choices)
        for value in values
    }
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        targets = {compose(config_name="config", overrides=list(job)).defense._target_ for job in jobs}
    assert targets == {"heistlab.defenses.identity", "heistlab.defenses.rounding"}
    assert "hydra.sweep.dir=multirun/rounding" in firsts


@pytest.mark.slow
def test_analysis_notebook_runs_as_the_readme_says(tmp_path, run_tmp, cache_dir):
    """The README's headless command, run as written by a shell in a checkout-like folder (the notebook under
    notebooks/, the sweep under multirun/), reads the relative HEISTLAB_SWEEP from that folder."""
    sweep = interrupted_then_resumed_sweep(run_tmp, cache_dir)
    (tmp_path / "notebooks").mkdir()
    shutil.copy2(NOTEBOOKS / "analysis.ipynb", tmp_path / "notebooks" / "analysis.ipynb")
    (tmp_path / "multirun").mkdir()
    (tmp_path / "multirun" / "rounding").symlink_to(sweep.folder, target_is_directory=True)
    command = readme_command("jupyter execute")
    assert command == "HEISTLAB_SWEEP=multirun/rounding jupyter execute notebooks/analysis.ipynb"
    environment = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    environment.pop("PWD", None)  # the shell sets it to the folder it starts in, as a user's shell does
    environment.pop("HEISTLAB_DEFENSE", None)
    ran = subprocess.run(
        ["bash", "-c", f"{command} --inplace --timeout=120"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-4000:]
    notebook = nbformat.read(tmp_path / "notebooks" / "analysis.ipynb", as_version=4)
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs if output.get("output_type") == "stream")
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    markdown = "".join(
        output["data"]["text/markdown"] for output in outputs if "text/markdown" in output.get("data", {})
    )
    html = "".join(output["data"]["text/html"] for output in outputs if "text/html" in output.get("data", {}))
    assert "multirun/rounding: 8 runs" in text
    assert len(images) == 3  # budget and trade-off figures, then the defense's own scatter
    assert "8 runs: 8 complete" in markdown and "defense=rounding" in markdown
    assert "fidelity taken" in html and "60" in html and "120" in html
