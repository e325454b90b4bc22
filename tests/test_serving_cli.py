"""The server from the command line: keys and certificates (experiments.keys), and
`python -m experiments.serve` serving the cached, digest-verified victim of a Hydra config over HTTPS."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest
from heistlab.defenses import rounding
from heistlab.experiments import keys
from hydra import compose, initialize_config_dir

from heistlab.api import PredictionAPI
from heistlab.compose import build_splits, load_victim
from heistlab.serving.app import app_from_config
from heistlab.serving.audit import AuditLog
from heistlab.serving.auth import read_store
from heistlab.serving.client import http_oracle, read_credentials
from heistlab.serving.tls import client_context
from heistlab.victims import TamperedCheckpointError

REPO = Path(__file__).resolve().parent.parent
TINY_VICTIM = ["victim.options.hidden=[32]", "victim.train.epochs=5"]


def composed_serve(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="serve", overrides=list(overrides))


def test_keys_cli_creates_lists_and_revokes_keys_and_makes_certificates(tmp_path, capsys):
    store, client = tmp_path / "keys.json", tmp_path / "client.json"
    assert keys.main(["selfsigned", "--out", str(tmp_path / "tls"), "--host", "127.0.0.1"]) == 0
    assert (tmp_path / "tls" / "cert.pem").exists() and (tmp_path / "tls" / "key.pem").exists()
    assert keys.main(["create", "--store", str(store), "--role", "probabilities", "--out", str(client)]) == 0
    assert (
        keys.main(["create", "--store", str(store), "--role", "labels", "--out", str(client), "--append"])
        == 0
    )
    first, second = read_credentials(client)
    assert set(read_store(store)) == {first.key_id, second.key_id} and first.key not in store.read_text()
    assert keys.main(["revoke", "--store", str(store), first.key_id]) == 0
    capsys.readouterr()
    assert keys.main(["list", "--store", str(store)]) == 0
    listing = capsys.readouterr().out
    assert f"{first.key_id}  probabilities  revoked" in listing and f"{second.key_id}  labels" in listing
    assert keys.main(["revoke", "--store", str(store), "missing"]) == 1
    with pytest.raises(SystemExit):
        keys.main(["create", "--store", str(store), "--role", "root", "--out", str(client)])


def test_app_from_config_refuses_a_tampered_victim_checkpoint(tmp_path):
    assert keys.main(["selfsigned", "--out", str(tmp_path / "tls")]) == 0
    assert (
        keys.main(
            ["create", "--store", str(tmp_path / "k.json"), "--role", "admin", "--out", str(tmp_path / "a")]
        )
        == 0
    )
    overrides = [
        f"cache_dir={tmp_path / 'cache'}",
        f"serve.key_store={tmp_path / 'k.json'}",
        f"serve.certfile={tmp_path / 'tls' / 'cert.pem'}",
        f"serve.keyfile={tmp_path / 'tls' / 'key.pem'}",
        f"serve.audit_db={tmp_path / 'audit.sqlite'}",
        *TINY_VICTIM,
    ]
    app, settings = app_from_config(composed_serve(*overrides))  # trains the victim into the cache
    assert settings.port == 8443 and "/v1/predict" in app.openapi()["paths"]
    (checkpoint,) = (tmp_path / "cache" / "victims").glob("*/params.msgpack")
    payload = bytearray(checkpoint.read_bytes())
    payload[-1] ^= 0xFF
    checkpoint.write_bytes(bytes(payload))
    with pytest.raises(TamperedCheckpointError, match="refusing checkpoint"):
        app_from_config(composed_serve(*overrides))
    with pytest.raises(Exception, match="serve.key_store"):
        app_from_config(composed_serve(*overrides[:1], *TINY_VICTIM))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # a fresh process imports JAX, Hydra and FastAPI: about 10 s on 2 cores
def test_serve_cli_answers_over_https_as_the_in_process_api_does(tmp_path, cache_dir):
    for command in (
        ["selfsigned", "--out", str(tmp_path / "tls")],
        [
            "create",
            "--store",
            str(tmp_path / "keys.json"),
            "--role",
            "probabilities",
            "--out",
            str(tmp_path / "c"),
        ],
    ):
        assert keys.main(command) == 0
    port = free_port()
    overrides = [*TINY_VICTIM, "defense=rounding", "defense.decimals=2", "seed=5", f"cache_dir={cache_dir}"]
    command = [
        sys.executable, "-m", "experiments.serve", *overrides,
        f"serve.port={port}", "serve.quota=40",
        f"serve.key_store={tmp_path / 'keys.json'}", f"serve.audit_db={tmp_path / 'audit.sqlite'}",
        f"serve.certfile={tmp_path / 'tls' / 'cert.pem'}", f"serve.keyfile={tmp_path / 'tls' / 'key.pem'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    environment = {**os.environ, "CI": "true"}
    server = subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url, ca_file = f"https://127.0.0.1:{port}", tmp_path / "tls" / "cert.pem"
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(verify=client_context(ca_file), timeout=5) as probe:
            while True:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline, "the server did not come up within 120 s"
                try:
                    if probe.get(f"{url}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
        oracle = http_oracle(url, tmp_path / "c", ca_file)
        cfg = composed_serve(*overrides)
        splits = build_splits(cfg)
        victim, from_cache = load_victim(cfg, splits, rounding(2))
        in_process = PredictionAPI(victim, rounding(2), key=jax.random.key(5)).query(splits.test.x[:8])
        assert from_cache and np.array_equal(oracle.query(splits.test.x[:8]), in_process)
        assert oracle.remaining == 32
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    log = server.stdout.read().decode()
    assert server.returncode == 0 and "Shutting down" in log and "Traceback" not in log, log[-3000:]
    assert AuditLog(tmp_path / "audit.sqlite").count(outcome="served") == 1
