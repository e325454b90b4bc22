"""The server from the command line: keys and certificates (experiments.keys), and
`python -m experiments.serve` serving the cached, digest-verified victim of a Hydra config over HTTPS."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from benchmarks.serving import free_port, served
from heistlab.api import PredictionAPI
from heistlab.compose import build_splits, load_victim
from heistlab.defenses import rounding
from heistlab.experiments import keys
from heistlab.serving.app import app_from_config
from heistlab.serving.audit import AuditLog
from heistlab.serving.auth import read_store
from heistlab.serving.client import http_oracle, read_credentials
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


@pytest.mark.slow  # a fresh process imports JAX, Hydra and FastAPI: about 10 s on 2 cores
def test_serve_cli_answers_over_https_as_the_in_process_api_does(tmp_path, cache_dir):
    assert keys.main(["selfsigned", "--out", str(tmp_path)]) == 0
    create = ["create", "--store", str(tmp_path / "keys.json"), "--role", "probabilities", "--out"]
    assert keys.main([*create, str(tmp_path / "c")]) == 0
    overrides = [*TINY_VICTIM, "defense=rounding", "defense.decimals=2", "seed=5", f"cache_dir={cache_dir}"]
    with served(tmp_path, free_port(), *overrides, "serve.quota=40", timeout_s=120) as server:
        oracle = http_oracle(server.url, tmp_path / "c", tmp_path / "cert.pem")
        cfg = composed_serve(*overrides)
        splits = build_splits(cfg)
        victim, from_cache = load_victim(cfg, splits, rounding(2))
        in_process = PredictionAPI(victim, rounding(2), key=jax.random.key(5)).query(splits.test.x[:8])
        assert from_cache and np.array_equal(oracle.query(splits.test.x[:8]), in_process)
        assert oracle.remaining == 32
    log = server.log_tail(characters=100_000)
    assert server.process.returncode == 0 and "Shutting down" in log and "Traceback" not in log, log[-3000:]
    assert AuditLog(tmp_path / "audit.sqlite").count(outcome="served") == 1
