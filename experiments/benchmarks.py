"""Reruns the paper presets and regenerates BENCHMARKS.md and its plots.

    python -m experiments.benchmarks                 # every preset, 2 parallel jobs, then BENCHMARKS.md
    python -m experiments.benchmarks tramer2016 --jobs 1
    python -m experiments.benchmarks --report-only   # regenerate BENCHMARKS.md from existing results

Runs go to benchmarks/runs/<preset>/ (resumable: finished runs are skipped); figures to benchmarks/figures/.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from heistlab import benchmarks

log = logging.getLogger("heistlab.benchmarks")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("presets", nargs="*", help="preset names (default: all in configs/experiment/)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs per sweep (joblib)")
    parser.add_argument("--runs", type=Path, default=benchmarks.REPO / "benchmarks" / "runs")
    parser.add_argument("--figures", type=Path, default=benchmarks.REPO / "benchmarks" / "figures")
    parser.add_argument("--out", type=Path, default=benchmarks.REPO / "BENCHMARKS.md")
    parser.add_argument("--report-only", action="store_true", help="do not run; only regenerate the document")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    chosen = benchmarks.presets(arguments.presets or None)
    if not arguments.report_only:
        for preset in chosen:
            seconds = benchmarks.run_preset(preset, arguments.runs, arguments.jobs)
            log.info("preset %s: %.0f s", preset.name, seconds)
    everything = benchmarks.presets()
    document = benchmarks.benchmarks_markdown(
        everything, arguments.runs, arguments.figures, arguments.out.resolve().parent
    )
    arguments.out.write_text(document)
    log.info("wrote %s", arguments.out)


if __name__ == "__main__":
    main()
