"""One JSON record per run, written atomically, plus the versions of what produced it."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path

from heistlab.victims import atomic_write_bytes

RESULTS_FILE = "results.json"
TRACKED_PACKAGES = ("heistlab", "jax", "jaxlib", "flax", "optax", "numpy", "hydra-core", "scikit-learn")


def versions() -> dict[str, str]:
    """Python, platform and the versions of the packages a result depends on."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in TRACKED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def write_results(folder: Path, record: dict) -> Path:
    """Writes ``record`` to ``folder/results.json`` atomically: a crash never leaves half a file."""
    path = Path(folder) / RESULTS_FILE
    atomic_write_bytes(path, (json.dumps(record, indent=2, default=_jsonable) + "\n").encode())
    return path


def read_results(folder: Path) -> dict:
    return json.loads((Path(folder) / RESULTS_FILE).read_text())


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
