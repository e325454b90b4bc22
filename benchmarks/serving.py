"""``python -m experiments.serve`` in a process of its own, for the serving benchmarks and the command-line
test: one way to start it, wait for it and stop it.

The server's output (Hydra's console log, which carries the JSON request log, one line per request) goes to
``serve.log`` in the run's folder, as a deployment's would go to a file or the journal, not to the terminal
running the benchmark.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx

from heistlab.serving.tls import client_context

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_command(folder: Path, port: int, *overrides: str) -> list[str]:
    """The command serving on ``port`` with the key store, audit log and TLS pair (``keys.json``,
    ``audit.sqlite``, ``cert.pem``, ``key.pem``) in ``folder``; ``overrides`` come last and win."""
    return [
        sys.executable, "-m", "experiments.serve", f"serve.port={port}",
        f"serve.key_store={folder / 'keys.json'}", f"serve.audit_db={folder / 'audit.sqlite'}",
        f"serve.certfile={folder / 'cert.pem'}", f"serve.keyfile={folder / 'key.pem'}",
        f"hydra.run.dir={folder / 'hydra'}", *overrides,
    ]  # fmt: skip


class Server(NamedTuple):
    """A running ``python -m experiments.serve``: its process, URL and output file."""

    process: subprocess.Popen
    url: str
    log: Path

    def log_tail(self, characters: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-characters:]


def wait_until_up(server: Server, ca_file: Path, timeout_s: float = 300) -> None:
    """Returns once ``GET /healthz`` answers 200; fails if the server exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(verify=client_context(ca_file), timeout=5) as probe:
        while time.monotonic() < deadline:
            assert server.process.poll() is None, f"the server exited: {server.log_tail()}"
            try:
                if probe.get(f"{server.url}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.25)
    raise TimeoutError(f"the server did not come up within {timeout_s} s: {server.log_tail()}")


@contextlib.contextmanager
def served(
    folder: Path, port: int, *overrides: str, ca_file: Path | None = None, timeout_s: float = 300
) -> Iterator[Server]:
    """``python -m experiments.serve`` (``serve_command``) running and answering ``/healthz``; stopped on
    exit with SIGINT, as an operator stops it (killed if it has not exited within 30 s). Its output is in
    ``folder / "serve.log"``. ca_file: the certificate to trust (default ``folder / "cert.pem"``)."""
    log = folder / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            serve_command(folder, port, *overrides),
            cwd=REPO,
            env={**os.environ, "CI": "true"},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, f"https://127.0.0.1:{port}", log)
    try:
        wait_until_up(server, ca_file or folder / "cert.pem", timeout_s)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
