"""Running the app on uvicorn over HTTPS: in the foreground (``python -m experiments.serve``) or in a thread.

Here one process serves: the quota ledger, the rate-limit buckets and the defense state live in it, and one
lock over them is what makes budgets exact (``workers`` runs several processes on one port, the quota and rate
limit shared through SQLite). TLS 1.2 is the minimum protocol version (Python's default for server contexts).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import uvicorn


class RunningServer(NamedTuple):
    url: str
    stop: Callable[[], None]


def uvicorn_config(
    app,
    host: str,
    port: int,
    certfile: Path | str,
    keyfile: Path | str,
    log_level: str = "info",
    access_log: bool = False,
    graceful_shutdown_s: int = 5,
) -> uvicorn.Config:
    """uvicorn's settings for serving ``app`` over HTTPS with ``certfile`` and ``keyfile``."""
    for name, path in (("certfile", certfile), ("keyfile", keyfile)):
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"serve.{name} {path} does not exist; make a self-signed pair for local use with "
                "`python -m experiments.keys selfsigned --out DIR`"
            )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(certfile),
        ssl_keyfile=str(keyfile),
        log_level=log_level,
        access_log=access_log,
        server_header=False,
        lifespan="off",
        timeout_graceful_shutdown=graceful_shutdown_s,
    )


def serve_forever(config: uvicorn.Config) -> None:
    """Serves until interrupted (Ctrl-C or SIGTERM), finishing the requests in flight first."""
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it has shut down on
        uvicorn.Server(config).run()


def serve_in_thread(
    app,
    certfile: Path | str,
    keyfile: Path | str,
    host: str = "127.0.0.1",
    startup_timeout_s: float = 30.0,
) -> RunningServer:
    """Serves ``app`` on a free port of ``host`` in a daemon thread; ``stop()`` shuts it down at once."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    port = listener.getsockname()[1]
    config = uvicorn_config(app, host, port, certfile, keyfile, log_level="warning", graceful_shutdown_s=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            listener.close()
            raise RuntimeError(f"the server on {host}:{port} did not start within {startup_timeout_s} s")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = server.force_exit = True  # now: idle keep-alive connections are not waited for
        thread.join(timeout=15)
        listener.close()

    return RunningServer(f"https://{host}:{port}", stop)
