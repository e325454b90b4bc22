"""Running the app on uvicorn over HTTPS: in the foreground (``python -m experiments.serve``) or in a thread.

One process serves by default: the quota ledger, the rate-limit buckets and the defense state live in it, and
one lock over them is what makes budgets exact (``workers`` runs several processes on one port, the quota and
rate limit shared through SQLite). TLS 1.2 is the minimum protocol version (Python's default for server
contexts); TLS 1.2 offers only ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 (``AEAD_TLS12_CIPHERS``;
no CBC suite, no static RSA), and TLS 1.3's suites are AEAD by construction.

HTTP/1.1 is parsed by httptools (llhttp, Node.js's parser, in C) when it is installed, else by h11 (pure
Python), and the event loop is uvloop's when installed, else asyncio's: both chosen explicitly, never left to
uvicorn's "auto" (``http_protocol`` and ``event_loop``). With either parser, a request whose line and headers
pass ``MAX_HEADER_BYTES`` (16 KiB, counted however the bytes arrive) or are malformed is refused before the
app sees it; uvicorn then answers 400 and closes the connection. ``on_rejected`` is told of each such
request, so that the audit log keeps a row for it too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from logging.handlers import QueueHandler, QueueListener
from pathlib import Path
from typing import NamedTuple

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # imports httptools
except ImportError:
    HttpToolsProtocol = None
HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None

log = logging.getLogger("heistlab.serving")
AEAD_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
MAX_HEADER_BYTES = 16 * 1024


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
    on_rejected: Callable[[str], None] | None = None,
    graceful_shutdown_s: int = 5,
) -> uvicorn.Config:
    """uvicorn's settings for serving ``app`` over HTTPS with ``certfile`` and ``keyfile``; ``on_rejected``
    is called with a reason for each request the HTTP parser refuses before ``app`` sees it."""
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
        ssl_ciphers=AEAD_TLS12_CIPHERS,
        http=http_protocol(on_rejected),
        loop=event_loop(),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        log_level=log_level,
        access_log=access_log,
        server_header=False,
        lifespan="off",
        timeout_graceful_shutdown=graceful_shutdown_s,
    )


def http_protocol(on_rejected: Callable[[str], None] | None, parser: str | None = None) -> type:
    """The HTTP protocol class serving requests: ``reporting_httptools`` when httptools is installed, else
    ``reporting_h11``. parser: ``httptools`` or ``h11`` to choose (None: the fastest installed)."""
    if parser is None:
        parser = "h11" if HttpToolsProtocol is None else "httptools"
    if parser == "httptools":
        if HttpToolsProtocol is None:
            raise ImportError("parser httptools is not installed: pip install httptools, or choose h11")
        return reporting_httptools(on_rejected)
    if parser == "h11":
        return reporting_h11(on_rejected)
    raise ValueError(f"parser must be httptools, h11 or None; got {parser!r}")


def event_loop() -> str:
    """uvicorn's ``loop`` setting: ``uvloop`` when installed, else ``asyncio``."""
    return "uvloop" if HAS_UVLOOP else "asyncio"


def report_refusal(on_rejected: Callable[[str], None] | None, client) -> None:
    """Tells ``on_rejected`` (if given) of a request the HTTP parser refused; never raises."""
    if on_rejected is None:
        return
    peer = f" from {client[0]}" if client else ""
    try:
        on_rejected(
            f"refused by the HTTP parser{peer}: malformed request line or headers, or more than "
            f"{MAX_HEADER_BYTES} bytes of them"
        )
    except Exception:  # the answer still goes out; the server log says what was lost
        log.exception("a request refused by the HTTP parser%s could not be recorded", peer)


def head_too_large(held: bytes, data: bytes) -> tuple[bool, bytes]:
    """Whether a request head that began with ``held`` passes ``MAX_HEADER_BYTES`` once ``data`` arrives,
    and what to hold of it next (the head so far while incomplete, else nothing)."""
    seen = held + data
    end = seen.find(b"\r\n\r\n")
    return (len(seen) if end < 0 else end + 4) > MAX_HEADER_BYTES, seen if end < 0 else b""


def reporting_httptools(on_rejected: Callable[[str], None] | None) -> type:
    """uvicorn's httptools protocol with ``reporting_h11``'s bound and reports: each request's line and
    headers bounded to ``MAX_HEADER_BYTES`` however they arrive (llhttp sets no bound of its own), and
    ``on_rejected`` (if given) called before the 400 answering a request the parser refused."""

    class ReportingHttpToolsProtocol(HttpToolsProtocol):
        head = b""  # the current request's line and headers received so far, while incomplete
        reading_head = True  # no request yet, or the last one's body is complete: the next bytes are a head

        def connection_made(self, transport) -> None:
            super().connection_made(MergedWrites(transport, self.loop))

        def data_received(self, data: bytes) -> None:
            if self.reading_head:
                too_large, self.head = head_too_large(self.head, data)
                if too_large:
                    self.send_400_response("Request line and headers too large")
                    return
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self.reading_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self.reading_head = True
            super().on_message_complete()

        def send_400_response(self, msg: str) -> None:
            report_refusal(on_rejected, self.client)
            super().send_400_response(msg)

    return ReportingHttpToolsProtocol


def reporting_h11(on_rejected: Callable[[str], None] | None) -> type[H11Protocol]:
    """uvicorn's h11 protocol that bounds each request's line and headers to ``MAX_HEADER_BYTES`` however they
    arrive, and calls ``on_rejected`` (if given) before it answers 400 to a request it refused.

    h11's own bound (``h11_max_incomplete_event_size``) applies only while a request head is incomplete: a
    70 KB header block that reaches the server in one read would pass it whole, so the head's length is also
    counted here, before h11 parses it.
    """

    class ReportingH11Protocol(H11Protocol):
        head = b""  # the current request's line and headers received so far, while incomplete

        def connection_made(self, transport) -> None:
            super().connection_made(MergedWrites(transport, self.loop))

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                too_large, self.head = head_too_large(self.head, data)
                if too_large:
                    self.send_400_response("Request line and headers too large")
                    return
            super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            report_refusal(on_rejected, self.client)
            super().send_400_response(msg)

    return ReportingH11Protocol


class MergedWrites:
    """A transport that sends what is written to it in one turn of the event loop as one write.

    uvicorn writes an answer's status line and headers, its body and its end (empty with Content-Length)
    separately: over TLS, each write is a record of its own, encrypted and sent in a system call of its own,
    and the client decrypts and receives each. Held until the end of the loop's turn, they go out together
    as one record and one send, the same bytes in the same order. Closing sends what is held first;
    aborting drops it, as aborting drops a transport's buffer. Everything else is the wrapped transport's.
    """

    def __init__(self, transport, loop):
        self._transport, self._loop = transport, loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(data)

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        held, self._held = self._held, []
        if held and not self._transport.is_closing():
            self._transport.write(b"".join(held))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def serve_forever(config: uvicorn.Config) -> None:
    """Serves until interrupted (Ctrl-C or SIGTERM), finishing the requests in flight first; the root
    logger's handlers (where the JSON request log goes) run on a thread of their own meanwhile."""
    with logging_in_background(), contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises its Ctrl-C
        uvicorn.Server(config).run()


@contextlib.contextmanager
def logging_in_background() -> Iterator[None]:
    """Inside, the root logger's handlers run on a listener thread of their own, as the Python logging
    cookbook advises for handlers that may block ("Dealing with handlers that block"): a log call on the
    event loop only formats its message and enqueues the record; the lines, their order and their times
    are those the handlers would write themselves. Each write and flush to a file releases the GIL, and
    getting it back can wait on a worker thread: off the loop, that wait delays no request. On leaving,
    the records still queued are written and the handlers are put back."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    if not handlers:
        yield
        return
    records: queue.SimpleQueue = queue.SimpleQueue()
    listener = QueueListener(records, *handlers, respect_handler_level=True)
    root.handlers = [QueueHandler(records)]
    listener.start()
    try:
        yield
    finally:
        root.handlers = handlers
        listener.stop()


def serve_in_thread(
    app,
    certfile: Path | str,
    keyfile: Path | str,
    host: str = "127.0.0.1",
    startup_timeout_s: float = 30.0,
    on_rejected: Callable[[str], None] | None = None,
) -> RunningServer:
    """Serves ``app`` on a free port of ``host`` in a daemon thread; ``stop()`` shuts it down at once."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    port = listener.getsockname()[1]
    config = uvicorn_config(
        app, host, port, certfile, keyfile, "warning", on_rejected=on_rejected, graceful_shutdown_s=1
    )
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
