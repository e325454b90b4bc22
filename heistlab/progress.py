"""Progress on long work: live Rich bars on a terminal (queries served of the budget, epochs, each phase
with its elapsed time and an ETA where the total is known), one log line per phase everywhere.

The bars are shown when stderr is a terminal and ``CI`` is not set to true; ``HEISTLAB_PROGRESS=1`` forces
them on (``0`` off). A phase's time is taken after the device has finished its work (``ready``), so JAX's
asynchronous dispatch cannot bill one phase's computation to the next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("heistlab")

FORCE_VARIABLE = "HEISTLAB_PROGRESS"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def forced() -> bool | None:
    value = os.environ.get(FORCE_VARIABLE, "").strip().lower()
    return True if value in _TRUE else False if value in _FALSE else None


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def interactive() -> bool:
    """Whether live progress is shown: forced by ``HEISTLAB_PROGRESS``, else on a terminal outside CI."""
    choice = forced()
    if choice is not None:
        return choice
    return stderr_is_terminal() and os.environ.get("CI", "").strip().lower() not in _TRUE


class _Display:
    """The one live Rich display all running phases and counters share (Rich allows one at a time)."""

    progress: Any = None
    users: int = 0

    @classmethod
    @contextlib.contextmanager
    def task(cls, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        if not interactive():
            yield lambda count: None
            return
        if cls.progress is None:
            cls.progress = _new_progress()
            cls.progress.start()
        cls.users += 1
        progress = cls.progress
        task = progress.add_task(description, total=total, phase=total is None)
        open_ = [True]

        def advance(count: int) -> None:
            if open_[0]:
                progress.advance(task, count)

        try:
            yield advance
        finally:
            open_[0] = False
            if total is None:
                progress.update(task, total=1, completed=1)
            progress.stop_task(task)
            cls.users -= 1
            if cls.users == 0:
                progress.stop()
                cls.progress = None


def _new_progress():
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        ProgressColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class CountColumn(ProgressColumn):
        """``done/total`` for counted work; nothing for a phase without a total."""

        def render(self, task) -> Text:
            if task.fields.get("phase"):
                return Text("")
            return Text(f"{int(task.completed)}/{int(task.total)}", style="progress.download")

    class RemainingColumn(TimeRemainingColumn):
        def render(self, task) -> Text:
            return Text("") if task.fields.get("phase") else Text("ETA ") + super().render(task)

    console = Console(stderr=True, force_terminal=True if forced() else None)
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        CountColumn(),
        TimeElapsedColumn(),
        RemainingColumn(),
        console=console,
    )


def block_until_ready(tree: Any) -> Any:
    """Waits for every JAX array in ``tree`` to be computed; returns ``tree``."""
    import jax

    return jax.block_until_ready(tree)


@contextlib.contextmanager
def phase(description: str) -> Iterator[Callable[[Any], Any]]:
    """Shows ``description`` while the block runs and logs how long it took.

    Yields ``ready(tree)``: the block hands it its results, which are waited for (``block_until_ready``)
    before the time is taken, and gets them back.
    """
    started = time.perf_counter()
    with _Display.task(description, None):
        yield block_until_ready
    log.info("%s: %.1f s", description, time.perf_counter() - started)


@contextlib.contextmanager
def counter(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar of ``total`` units (queries, epochs) with an ETA; yields ``advance(count)``."""
    with _Display.task(description, total) as advance:
        yield advance


def counting_oracle(oracle, advance: Callable[[int], None]):
    """``oracle`` with every served answer counted by ``advance(rows)`` (refused queries are not)."""
    from heistlab.api import Oracle

    def query(inputs):
        answers = oracle.query(inputs)
        advance(len(answers))
        return answers

    return Oracle(
        query,
        lambda: oracle.remaining,
        oracle.input_shape,
        oracle.num_classes,
        oracle.output,
        oracle.clients,
    )
