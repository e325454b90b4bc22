"""Reports: a sweep's ``results.json`` files gathered into one table, summarised over seeds, and plotted.

``gather(paths)`` reads every ``results.json`` under the given folders (recursively; hidden folders such as
``.attempts`` are skipped) into one row per run, and one row per seed of a ``num_seeds`` run. The config keys
whose values differ between runs, found by comparing the resolved configs, define the *cells* (seed excluded,
and so are keys that only say where things are kept or how seeds were batched: ``cache_dir``,
``data.data_dir``, ``logger``, ``num_seeds``...). ``summarize`` gives the mean and sample standard
deviation (ddof=1) of each metric over the complete runs of a cell; failed or unreadable runs are listed by
``failed_runs`` and never averaged. The figures follow the metrics of the field (DESIGN.md): fidelity and
surrogate accuracy against the query budget (Tramer et al. 2016; Orekondy et al. 2019), the defender's utility
against the attacker's fidelity (Jagielski et al. 2020; Orekondy et al. 2020, prediction poisoning), and
detection, watermark and transfer results when those metrics exist.

This module loads neither JAX nor the experiment code, so notebooks import it quickly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

RESULTS_FILE = "results.json"  # heistlab.results.RESULTS_FILE (that module loads JAX)
SEED = "seed"
BUDGET = "attack.budget"
# Where things are kept or logged, not what is measured: never a cell of their own.
NOT_EXPERIMENTAL = ("cache_dir", "data.data_dir", "data.download", "logger", "protection", "num_seeds")
# Always in the run table, even when the whole sweep shares one value.
CONTEXT = ("attack", "defense", BUDGET)
HEADLINE_METRICS = (
    "victim_accuracy",
    "served_accuracy",
    "mean_l1_distortion",
    "surrogate_accuracy",
    "fidelity_test",
    "fidelity_uniform",
    "queries_served",
    "queries_refused",
)
DETECTION_METRICS = ("detected", "queries_to_detection", "false_positive_rate")
WATERMARK_PREFIX = "watermark_"
TRANSFER_PREFIX = "transfer_"
RUN_COLUMNS = ("path", "status", SEED, "error")


class Gathered(NamedTuple):
    """One row per run (``runs``), the config columns that define a cell, and the numeric metric columns."""

    runs: pd.DataFrame
    cells: tuple[str, ...]
    metrics: tuple[str, ...]


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``results.json`` given or found under the given folders, outside hidden folders, sorted."""
    found: set[Path] = set()
    for given in map(Path, paths):
        if given.is_file():
            found.add(given)
        elif given.is_dir():
            found.update(
                path
                for path in given.rglob(RESULTS_FILE)
                if not any(part.startswith(".") for part in path.relative_to(given).parts[:-1])
            )
        else:
            raise FileNotFoundError(f"report: {given} is neither a results.json file nor a folder")
    if not found:
        raise ValueError(f"report: no {RESULTS_FILE} under {', '.join(map(str, paths))}")
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in path.parts]


def load_record(path: Path) -> dict:
    """A run's record; an unreadable (half-written) file becomes a record with status ``unreadable``."""
    try:
        record = json.loads(Path(path).read_text())
        if not isinstance(record, dict):
            raise ValueError("the file does not hold a JSON object")
    except (OSError, ValueError) as error:
        return {
            "config": {},
            "metrics": {},
            "status": "unreadable",
            "error": f"{type(error).__name__}: {error}",
        }
    return record


def per_seed_records(record: dict) -> list[dict]:
    """A complete ``num_seeds`` run becomes one record per seed (its config's ``seed`` set to that seed), so
    a run of N seeds is summarised like N runs; any other record is returned as it is."""
    if record.get("status") != "complete" or not isinstance(record.get("seeds"), list):
        return [record]
    return [
        {
            **record,
            "config": {**(record.get("config") or {}), SEED: entry.get(SEED)},
            "metrics": entry.get("metrics") or {},
            SEED: entry.get(SEED),
        }
        for entry in record["seeds"]
    ]


def hydra_choices(results_path: Path) -> dict[str, str]:
    """The config group options Hydra chose for a run (``defense: none``), from its ``.hydra/hydra.yaml``."""
    saved = Path(results_path).parent / ".hydra" / "hydra.yaml"
    if not saved.exists():
        return {}
    choices = (yaml.safe_load(saved.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {})
    # A group set to null (a preset that sweeps whole configs in its place) has no option to name.
    return {
        group: str(option)
        for group, option in (choices or {}).items()
        if "/" not in group and option is not None
    }


def flatten(config: dict, choices: dict[str, str] | None = None, prefix: str = "") -> dict:
    """Dotted keys to scalar values; a group's ``_target_`` becomes the group's own key, valued by the option
    Hydra chose (``defense: none``) or else the target's last name (``defense: rounding``)."""
    choices = choices or {}
    flat: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, choices, f"{name}."))
        elif key == "_target_" and prefix:
            group = prefix[:-1]
            flat[group] = choices.get(group, str(value).rsplit(".", 1)[-1])
        elif isinstance(value, list | dict):
            flat[name] = json.dumps(value, sort_keys=True)
        else:
            flat[name] = value
    return flat


def experimental(key: str) -> bool:
    return key != SEED and not any(key == kept or key.startswith(f"{kept}.") for kept in NOT_EXPERIMENTAL)


def varying_keys(configs: Sequence[dict]) -> tuple[str, ...]:
    """The experimental keys (seed excluded) whose values differ between the flattened configs, in order."""
    ordered = list(dict.fromkeys(key for config in configs for key in config))
    return tuple(
        key
        for key in ordered
        if experimental(key) and len({json.dumps(config.get(key), default=str) for config in configs}) > 1
    )


def _numeric(value) -> float:
    if isinstance(value, bool | int | float):
        return float(value)
    return math.nan


def _tidy(column: pd.Series) -> pd.Series:
    """Numbers stay numeric; anything else becomes text (Parquet needs one type per column)."""
    present = column.dropna()
    if len(present) and all(
        isinstance(value, int | float) and not isinstance(value, bool) for value in present
    ):
        return pd.to_numeric(column)
    return column.map(lambda value: None if _missing(value) else str(value)).astype(object)


def _last_line(text) -> str | None:
    lines = [line for line in str(text).strip().splitlines() if line.strip()] if text else []
    return lines[-1].strip() if lines else None


def sweep_root(paths: Iterable[str | Path]) -> Path:
    """The folder that holds every given sweep folder or results.json file (their common parent)."""
    folders = [(path if path.is_dir() else path.parent).resolve() for path in map(Path, paths)]
    return Path(os.path.commonpath(folders))


def gather(paths: Iterable[str | Path], relative_to: str | Path | None = None) -> Gathered:
    """Reads the runs under ``paths`` into one table: path, status, seed, cell and context columns, then
    metrics. With ``relative_to`` (a folder holding every path), the path column is relative to it."""
    paths = list(paths)
    found = [(path, record) for path in find_results(paths) for record in per_seed_records(load_record(path))]
    files, records = [path for path, _ in found], [record for _, record in found]
    configs = [
        flatten(record.get("config") or {}, hydra_choices(path))
        for record, path in zip(records, files, strict=True)
    ]
    cells = varying_keys([config for config in configs if config])
    metric_names = list(
        dict.fromkeys(
            name
            for record in records
            if record.get("status") == "complete"
            for name, value in (record.get("metrics") or {}).items()
            if isinstance(value, bool | int | float) or value is None
        )
    )
    config_columns = list(
        dict.fromkeys([*cells, *(key for key in CONTEXT if any(key in c for c in configs))])
    )
    rows = []
    for path, record, config in zip(files, records, configs, strict=True):
        metrics = record.get("metrics") or {}
        row = {
            "path": _shown_path(path, relative_to),
            "status": str(record.get("status", "unknown")),
            SEED: record.get(SEED, config.get(SEED)),
            "error": _last_line(record.get("error")),
        }
        row.update({key: config.get(key) for key in config_columns})
        row.update({name: _numeric(metrics.get(name)) for name in metric_names})
        rows.append(row)
    runs = pd.DataFrame(rows, columns=[*RUN_COLUMNS, *config_columns, *metric_names])
    for column in [SEED, *config_columns]:
        runs[column] = _tidy(runs[column])
    for column in ("path", "status", "error"):
        runs[column] = runs[column].astype(object)
    return Gathered(runs, cells, tuple(metric_names))


def _shown_path(path: Path, relative_to: str | Path | None) -> str:
    if relative_to is None:
        return str(path)
    return path.resolve().relative_to(Path(relative_to).resolve()).as_posix()


def complete_runs(gathered: Gathered) -> pd.DataFrame:
    return gathered.runs[gathered.runs["status"] == "complete"]


def failed_runs(gathered: Gathered) -> pd.DataFrame:
    """Runs that did not complete (failed, unreadable, interrupted): listed, never averaged."""
    failed = gathered.runs[gathered.runs["status"] != "complete"]
    return failed[["path", "status", *gathered.cells, SEED, "error"]].reset_index(drop=True)


def cell_statistics(runs: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Per group of ``keys``: ``runs`` (how many), and each metric's ``mean``, ``std`` (ddof=1) and ``n``
    (runs where it was measured), as columns ``<metric> mean`` and so on."""
    keys = list(keys)
    if runs.empty:
        return pd.DataFrame(columns=[*keys, "runs"])
    grouped = runs.groupby(keys, dropna=False, sort=True) if keys else runs.groupby(lambda _: "all")
    table = grouped.size().rename("runs").to_frame()
    for metric in metrics:
        values = grouped[metric]
        table[f"{metric} mean"] = values.mean()
        table[f"{metric} std"] = values.std(ddof=1)
        table[f"{metric} n"] = values.count()
    return table.reset_index(drop=not keys)


def summarize(gathered: Gathered, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each metric, one row per cell, complete runs only."""
    chosen = gathered.metrics if metrics is None else [m for m in metrics if m in gathered.metrics]
    return cell_statistics(complete_runs(gathered), gathered.cells, chosen)


def reported_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """The metrics a printed table shows: the headline ones, then detection, watermark and transfer ones."""
    extra = [
        name
        for name in metrics
        if name in DETECTION_METRICS or name.startswith((WATERMARK_PREFIX, TRANSFER_PREFIX))
    ]
    return tuple(name for name in (*HEADLINE_METRICS, *extra) if name in metrics)


def distinguishing_keys(table: pd.DataFrame, keys: Sequence[str]) -> tuple[str, ...]:
    """``keys`` less those the earlier kept keys already determine: ``api.budget`` once ``attack.budget`` is
    kept, or ``defense.decimals`` when only the rounding defense has decimals and it has one value."""
    kept: list[str] = []
    for key in keys:
        if not determined_by(table, kept, key):
            kept.append(key)
    return tuple(kept)


def determined_by(table: pd.DataFrame, keys: Sequence[str], key: str) -> bool:
    """Whether the values of ``keys`` fix the value of ``key`` in every row of ``table`` (missing counts)."""
    if not keys:
        return False
    as_text = table[[*keys, key]].astype(str)
    return bool((as_text.groupby(list(keys))[key].nunique() <= 1).all())


def cell_label(row: pd.Series, keys: Sequence[str]) -> str:
    parts = [f"{key}={_format_value(row[key])}" for key in keys if not _missing(row[key])]
    return ", ".join(parts) or "all runs"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _format_value(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def decimals_for(value: float) -> int:
    """Three decimals for rates and distortions, fewer for counts and seconds."""
    magnitude = abs(value)
    return 0 if magnitude >= 100 else 1 if magnitude >= 10 else 3


def mean_std(row: pd.Series, metric: str, plus_minus: str = "±") -> str:
    """``mean ± std`` at the mean's precision (std omitted for one run; ``[n=k]`` when only k of the cell's
    runs measured the metric)."""
    mean, std, count = row[f"{metric} mean"], row[f"{metric} std"], row[f"{metric} n"]
    if count == 0:
        return "-"
    decimals = decimals_for(mean)
    text = f"{mean:.{decimals}f}" if _missing(std) else f"{mean:.{decimals}f} {plus_minus} {std:.{decimals}f}"
    return text if count == row["runs"] else f"{text} [n={int(count)}]"


def table_rows(summary: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str], plus_minus: str) -> list:
    return [
        [
            cell_label(row, keys),
            str(int(row["runs"])),
            *(mean_std(row, metric, plus_minus) for metric in metrics),
        ]
        for _, row in summary.iterrows()
    ]


def markdown_table(summary: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> str:
    """A Markdown table: one row per cell, ``mean ± std`` over seeds for each metric."""
    header = ["cell", "runs", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary, keys, metrics, "±")]
    return "\n".join(lines) + "\n"


LATEX_SPECIAL = {c: f"\\{c}" for c in "&%$#_{}"} | {
    "~": r"\textasciitilde{}",
    "^": r"\^{}",
    "\\": r"\textbackslash{}",
}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(character, character) for character in text)


def latex_table(summary: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> str:
    """A LaTeX ``tabular`` (booktabs rules): one row per cell, ``mean $\\pm$ std`` over seeds."""
    header = ["cell", "runs", *metrics]
    lines = [
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(latex_escape(name) for name in header) + r" \\",
        r"\midrule",
    ]
    for row in table_rows(summary, keys, metrics, "PLUSMINUS"):
        lines.append(" & ".join(latex_escape(cell).replace("PLUSMINUS", r"$\pm$") for cell in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def series_keys(gathered: Gathered) -> tuple[str, ...]:
    """Cell keys that name one curve (every cell key but the budget and keys that repeat it)."""
    keys = [key for key in gathered.cells if key != BUDGET]
    runs = complete_runs(gathered)
    if BUDGET in runs:
        keys = [key for key in keys if not determined_by(runs, [BUDGET], key)]
    return distinguishing_keys(runs, keys)


def _series(gathered: Gathered, metrics: Sequence[str]):
    """(label, statistics sorted by budget) for each curve: one per cell once the budget is set aside."""
    runs = complete_runs(gathered)
    keys = series_keys(gathered)
    group_keys = [*keys, BUDGET] if BUDGET in runs else keys
    statistics = cell_statistics(runs, group_keys, metrics)
    if not keys:
        return [("all runs", statistics)]
    return [
        (cell_label(part.iloc[0], keys), part.sort_values(BUDGET) if BUDGET in part else part)
        for _, part in statistics.groupby(list(keys), dropna=False, sort=True)
    ]


def budget_figure(gathered: Gathered) -> Figure | None:
    """Fidelity (test) and surrogate accuracy against the query budget, one curve per defense (cell)."""
    metrics = [m for m in ("fidelity_test", "surrogate_accuracy") if m in gathered.metrics]
    if not metrics or BUDGET not in gathered.runs or complete_runs(gathered).empty:
        return None
    figure = Figure(figsize=(5.0 * len(metrics), 4.0), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for label, statistics in _series(gathered, metrics):
        for axis, metric in zip(axes, metrics, strict=True):
            axis.errorbar(
                statistics[BUDGET],
                statistics[f"{metric} mean"],
                yerr=statistics[f"{metric} std"].fillna(0.0),
                marker="o",
                capsize=3,
                label=label,
            )
    for axis, metric in zip(axes, metrics, strict=True):
        axis.set(xlabel="query budget", ylabel=metric, title=f"{metric} vs query budget")
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize="small")
    return figure


def tradeoff_figure(gathered: Gathered) -> Figure | None:
    """The defender's utility (served accuracy, mean L1 distortion) against the attacker's fidelity; each
    point is annotated with its query budget."""
    utility = [m for m in ("served_accuracy", "mean_l1_distortion") if m in gathered.metrics]
    if "fidelity_test" not in gathered.metrics or not utility or complete_runs(gathered).empty:
        return None
    figure = Figure(figsize=(5.0 * len(utility), 4.0), layout="constrained")
    axes = figure.subplots(1, len(utility), squeeze=False)[0]
    for label, statistics in _series(gathered, ["fidelity_test", *utility]):
        for axis, metric in zip(axes, utility, strict=True):
            axis.errorbar(
                statistics["fidelity_test mean"],
                statistics[f"{metric} mean"],
                xerr=statistics["fidelity_test std"].fillna(0.0),
                yerr=statistics[f"{metric} std"].fillna(0.0),
                marker="o",
                capsize=3,
                label=label,
            )
            if BUDGET in statistics:
                for _, point in statistics.iterrows():
                    budget = _format_value(point[BUDGET])
                    xy = (point["fidelity_test mean"], point[f"{metric} mean"])
                    axis.annotate(budget, xy, textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    for axis, metric in zip(axes, utility, strict=True):
        axis.set(xlabel="attacker fidelity_test", ylabel=f"defender {metric}", title=f"{metric} vs fidelity")
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize="small")
    return figure


def bars_figure(gathered: Gathered, metrics: Sequence[str], title: str) -> Figure | None:
    """One bar per cell (mean, std as error bar) for each of ``metrics`` the sweep measured."""
    present = [m for m in metrics if m in gathered.metrics and complete_runs(gathered)[m].notna().any()]
    if not present:
        return None
    keys = distinguishing_keys(complete_runs(gathered), gathered.cells)
    statistics = cell_statistics(complete_runs(gathered), gathered.cells, present)
    labels = [cell_label(row, keys) for _, row in statistics.iterrows()]
    figure = Figure(figsize=(max(4.0, 1.0 + 0.8 * len(labels)) * len(present), 4.0), layout="constrained")
    axes = figure.subplots(1, len(present), squeeze=False)[0]
    positions = np.arange(len(labels))
    for axis, metric in zip(axes, present, strict=True):
        axis.bar(
            positions, statistics[f"{metric} mean"], yerr=statistics[f"{metric} std"].fillna(0.0), capsize=3
        )
        axis.set_xticks(positions, labels, rotation=30, ha="right", fontsize="small")
        axis.set(ylabel=metric, title=metric)
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle(title)
    return figure


def figures(gathered: Gathered) -> dict[str, Figure]:
    """Every figure the sweep's metrics allow, by file stem."""
    with_prefix = lambda prefix: [m for m in gathered.metrics if m.startswith(prefix)]
    candidates = {
        "budget": budget_figure(gathered),
        "tradeoff": tradeoff_figure(gathered),
        "detection": bars_figure(gathered, DETECTION_METRICS, "detection"),
        "watermark": bars_figure(gathered, with_prefix(WATERMARK_PREFIX), "watermark"),
        "transfer": bars_figure(gathered, with_prefix(TRANSFER_PREFIX), "transfer of adversarial examples"),
    }
    return {name: figure for name, figure in candidates.items() if figure is not None}


class Report(NamedTuple):
    """What ``write_report`` wrote; run paths in its tables are relative to ``root``."""

    gathered: Gathered
    summary: pd.DataFrame
    failed: pd.DataFrame
    markdown: str
    files: tuple[Path, ...]
    root: Path


def report_markdown(gathered: Gathered, summary: pd.DataFrame, failed: pd.DataFrame) -> str:
    keys = distinguishing_keys(complete_runs(gathered), gathered.cells)
    shown = reported_metrics(gathered.metrics)
    complete = len(gathered.runs) - len(failed)
    text = [
        f"{len(gathered.runs)} runs: {complete} complete, {len(failed)} not complete. "
        f"Cells vary {', '.join(gathered.cells) or 'nothing'}; mean ± std (ddof=1) over seeds.\n",
        markdown_table(summary, keys, shown) if complete else "No complete runs.\n",
    ]
    if len(failed):
        text.append("\nNot complete (listed, not averaged):\n")
        text += [
            f"- {row.path}: {row.status}: {row.error or 'no error recorded'}\n" for row in failed.itertuples()
        ]
    return "".join(text)


def write_report(paths: Iterable[str | Path], out: str | Path) -> Report:
    """Gathers ``paths`` and writes runs (CSV, Parquet), the summary (CSV, Markdown, LaTeX) and the figures
    (PNG, PDF) into ``out``. Run paths are written relative to the sweep folder (the given folders' common
    parent), so the files say nothing about the machine that made them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = list(paths)
    root = sweep_root(paths)
    gathered = gather(paths, relative_to=root)
    summary = summarize(gathered)
    failed = failed_runs(gathered)
    markdown = report_markdown(gathered, summary, failed)
    keys = distinguishing_keys(complete_runs(gathered), gathered.cells)
    shown = reported_metrics(gathered.metrics)
    files = [out / name for name in ("runs.csv", "runs.parquet", "summary.csv", "summary.md", "summary.tex")]
    gathered.runs.to_csv(files[0], index=False)
    gathered.runs.to_parquet(files[1], index=False)
    summary.to_csv(files[2], index=False)
    files[3].write_text(markdown)
    files[4].write_text(latex_table(summary, keys, shown))
    if len(failed):
        files.append(out / "failed.csv")
        failed.to_csv(files[-1], index=False)
    for name, figure in figures(gathered).items():
        for suffix in ("png", "pdf"):
            files.append(out / f"{name}.{suffix}")
            figure.savefig(files[-1], dpi=120)
    return Report(gathered, summary, failed, markdown, tuple(files), root)
