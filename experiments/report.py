"""Gathers sweeps' and runs' ``results.json`` files into tables and plots.

    python -m experiments.report multirun/2026-11-29/06-38-03
    python -m experiments.report multirun/2026-11-29/06-38-03 outputs/2026-11-30 --out reports/rounding

Writes runs.csv/.parquet, summary.csv/.md/.tex and the figures (PNG and PDF) to ``--out`` (default: a
``report`` folder inside the first folder given) and prints the Markdown summary: mean ± std over seeds per
cell, failed runs listed apart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from heistlab.report import write_report


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep or run folders, or results.json files")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <first folder>/report)"
    )
    return parser.parse_args(argv)


def default_out(paths: list[Path]) -> Path:
    first = paths[0]
    return (first if first.is_dir() else first.parent) / "report"


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    report = write_report(arguments.paths, arguments.out or default_out(arguments.paths))
    print(report.markdown)
    print("wrote", ", ".join(str(path) for path in report.files))


if __name__ == "__main__":
    main()
