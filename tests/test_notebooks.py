"""Notebooks: each .ipynb matches its jupytext .py pair, and the analysis notebook runs on a real sweep."""

from __future__ import annotations

import os
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

from tests.test_sweep import interrupted_then_resumed_sweep

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def cell_sources(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_every_notebook_matches_its_percent_script():
    pairs = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert [path.stem for path in pairs] == ["analysis"]
    for notebook_path in pairs:
        notebook = nbformat.read(notebook_path, as_version=4)
        script = jupytext.read(notebook_path.with_suffix(".py"))
        assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"
        assert cell_sources(notebook) == cell_sources(script), f"run: jupytext --sync {notebook_path}"


def test_analysis_notebook_reproduces_the_report_on_a_sweep(tmp_path_factory, cache_dir, monkeypatch):
    sweep = interrupted_then_resumed_sweep(tmp_path_factory.getbasetemp(), cache_dir)
    monkeypatch.setenv("HEISTLAB_SWEEP", str(sweep.folder))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(NOTEBOOKS.parent), os.environ.get("PYTHONPATH", "")])
    )
    notebook = nbformat.read(NOTEBOOKS / "analysis.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    markdown = "".join(
        output["data"]["text/markdown"] for output in outputs if "text/markdown" in output.get("data", {})
    )
    html = "".join(output["data"]["text/html"] for output in outputs if "text/html" in output.get("data", {}))
    assert len(images) == 3  # budget and trade-off figures, then the defense's own scatter
    assert "8 runs: 8 complete" in markdown and "defense=rounding" in markdown
    assert "fidelity taken" in html and "60" in html and "120" in html
