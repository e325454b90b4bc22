"""Start-up of the server: the audit log opened and verified, and several worker processes behind one port.

``serve.workers=N`` (N > 1) pre-starts N processes (``multiprocessing`` spawn: each imports JAX and loads the
victim itself, nothing is forked from a process that has started JAX). Each binds the same address with
``SO_REUSEPORT``, so the kernel spreads connections over them. What they share:

- the quota and the rate limit, through ``shared.SharedAdmission`` in the audit database (exact: one
  ``BEGIN IMMEDIATE`` transaction per admission);
- the audit log and its chain (every append is one ``BEGIN IMMEDIATE`` transaction);
- keys and revocations: every worker re-reads the key store when the file changes, on each request;
- the bearer-token signing secret (made once by the parent when none is configured, handed to each worker);
- the defense chain's state, when it has one (PRADA's per-key histories, the batch count that draws each
  batch's key, the alarms raised), through ``shared_defense.DefenseStateStore`` in the audit database: the
  batches of all workers go through the defense one at a time. A stateless chain is not synchronised: each
  worker folds its index into its batch keys, so no two workers draw the same noise.

The parent verifies the audit log, resets the shared admission from it and the shared defense state to the
defense's initial state (as one process starts), then starts the first worker (which fills the victim
cache if needed), then the others once it serves; when one exits, the others are stopped and the server
exits with status 1.

This module imports no JAX: the parent process stays light.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from heistlab.protection import ProtectionError, load_key
from heistlab.serving.audit import AuditLog

log = logging.getLogger("heistlab.serving")
READY_TIMEOUT_S = 600.0


def _key(spec, file_name: str, env_name: str, what: str) -> bytes | None:
    try:
        return load_key(spec.get(file_name), spec.get(env_name))
    except ProtectionError as error:
        raise ProtectionError(f"{what} (serve.{file_name} / serve.{env_name}): {error}") from None


def open_audit_log(spec, check: bool = True) -> AuditLog:
    """The audit log ``spec`` (``cfg.serve``) names, encrypted and chained when it names keys.

    check: verify the chain first (``AuditLog.check_at_start``): a broken log is refused unless
    ``serve.accept_broken_audit_log`` is true, and that decision is logged as an audit row. Workers of a
    several-process server skip it: their parent checked the log before starting them.
    """
    audit_key = _key(spec, "audit_key_file", "audit_key_env", "the audit encryption key")
    mac_key = _key(spec, "audit_mac_key_file", "audit_mac_key_env", "the audit MAC key")
    head = spec.get("audit_head")
    audit = AuditLog(
        Path(str(spec.audit_db)).expanduser(),
        key=audit_key,
        mac_key=mac_key,
        head_path=None if head is None else Path(str(head)).expanduser(),
    )
    if not check:
        return audit
    if mac_key is None:
        log.warning(
            "the audit log %s is not tamper-evident (no serve.audit_mac_key_file or "
            "serve.audit_mac_key_env): deleted or edited rows would go unnoticed",
            audit.path,
        )
    try:
        report = audit.check_at_start(bool(spec.get("accept_broken_audit_log", False)))
    except Exception:
        audit.close()
        raise
    if report is not None and not report.intact:
        log.warning(
            "serving from an audit log that fails verification (serve.accept_broken_audit_log=true): %s",
            "; ".join(str(finding) for finding in report.findings),
        )
    for note in () if report is None else report.notes:
        log.warning("audit log: %s", note)
    return audit


def check_workers(workers) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise ValueError(f"serve.workers must be an integer in [1, 64], got {workers!r}")
    return workers


def shared_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT``, so every worker can bind the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((host, port))
    return listener


def run_worker(index: int, config_yaml: str, port: int, token_secret: bytes, ready) -> None:
    """One worker: builds the app from the config (shared admission, no second audit check) and serves."""
    import uvicorn
    from omegaconf import OmegaConf

    from heistlab.compose import cache_directory, enable_compilation_cache
    from heistlab.serving.app import app_from_config
    from heistlab.serving.server import logging_in_background, uvicorn_config

    cfg = OmegaConf.create(config_yaml)
    logging.basicConfig(level=str(cfg.serve.log_level).upper(), stream=sys.stderr)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    enable_compilation_cache(cache_directory(cfg))
    app, settings = app_from_config(cfg, token_signing_secret=token_secret, worker=index)
    listener = shared_socket(settings.host, port)
    server = uvicorn.Server(uvicorn_config(app, settings.host, port, *settings[2:]))

    def signal_ready() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            ready.set()

    threading.Thread(target=signal_ready, daemon=True).start()
    with logging_in_background():
        server.run(sockets=[listener])


def serve_workers(cfg, workers: int) -> int:
    """Serves ``cfg`` with ``workers`` processes on one port until interrupted; the exit status."""
    from omegaconf import OmegaConf

    from heistlab.serving.auth import token_secret
    from heistlab.serving.shared import SharedAdmission
    from heistlab.serving.shared_defense import reset_shared_state

    spec = cfg.serve
    if spec.get("extra_admission"):
        raise ValueError(
            "serve.extra_admission keeps its state in one process; with serve.workers > 1 only serve.quota, "
            "serve.rate and serve.burst are shared: leave serve.extra_admission empty or use one worker"
        )
    audit = open_audit_log(spec)
    shared = SharedAdmission(audit.path, spec.quota, spec.rate, spec.burst)
    shared.reset(audit.served_rows())
    shared.close()
    reset_shared_state(audit.path)
    audit.close()
    secret = token_secret(spec.token_secret_file)
    holder = shared_socket(str(spec.host), int(spec.port))  # holds the port (and resolves port 0)
    port = holder.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    readiness = [context.Event() for _ in range(workers)]
    processes = [
        context.Process(
            target=run_worker, args=(index, config_yaml, port, secret, ready), name=f"worker-{index}"
        )
        for index, ready in enumerate(readiness)
    ]
    stopping = threading.Event()

    def stop(signum, frame) -> None:
        stopping.set()

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        processes[0].start()  # the first worker fills the victim cache; the others then load from it
        announced, started = False, time.monotonic()
        while not stopping.is_set():
            if any(process.exitcode is not None for process in processes if process.pid is not None):
                break
            if readiness[0].is_set() and any(process.pid is None for process in processes):
                for process in processes[1:]:
                    process.start()
            if not announced and all(ready.is_set() for ready in readiness):
                log.info("serving https://%s:%d with %d workers", spec.host, port, workers)
                announced = True
            if not announced and time.monotonic() - started > READY_TIMEOUT_S:
                log.error("the workers did not start within %.0f s", READY_TIMEOUT_S)
                break
            stopping.wait(0.1)
    finally:
        started_processes = [process for process in processes if process.pid is not None]
        for process in started_processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        for process in started_processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        holder.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
    failed = [
        process.exitcode
        for process in processes
        if process.pid is not None and process.exitcode not in (0, -signal.SIGTERM)
    ]
    return 0 if stopping.is_set() and not failed else 1
