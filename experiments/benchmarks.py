"""Reruns the paper presets, regenerates BENCHMARKS.md and its plots, checks that published means hold.

    python -m experiments.benchmarks                 # every preset but paper-scale ones, then BENCHMARKS.md
    python -m experiments.benchmarks tramer2016 --jobs 1   # that preset's section alone; the others kept
    python -m experiments.benchmarks --report-only   # regenerate BENCHMARKS.md from existing results
    python -m experiments.benchmarks --check         # rerun the quick presets, compare with published.json

Runs go to benchmarks/runs/<preset>/ (resumable: finished runs are skipped); figures to benchmarks/figures/;
the published means, with how long each preset took, to benchmarks/published.json.
--check reruns, into a temporary folder, every preset that took under --under seconds when it was published,
and exits with status 1 after one line per published mean that moved by more than its spread over seeds.
Means are held to only on a machine with the numerics of the one that published them (heistlab.numerics: the
digest of a small training run); elsewhere a rerun is a fresh draw, so --check then checks each preset's shape
(it runs, with the same groups, run counts and metrics) and lists its means beside the published ones.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from heistlab import benchmarks, numerics

log = logging.getLogger("heistlab.benchmarks")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "presets",
        nargs="*",
        help="preset names (default: all in configs/experiment/ but the paper-scale ones, run when named)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs per sweep (joblib)")
    parser.add_argument("--runs", type=Path, default=benchmarks.REPO / "benchmarks" / "runs")
    parser.add_argument("--figures", type=Path, default=benchmarks.REPO / "benchmarks" / "figures")
    parser.add_argument("--out", type=Path, default=benchmarks.REPO / "BENCHMARKS.md")
    parser.add_argument("--published", type=Path, default=benchmarks.REPO / "benchmarks" / "published.json")
    parser.add_argument("--report-only", action="store_true", help="do not run; only regenerate the document")
    parser.add_argument(
        "--check", action="store_true", help="rerun the quick presets and compare with the published means"
    )
    parser.add_argument(
        "--under",
        type=float,
        default=60.0,
        help="--check reruns the presets that took fewer seconds than this when published (default 60)",
    )
    arguments = parser.parse_args(argv)
    if arguments.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {arguments.jobs}")
    if arguments.check and arguments.report_only:
        parser.error("--check reruns presets; it cannot be combined with --report-only")
    return arguments


def regenerate(arguments: argparse.Namespace) -> None:
    """Runs the chosen presets (unless --report-only), then rewrites their sections, figures and published
    entries; every other preset's section, figures and entry are kept as they are."""
    everything = benchmarks.presets()
    chosen = benchmarks.chosen_presets(arguments.presets)
    kept = benchmarks.kept_sections(arguments.out, everything, chosen)
    if arguments.report_only:
        missing = [preset.name for preset in chosen if not benchmarks.has_results(preset, arguments.runs)]
        if missing:
            raise SystemExit(
                f"--report-only: no results for {', '.join(missing)} under {arguments.runs}; "
                "run them first (drop --report-only) or name only the presets that have results"
            )
    published = benchmarks.load_published(arguments.published)
    seconds = {}  # sweeps timed from scratch; a resumed sweep's time says nothing of the preset's
    if not arguments.report_only:
        for preset in chosen:
            resumed = benchmarks.has_results(preset, arguments.runs)
            took = benchmarks.run_preset(preset, arguments.runs, arguments.jobs)
            log.info("preset %s: %.0f s%s", preset.name, took, " (resumed)" if resumed else "")
            if not resumed:
                seconds[preset.name] = took
    document_dir = arguments.out.resolve().parent
    sections = dict(kept)
    for preset in chosen:
        measured = benchmarks.measure_preset(preset, arguments.runs, arguments.figures, document_dir)
        sections[preset.name] = measured.section
        if measured.published is None:
            continue
        published["presets"][preset.name] = {
            **timing(preset.name, seconds, arguments.jobs, published),
            **measured.published,
        }
    arguments.out.write_text(benchmarks.assemble(everything, sections))
    benchmarks.write_published(arguments.published, published)
    log.info("wrote %s and %s", arguments.out, arguments.published)


def timing(name: str, seconds: dict[str, float], jobs: int, published: dict) -> dict:
    """How long the preset's sweep took now from scratch, or else when it last did."""
    if name in seconds:
        return {"command_seconds": round(seconds[name], 1), "jobs": jobs}
    previous = published["presets"].get(name, {})
    return {key: previous[key] for key in ("command_seconds", "jobs") if key in previous}


def check(arguments: argparse.Namespace) -> int:
    """Reruns the quick presets into a temporary folder; returns 1 when a published mean moved."""
    if not arguments.published.exists():
        log.error(
            "%s does not exist: regenerate the benchmarks first (python -m experiments.benchmarks)",
            arguments.published,
        )
        return 1
    published = benchmarks.load_published(arguments.published)["presets"]
    chosen = benchmarks.chosen_presets(arguments.presets)
    problems: list[str] = []
    machine = numerics.machine()
    log.info("this machine: %s", numerics.describe(machine))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="heistlab-check-") as runs:
        for preset in chosen:
            entry = published.get(preset.name)
            if entry is None:
                problems.append(f"{preset.name}: not in {arguments.published}; regenerate the benchmarks")
                continue
            recorded = benchmarks.recorded_seconds(entry)
            if recorded is None or recorded >= arguments.under:
                log.info(
                    "skip %s: took %s s when published (--under %g)", preset.name, recorded, arguments.under
                )
                continue
            log.info("rerun %s (took %.0f s when published)", preset.name, recorded)
            try:
                benchmarks.run_preset(preset, Path(runs), arguments.jobs)
            except subprocess.CalledProcessError as error:
                problems.append(f"{preset.name}: the rerun failed (exit status {error.returncode})")
                continue
            rerun = benchmarks.rerun_entry(preset, benchmarks.sweep_folder(preset, Path(runs)))
            compare_means = benchmarks.comparable_means(entry, machine)
            if not compare_means:
                log.info(
                    "%s: published on another machine's numerics (%s): its shape is checked, its means are "
                    "listed, not judged:\n%s",
                    preset.name,
                    numerics.describe(entry["machine"]),
                    "\n".join(benchmarks.moved_metrics(preset.name, entry, rerun)) or "  every mean held",
                )
            problems += benchmarks.moved_metrics(preset.name, entry, rerun, compare_means)
    for problem in problems:
        print(problem, file=sys.stderr)
    elapsed = time.perf_counter() - started
    verdict = f"{len(problems)} published result(s) did not hold" if problems else "every published mean held"
    log.info("check: %s (%.0f s)", verdict, elapsed)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)  # its INFO lines name every backend it did not find
    try:
        if arguments.check:
            raise SystemExit(check(arguments))
        regenerate(arguments)
    except ValueError as error:
        raise SystemExit(f"benchmarks: {error}") from None


if __name__ == "__main__":
    main()
