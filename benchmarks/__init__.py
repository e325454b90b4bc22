"""heistlab's performance benchmarks (pytest-benchmark), kept out of the default test run.

    python -m pytest benchmarks --benchmark-json benchmarks/results.json   # about 10 minutes on 2 cores
    python -m benchmarks.report --readme README.md                          # the table in README.md

Peer comparisons (IBM ART, PyTorch) run when the ``peers`` extra is installed and are skipped otherwise.
"""
