"""The field's published results as presets: run them, regenerate BENCHMARKS.md, and check it still holds.

Each ``configs/experiment/<name>.yaml`` preset holds only its deltas, its sweep (``hydra.sweeper.params``)
and a ``benchmark`` block: the title, the paper's claim, the result expected at digits scale and the metrics
to show. A block with ``scale: paper`` (and the ``hardware`` and ``data`` it needs) marks a preset at the
paper's own scale: it runs, and ``--check`` reruns it, only when named.
``run_preset`` launches the sweep (resumable: finished runs are skipped); ``measure_preset`` turns one
preset's results into its section of BENCHMARKS.md (every number from results.json files) and its
machine-readable entry of ``benchmarks/published.json``. Each section starts with a ``<!-- preset: name -->``
marker, so ``update_document`` rewrites the chosen presets' sections and keeps every other one byte for byte.
``moved_metrics`` compares a rerun with the published means: a mean may move by its standard deviation over
seeds, never less than ``SPREAD_FLOOR`` or ``SPREAD_FLOOR_RELATIVE`` of the mean (the floor for a zero or
unknown spread: one seed, or a deterministic metric). Means are compared only between machines with the same
floating-point behaviour (``heistlab.numerics``): each sweep folder records the machines it ran on, each
published entry names its machine, and a rerun elsewhere is checked for its shape (groups, run counts,
metrics) while its means are listed, not judged.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import yaml

from heistlab import numerics, report

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "configs" / "experiment"


class Preset(NamedTuple):
    name: str
    title: str
    claim: str
    expected: str
    metrics: tuple[str, ...] | None
    command: str
    runtime: str
    note: str = ""
    paper_scale: bool = False
    hardware: str = ""
    data: str = ""


def header_line(text: str, label: str) -> str:
    for line in text.splitlines():
        if line.startswith(f"# {label}:"):
            return line.split(":", 1)[1].strip()
    return ""


def load_preset(path: Path) -> Preset:
    text = path.read_text()
    spec = (yaml.safe_load(text) or {}).get("benchmark")
    if not spec:
        raise ValueError(f"{path}: a preset needs a `benchmark` block (title, claim, expected, metrics)")
    metrics = spec.get("metrics")
    scale = spec.get("scale", "digits")
    if scale not in SCALES:
        raise ValueError(f"{path}: benchmark.scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "paper" and not (spec.get("hardware") and spec.get("data")):
        raise ValueError(f"{path}: a paper-scale preset names the `hardware` and `data` it needs")
    return Preset(
        name=path.stem,
        title=spec["title"],
        claim=spec["claim"],
        expected=spec["expected"],
        metrics=tuple(metrics) if metrics else None,
        command=header_line(text, "Command"),
        runtime=header_line(text, "Runtime"),
        note=spec.get("note", ""),
        paper_scale=scale == "paper",
        hardware=spec.get("hardware", ""),
        data=spec.get("data", ""),
    )


SCALES = ("digits", "paper")


def presets(names: list[str] | None = None) -> list[Preset]:
    found = {path.stem: path for path in sorted(PRESETS.glob("*.yaml"))}
    unknown = sorted(set(names or ()) - set(found))
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; accepted: {', '.join(found)}")
    return [load_preset(found[name]) for name in (names or found)]


def chosen_presets(names: list[str]) -> list[Preset]:
    """The named presets; with no names, every preset but the paper-scale ones (those run only when named)."""
    if names:
        return presets(names)
    return [preset for preset in presets() if not preset.paper_scale]


def run_preset(preset: Preset, runs_dir: Path, jobs: int) -> float:
    """Runs the preset's sweep into ``runs_dir/<name>`` (skipping finished runs); returns wall seconds."""
    launcher = ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={jobs}"] if jobs > 1 else []
    command = [
        sys.executable, "-m", "experiments.run", "-m", f"experiment={preset.name}",
        f"hydra.sweep.dir={runs_dir / preset.name}", *launcher,
    ]  # fmt: skip
    environment = {
        "HEISTLAB_DAWN_KEY": "heistlab-benchmarks-dawn-key",
        "HEISTLAB_EDM_KEY": "heistlab-benchmarks-edm-key",
        **os.environ,
    }
    record_machine(sweep_folder(preset, runs_dir), numerics.machine())
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=environment, check=True)
    return time.perf_counter() - started


MACHINES_FILE = "machines.json"


def record_machine(folder: Path, machine: dict) -> None:
    """Adds ``machine`` to the machines a sweep folder's runs were made on (once each)."""
    known = sweep_machines(folder)
    if machine not in known:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MACHINES_FILE).write_text(json.dumps([*known, machine], indent=1) + "\n")


def sweep_machines(folder: Path) -> list[dict]:
    path = folder / MACHINES_FILE
    return json.loads(path.read_text()) if path.exists() else []


def published_machine(folder: Path) -> dict:
    """The ``machine`` part of a published entry: the one machine the sweep ran on; nothing when it is not
    recorded (sweeps run before machines were) or when its runs were made on several machines."""
    machines = sweep_machines(folder)
    return {"machine": machines[0]} if len(machines) == 1 else {}


MARKER = "<!-- preset: {name} -->"
MARKER_PATTERN = re.compile(r"^<!-- preset: (\S+) -->$", re.MULTILINE)
INTRO = (
    "# Benchmarks: the field's published results at digits scale\n\n"
    "Generated by `python -m experiments.benchmarks` from the presets in `configs/experiment/`;\n"
    "every number below comes from the presets' results.json files, never typed by hand.\n"
    "The victim is an MLP on scikit-learn's digits unless a preset says otherwise: the papers'\n"
    "own scales (ImageNet, CIFAR, cloud APIs) are not reproduced, only the qualitative result, except in\n"
    "sections marked **Paper scale** (CIFAR-10, ResNets): those need the hardware and download they name\n"
    "and run only when named.\n"
    "Where a measured result differs from the expectation, a note under its table says so.\n"
    "`python -m experiments.benchmarks <preset>` regenerates one section and leaves the others as they are;\n"
    "the published means are also in `benchmarks/published.json`, which\n"
    "`python -m experiments.benchmarks --check` compares with a fresh rerun of the quick presets on a\n"
    "machine with the same numerics (each section names the machine it was measured on).\n\n"
)
# A published mean may move by its std over seeds, never less than this floor, which is what a zero or
# unknown spread (one seed, or a deterministic metric) allows: under 2 of the 359 digits test inputs for a
# rate, or 0.1% of a large mean (counts, seconds).
SPREAD_FLOOR = 0.005
SPREAD_FLOOR_RELATIVE = 0.001
# One metric's statistics on one line of published.json, so that a regenerated file's diff reads cell by cell.
STATISTICS_PATTERN = re.compile(r'\{\n\s*"mean": ([^\n]+),\n\s*"std": ([^\n]+),\n\s*"n": (\d+)\n\s*\}')


class Measured(NamedTuple):
    """One preset's BENCHMARKS.md section and its entry of published.json (None when it has no results)."""

    section: str
    published: dict | None


def sweep_folder(preset: Preset, runs_dir: Path) -> Path:
    return runs_dir / preset.name


def has_results(preset: Preset, runs_dir: Path) -> bool:
    folder = sweep_folder(preset, runs_dir)
    return folder.is_dir() and any(folder.rglob(report.RESULTS_FILE))


def shown_metrics(preset: Preset, gathered: report.Gathered) -> list[str]:
    chosen = preset.metrics or report.reported_metrics(gathered.metrics)
    return [metric for metric in chosen if metric in gathered.metrics]


def _plain(value):
    """A JSON-ready scalar: NumPy scalars unwrapped, whole floats as ints, NaN as None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return int(value)
    return value


def published_groups(gathered: report.Gathered, metrics: list[str]) -> list[dict]:
    """Per cell: its config values, its label, how many complete runs, each metric's mean, std and n."""
    summary = report.summarize(gathered, metrics)
    keys = report.distinguishing_keys(report.complete_runs(gathered), gathered.cells)
    groups = []
    for _, row in summary.iterrows():
        cell = {key: _plain(row[key]) for key in gathered.cells if _plain(row[key]) is not None}
        statistics = {
            metric: {
                "mean": _plain(float(row[f"{metric} mean"])),
                "std": _plain(float(row[f"{metric} std"])),
                "n": int(row[f"{metric} n"]),
            }
            for metric in metrics
        }
        groups.append(
            {
                "cell": cell,
                "label": report.cell_label(row, keys),
                "runs": int(row["runs"]),
                "metrics": statistics,
            }
        )
    return groups


def run_seconds(gathered: report.Gathered) -> float | None:
    """The runs' own wall seconds summed (start-up of the command not included)."""
    if "wall_seconds" not in gathered.runs:
        return None
    per_run = gathered.runs.drop_duplicates("path")["wall_seconds"].dropna()
    return round(float(per_run.sum()), 1) if len(per_run) else None


def rerun_entry(preset: Preset, folder: Path) -> dict:
    """The published.json entry a finished sweep folder gives, without writing figures."""
    gathered = report.gather([folder])
    return {"groups": published_groups(gathered, shown_metrics(preset, gathered))}


def measure_preset(preset: Preset, runs_dir: Path, figures_dir: Path, document_dir: Path = REPO) -> Measured:
    """One preset's part of BENCHMARKS.md (claim, expectation, command, measured table, figures) and its
    published means. Writes the preset's figures and tables to ``figures_dir/<name>``; figure links are
    relative to ``document_dir``, where the Markdown file lives."""
    if not has_results(preset, runs_dir):
        return Measured(not_run_section(preset), None)
    folder = sweep_folder(preset, runs_dir)
    lines = header_lines(preset)
    written = report.write_report([folder], figures_dir / preset.name)
    gathered = written.gathered
    shown = shown_metrics(preset, gathered)
    keys = report.distinguishing_keys(report.complete_runs(gathered), gathered.cells)
    complete = len(report.complete_runs(gathered))
    machine = published_machine(folder)
    where = f" on {numerics.describe(machine['machine'])}" if machine else ""
    lines.append(
        f"**Measured**{where} ({complete} complete runs of {len(gathered.runs)}; mean ± std over seeds):\n"
    )
    lines.append(report.markdown_table(report.summarize(gathered, shown), keys, shown))
    if preset.note:
        lines.append(f"**Note.** {preset.note}\n")
    for failed in written.failed.itertuples():
        lines.append(f"- not complete: {preset.name}/{failed.path}: {failed.error or failed.status}\n")
    pictures = sorted(path for path in written.files if path.suffix == ".png")
    links = [Path(os.path.relpath(path, document_dir)).as_posix() for path in pictures]
    lines += [f"![{path.stem}]({link})\n" for path, link in zip(pictures, links, strict=True)]
    entry = {"run_seconds": run_seconds(gathered), **machine, "groups": published_groups(gathered, shown)}
    return Measured(section(lines), entry)


def header_lines(preset: Preset) -> list[str]:
    scale = "paper scale" if preset.paper_scale else "digits scale"
    lines = [
        MARKER.format(name=preset.name) + "\n",
        f"## {preset.title}\n",
        f"Preset `{preset.name}`: `{preset.command}`. Runtime: {preset.runtime}\n",
    ]
    if preset.paper_scale:
        lines.append(
            f"**Paper scale.** Needs {preset.hardware}; data: {preset.data}. Runs only when named: "
            f"`python -m experiments.benchmarks {preset.name}`.\n"
        )
    return [*lines, f"**Paper's claim.** {preset.claim}\n", f"**Expected at {scale}.** {preset.expected}\n"]


def not_run_section(preset: Preset) -> str:
    if preset.paper_scale:
        measured = "**Measured.** Not run yet: it needs the hardware and data above; nothing is estimated.\n"
    else:
        measured = "**Measured.** Not run yet: run the command above.\n"
    return section([*header_lines(preset), measured])


def preset_section(preset: Preset, runs_dir: Path, figures_dir: Path, document_dir: Path = REPO) -> str:
    return measure_preset(preset, runs_dir, figures_dir, document_dir).section


def section(lines: list[str]) -> str:
    """A section ends with one blank line, so kept and regenerated sections join the same way."""
    return "\n".join(lines).rstrip("\n") + "\n\n"


def split_sections(document: str) -> dict[str, str]:
    """The generated document's sections by preset name, each from its marker to the next one."""
    starts = list(MARKER_PATTERN.finditer(document))
    ends = [match.start() for match in starts[1:]] + [len(document)] if starts else []
    return {match.group(1): document[match.start() : end] for match, end in zip(starts, ends, strict=True)}


def assemble(everything: list[Preset], sections: dict[str, str]) -> str:
    """The document: the introduction, then one section per preset in order (a preset with no section yet
    gets its "Not run yet" one)."""
    parts = [INTRO]
    for preset in everything:
        parts.append(sections.get(preset.name) or not_run_section(preset))
    return "".join(parts)


def benchmarks_markdown(chosen: list[Preset], runs_dir: Path, figures_dir: Path, document_dir: Path) -> str:
    """The whole document regenerated from ``runs_dir`` (every preset's figures rewritten)."""
    sections = {
        preset.name: measure_preset(preset, runs_dir, figures_dir, document_dir).section for preset in chosen
    }
    return assemble(chosen, sections)


def kept_sections(document_path: Path, everything: list[Preset], chosen: list[Preset]) -> dict[str, str]:
    """The existing sections of the presets not chosen, to keep byte for byte; refuses a document written
    before sections had markers (regenerating part of it would drop the rest)."""
    if not document_path.exists():
        return {}
    existing = split_sections(document_path.read_text())
    names = {preset.name for preset in chosen}
    # A paper-scale preset not run yet has no section to lose: it gets its "Not run yet" one.
    others = [preset.name for preset in everything if preset.name not in names and not preset.paper_scale]
    if others and not existing:
        raise ValueError(
            f"{document_path} has no `<!-- preset: name -->` section markers, so regenerating "
            f"{', '.join(sorted(names))} alone would drop the other sections; regenerate it whole once: "
            "python -m experiments.benchmarks (or --report-only over every preset's runs)"
        )
    return {name: text for name, text in existing.items() if name not in names}


def load_published(path: Path) -> dict:
    if not path.exists():
        return {"spread_floor": SPREAD_FLOOR, "spread_floor_relative": SPREAD_FLOOR_RELATIVE, "presets": {}}
    return json.loads(path.read_text())


def write_published(path: Path, published: dict) -> None:
    ordered = {name: published["presets"][name] for name in sorted(published["presets"])}
    document = {
        "spread_floor": SPREAD_FLOOR,
        "spread_floor_relative": SPREAD_FLOOR_RELATIVE,
        "presets": ordered,
    }
    text = STATISTICS_PATTERN.sub(r'{"mean": \1, "std": \2, "n": \3}', json.dumps(document, indent=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def allowed_spread(statistics: dict) -> float:
    """How far a rerun's mean may move: the std over seeds, at least the floor (zero or unknown spread)."""
    std = statistics.get("std") or 0.0
    return max(std, SPREAD_FLOOR, SPREAD_FLOOR_RELATIVE * abs(statistics.get("mean") or 0.0))


def _cell_key(cell: dict) -> str:
    return json.dumps(cell, sort_keys=True)


def comparable_means(published: dict, machine: dict) -> bool:
    """Whether a rerun on ``machine`` can be held to a published entry's means: the entry was made on a
    machine with the same numerics digest, or (published before machines were recorded) does not say."""
    made_on = published.get("machine", {}).get("numerics")
    return made_on is None or made_on == machine.get("numerics")


def moved_metrics(name: str, published: dict, rerun: dict, compare_means: bool = True) -> list[str]:
    """One line per difference between a preset's published entry and a rerun's: a mean that moved by more
    than its allowed spread (when ``compare_means``), a group or metric missing from the rerun or new in it,
    a changed run count."""
    problems = []
    fresh = {_cell_key(group["cell"]): group for group in rerun["groups"]}
    for group in published["groups"]:
        label = group["label"]
        again = fresh.pop(_cell_key(group["cell"]), None)
        if again is None:
            problems.append(f"{name}: group {label}: published, missing from the rerun")
            continue
        if again["runs"] != group["runs"]:
            problems.append(
                f"{name}: group {label}: {group['runs']} complete runs published, {again['runs']} now"
            )
        for metric, statistics in group["metrics"].items():
            now = again["metrics"].get(metric, {}).get("mean")
            before = statistics["mean"]
            if before is None and now is None:
                continue
            allowed = allowed_spread(statistics)
            if before is None or now is None or (compare_means and abs(now - before) > allowed):
                problems.append(
                    f"{name}: group {label}: {metric} moved: published mean {_shown(before)}, "
                    f"new mean {_shown(now)}, allowed spread {allowed:.4g}"
                )
    problems += [f"{name}: group {group['label']}: in the rerun, not published" for group in fresh.values()]
    return problems


def _shown(value) -> str:
    return "missing" if value is None else f"{value:.4g}"


def recorded_seconds(entry: dict) -> float | None:
    """How long the preset took when it was published: the tool's timed command, else its runs summed."""
    return entry.get("command_seconds") or entry.get("run_seconds")
