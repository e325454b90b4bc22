# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version,-jupytext.text_representation.format_version
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Analysing a heistlab sweep
#
# Loads a sweep with `heistlab.report` (the module behind `python -m experiments.report`), shows its table
# (mean ± std over seeds per cell), reproduces the report's figures, then looks at one defense's trade-off:
# how much fidelity it takes from the attacker, and what it costs honest clients.
#
# Which sweep: `HEISTLAB_SWEEP` (a sweep or run folder), else the newest folder under `multirun/`. Both are
# read from the directory the `jupyter` command was run in (the shell's `PWD`, which the kernel inherits;
# the kernel itself runs in `notebooks/`). For example, from the repository root:
#
# ```bash
# python -m experiments.run -m defense=none,rounding attack.budget=250,500,1000 'seed=range(3)' hydra.sweep.dir=multirun/rounding
# HEISTLAB_SWEEP=multirun/rounding jupyter lab notebooks/analysis.ipynb
# ```

# %%
# %matplotlib inline
import os
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display
from matplotlib.figure import Figure

from heistlab import report

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
LAUNCH_DIR = Path(os.environ.get("PWD") or ROOT)


def newest_sweep(root: Path) -> Path:
    # Hydra writes multirun.yaml at the top of every sweep folder, dated or named with hydra.sweep.dir
    sweeps = sorted(
        (record.parent for record in (root / "multirun").rglob("multirun.yaml")),
        key=lambda path: path.stat().st_mtime,
    )
    if not sweeps:
        raise FileNotFoundError(f"no sweep under {root / 'multirun'}: run one, or set HEISTLAB_SWEEP")
    return sweeps[-1]


def chosen_sweep(named: str | None) -> Path:
    if not named:
        return newest_sweep(LAUNCH_DIR)
    sweep = LAUNCH_DIR / Path(named).expanduser()  # an absolute path stays as it is
    if not sweep.is_dir():
        raise FileNotFoundError(
            f"HEISTLAB_SWEEP={named}: {sweep} is not a folder (a relative path is read from {LAUNCH_DIR}, "
            "where jupyter was started); give a sweep or run folder"
        )
    return sweep


SWEEP = chosen_sweep(os.environ.get("HEISTLAB_SWEEP"))
gathered = report.gather([SWEEP])
summary = report.summarize(gathered)
failed = report.failed_runs(gathered)
print(f"{SWEEP}: {len(gathered.runs)} runs, cells vary {', '.join(gathered.cells) or 'nothing'}")

# %% [markdown]
# ## The table: mean ± std over seeds per cell
#
# Failed runs are listed under the table and left out of every average.

# %%
display(Markdown(report.report_markdown(gathered, summary, failed)))

# %% [markdown]
# ## The report's figures
#
# Fidelity and surrogate accuracy against the query budget per defense, and the defender's utility (served
# accuracy, mean L1 distortion) against the attacker's fidelity; detection, watermark and transfer figures
# appear when the sweep measured those metrics.

# %%
for name, figure in report.figures(gathered).items():
    print(name)
    display(figure)

# %% [markdown]
# ## One defense's trade-off
#
# `HEISTLAB_DEFENSE` picks the defense (default: the first one that is not `none`). Each complete run is a
# point: its served distortion against the fidelity the attacker reached, next to the undefended runs. The
# table compares the defense with no defense at each query budget.

# %%
runs = report.complete_runs(gathered)
defenses = sorted(runs["defense"].dropna().unique()) if "defense" in runs else []
defended = [name for name in defenses if name != "none"]
DEFENSE = os.environ.get("HEISTLAB_DEFENSE") or (defended[0] if defended else None)
print("defenses in the sweep:", defenses, "| exploring:", DEFENSE)

# %%
if DEFENSE is not None:
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axis = figure.subplots()
    for name in (DEFENSE, "none"):
        chosen = runs[runs["defense"] == name]
        if len(chosen):
            axis.scatter(chosen["mean_l1_distortion"], chosen["fidelity_test"], label=name, alpha=0.8)
    axis.set(xlabel="mean L1 distortion of served answers", ylabel="attacker fidelity_test", title=DEFENSE)
    axis.grid(alpha=0.3)
    axis.legend()
    display(figure)

# %%
if DEFENSE is not None and "none" in defenses:
    columns = ["fidelity_test", "served_accuracy", "mean_l1_distortion"]
    by_budget = runs.groupby(["defense", report.BUDGET])[columns].mean()
    comparison = pd.DataFrame(
        {
            "fidelity (none)": by_budget.loc["none", "fidelity_test"],
            f"fidelity ({DEFENSE})": by_budget.loc[DEFENSE, "fidelity_test"],
            "served accuracy lost": by_budget.loc["none", "served_accuracy"]
            - by_budget.loc[DEFENSE, "served_accuracy"],
            "mean L1 distortion": by_budget.loc[DEFENSE, "mean_l1_distortion"],
        }
    ).dropna()
    comparison["fidelity taken"] = comparison["fidelity (none)"] - comparison[f"fidelity ({DEFENSE})"]
    display(comparison.round(4))
