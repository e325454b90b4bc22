"""``logging_in_background``: the root handlers write the same lines, in order, from a thread of their own."""

from __future__ import annotations

import contextlib
import io
import logging
import threading

from heistlab.serving.server import logging_in_background

# The record's own fields (its thread is the one that logged); the time is left out only to compare two runs.
FORMAT = "[%(name)s][%(levelname)s][%(threadName)s] - %(message)s"


class ThreadNoting(logging.StreamHandler):
    """A stream handler that notes the threads it wrote from."""

    def __init__(self, stream: io.StringIO):
        super().__init__(stream)
        self.threads: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.threads.add(threading.current_thread().name)
        super().emit(record)


def logged(root: logging.Logger, background: bool) -> tuple[str, str, set[str]]:
    """What a handler and an ERROR-level handler wrote for 50 request lines and 5 tracebacks."""
    handler, errors = ThreadNoting(io.StringIO()), logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter(FORMAT))
    errors.setLevel(logging.ERROR)
    root.handlers = [handler, errors]
    requests, serving = (logging.getLogger(f"background_test.{name}") for name in ("requests", "errors"))
    with logging_in_background() if background else contextlib.nullcontext():
        for index in range(50):
            requests.info('{"event": "request", "index": %d}', index)
            if index % 10 == 0:
                try:
                    raise RuntimeError(f"failure {index}")
                except RuntimeError:
                    serving.exception("request %d failed", index)
    assert root.handlers == [handler, errors]  # put back on leaving
    return handler.stream.getvalue(), errors.stream.getvalue(), handler.threads


def test_background_logging_writes_the_same_lines_in_order_off_the_calling_thread(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", logging.INFO)
    direct, direct_errors, direct_threads = logged(root, background=False)
    lines, errors, threads = logged(root, background=True)
    assert direct.count('"event": "request"') == 50 and "RuntimeError: failure 40" in direct
    assert (lines, errors) == (direct, direct_errors) and errors.count("Traceback") == 5
    me = threading.current_thread().name
    assert direct_threads == {me} and me not in threads
