"""Hydra entry points: ``python -m experiments.run`` (one experiment or a ``-m`` sweep)."""
