"""Progress on long work: a live spinner on a terminal, one log line per phase elsewhere (quiet under CI)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator

log = logging.getLogger("heistlab")


def interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true")


@contextlib.contextmanager
def phase(description: str) -> Iterator[None]:
    """Shows ``description`` while the block runs and logs how long it took."""
    started = time.perf_counter()
    if interactive():
        from rich.console import Console

        with Console(stderr=True).status(description):
            yield
    else:
        yield
    log.info("%s: %.1f s", description, time.perf_counter() - started)
