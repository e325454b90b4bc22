"""The server side of the audit (heistlab issue 8): the audit log encrypted at rest (AES-256-GCM, each row
bound to its id), the insecure options that make a deliberately weak deployment, the quota probe against a
real server, and an in-process audit."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from heistlab.audit import probes
from heistlab.audit.battery import run_audit
from heistlab.audit.ledger import QueryLedger
from heistlab.audit.target import TargetRefused
from heistlab.defenses import rounding
from heistlab.protection import ProtectionError, new_key
from heistlab.serving.app import app_from_config, check_insecure_options, create_app, widened
from heistlab.serving.audit import AuditEntry, AuditLog
from heistlab.serving.auth import ROLES, Authenticator, KeyStore, create_key
from heistlab.serving.server import serve_in_thread
from heistlab.serving.service import build_core
from heistlab.serving.tls import client_context, self_signed_pair
from heistlab.serving.validation import input_schema

REPO = Path(__file__).resolve().parent.parent
CHEAP_KDF = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1, "dklen": 32}
KEY, OTHER_KEY = bytes.fromhex(new_key()), bytes.fromhex(new_key())


def entry(index: int, key_id: str, outcome: str = "served", rows: int = 2) -> AuditEntry:
    status = 200 if outcome == "served" else 429
    reason = "" if outcome == "served" else "quota spent"
    digest = f"d{index}" * 8
    path = "/v1/predict"
    return AuditEntry(
        f"r{index}", 1000.0 + index, key_id, "labels", "POST", path, digest, rows, outcome, status, reason
    )


def written_log(path: Path, key: bytes | None) -> AuditLog:
    log = AuditLog(path, key=key)
    log.record(entry(1, "alice"))
    log.record(entry(2, "bob", rows=5))
    log.record(entry(3, "alice", outcome="refused"))
    log.record_alarm("bob", "detected", True, {"queries_to_detection": 40}, now=2000.0)
    return log


def test_an_encrypted_audit_log_round_trips_and_keeps_its_payload_secret(tmp_path):
    path = tmp_path / "audit.sqlite"
    clear = written_log(tmp_path / "clear.sqlite", None)
    written_log(path, KEY).close()
    reopened = AuditLog(path, key=KEY)
    assert reopened.encrypted and reopened.requests() == clear.requests()
    assert reopened.alarms() == clear.alarms()
    assert reopened.alarms()[0]["report"] == {"queries_to_detection": 40}
    assert reopened.served_rows() == clear.served_rows() == {"alice": 2, "bob": 5}
    assert reopened.count(key_id="alice") == 2 and reopened.count(outcome="refused") == 1
    assert reopened.requests(limit=1, key_id="alice")[0]["request_id"] == "r3"
    raw = path.read_bytes() + (tmp_path / "audit.sqlite-wal").read_bytes()
    in_the_clear = (tmp_path / "clear.sqlite").read_bytes() + (tmp_path / "clear.sqlite-wal").read_bytes()
    for secret in (b"alice", b"bob", b"d1d1d1", b"/v1/predict", b"quota spent", b"queries_to_detection"):
        assert secret not in raw and secret in in_the_clear
    stored = sqlite3.connect(path).execute("SELECT key_id, path, outcome, rows FROM requests").fetchall()
    assert stored[0] == (None, "", "served", 2)  # only the clear columns, which the payload is bound to


def test_a_wrong_key_or_a_missing_one_is_refused_with_a_clear_error(tmp_path):
    written_log(tmp_path / "audit.sqlite", KEY).close()
    with pytest.raises(ProtectionError, match="key check failed authentication: the key is wrong"):
        AuditLog(tmp_path / "audit.sqlite", key=OTHER_KEY)
    with pytest.raises(ProtectionError, match="is encrypted; name its key"):
        AuditLog(tmp_path / "audit.sqlite")
    written_log(tmp_path / "clear.sqlite", None).close()
    with pytest.raises(ProtectionError, match="holds 4 unencrypted rows; it cannot be encrypted in place"):
        AuditLog(tmp_path / "clear.sqlite", key=KEY)
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        AuditLog(tmp_path / "new.sqlite", key=b"short")


def flip_a_payload_byte(connection: sqlite3.Connection) -> None:
    payload = bytearray(connection.execute("SELECT payload FROM requests WHERE id = 2").fetchone()[0])
    payload[40] ^= 0x01
    connection.execute("UPDATE requests SET payload = ? WHERE id = 2", (bytes(payload),))


@pytest.mark.parametrize(
    "tamper",
    [
        flip_a_payload_byte,
        "UPDATE requests SET rows = 0 WHERE id = 2",  # a quota reset: the clear count is bound too
        "UPDATE requests SET outcome = 'refused' WHERE id = 2",
        "UPDATE requests SET payload = (SELECT payload FROM requests WHERE id = 1) WHERE id = 2",  # swapped
    ],
    ids=["payload byte", "row count", "outcome", "payload moved"],
)
def test_a_modified_row_is_refused_on_every_read(tmp_path, tamper):
    path = tmp_path / "audit.sqlite"
    written_log(path, KEY).close()
    with sqlite3.connect(path) as connection:
        tamper(connection) if callable(tamper) else connection.execute(tamper)
    log = AuditLog(path, key=KEY)  # the key is right: the log opens, and each read verifies its rows
    for read in (log.served_rows, log.requests, lambda: log.count(key_id="bob")):
        with pytest.raises(ProtectionError, match="requests row 2 failed authentication"):
            read()


def test_insecure_options_are_validated_and_widen_roles_only_when_asked():
    assert check_insecure_options(["/v1/predict"], "labels")[0] == ("/v1/predict",)
    with pytest.raises(ValueError, match="may only name /v1/info, /v1/predict"):
        check_insecure_options(["/admin/audit"], "probabilities")
    with pytest.raises(ValueError, match="insecure_open_role must be a role that is served predictions"):
        check_insecure_options([], "admin")
    assert widened(ROLES["labels"]).outputs == ("labels", "probabilities", "top_k")
    assert widened(ROLES["admin"]).outputs == ()


def composed_serve(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="serve", overrides=list(overrides))


@pytest.mark.slow
def test_the_server_keeps_an_encrypted_audit_log_named_in_serve_yaml(tmp_path, cache_dir, monkeypatch):
    """serve.audit_key_env names the key: rows are written sealed, admins read them in the clear, the quota
    ledger survives a restart, and a wrong key stops the server before it serves."""
    tls = self_signed_pair(tmp_path / "tls")
    store = tmp_path / "keys.json"
    client, admin = create_key(store, "probabilities", CHEAP_KDF), create_key(store, "admin", CHEAP_KDF)
    monkeypatch.setenv("HEISTLAB_TEST_AUDIT_KEY", KEY.hex())
    overrides = [
        "victim.options.hidden=[32]", "victim.train.epochs=5", f"cache_dir={cache_dir}",
        f"serve.key_store={store}", f"serve.certfile={tls.certfile}", f"serve.keyfile={tls.keyfile}",
        f"serve.audit_db={tmp_path / 'audit.sqlite'}", "serve.audit_key_env=HEISTLAB_TEST_AUDIT_KEY",
        "serve.quota=20", "serve.rate=null",
    ]  # fmt: skip
    inputs = {"inputs": np.full((8, 8, 8, 1), 0.5).tolist()}
    for expected_remaining in (12, 4):  # the second server starts from the encrypted ledger
        app, settings = app_from_config(composed_serve(*overrides))
        settings.on_rejected("refused by the HTTP parser")  # what uvicorn_config(app, *settings) calls
        server = serve_in_thread(app, tls.certfile, tls.keyfile)
        try:
            with httpx.Client(base_url=server.url, verify=client_context(tls.certfile)) as http:
                answer = http.post("/v1/predict", json=inputs, headers={"X-API-Key": client.api_key})
                assert answer.json()["remaining"] == expected_remaining
                rows = http.get("/admin/audit", headers={"X-API-Key": admin.api_key}).json()["requests"]
        finally:
            server.stop()
        assert rows[0]["key_id"] == client.key_id and rows[0]["path"] == "/v1/predict"
        assert rows[0]["rows"] == 8 and "payload" not in rows[0]
        assert [(row["status"], row["path"]) for row in rows if row["key_id"] is None][-1] == (400, "")
    assert client.key_id.encode() not in (tmp_path / "audit.sqlite").read_bytes()
    monkeypatch.setenv("HEISTLAB_TEST_AUDIT_KEY", OTHER_KEY.hex())
    with pytest.raises(ProtectionError, match="the key is wrong"):
        app_from_config(composed_serve(*overrides))


def test_the_quota_probe_sends_one_batch_past_the_quota_and_sees_it_refused_whole(
    tmp_path, small_victim, digits_splits
):
    tls = self_signed_pair(tmp_path / "tls")
    store = tmp_path / "keys.json"
    client = create_key(store, "probabilities", CHEAP_KDF)
    audit = AuditLog(tmp_path / "audit.sqlite")
    core = build_core(small_victim, rounding(2), audit=audit, quota=10)
    authenticator = Authenticator(KeyStore(store), b"s" * 32)
    app = create_app(core, authenticator, audit, input_schema(small_victim.input_shape))
    server = serve_in_thread(app, tls.certfile, tls.keyfile)
    try:
        with httpx.Client(base_url=server.url, verify=client_context(tls.certfile)) as http:
            info = http.get("/v1/info", headers=probes.key_header(client)).json()
            sample, settings = digits_splits.test.x[0], probes.ProbeSettings()
            probing = probes.Probing(http, probes.Keys(client), info, sample, QueryLedger(100), settings)
            found = probes.quota(probing)
    finally:
        server.stop()
    assert not found.present and found.tested
    assert found.figures == {
        "quota": 10, "remaining_before": 10, "rows_drained": 0, "drain_status_counts": {},
        "remaining_drained": 10, "status": 429, "error": "refused", "remaining_after": 10,
    }  # fmt: skip
    assert probing.ledger.spent == {"probes": 11} and core.served(client.key_id) == 0


def composed_audit(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="audit", overrides=list(overrides))


def test_an_in_process_target_is_audited_without_traffic_and_remote_targets_are_refused(cache_dir):
    small = [
        f"cache_dir={cache_dir}", "victim.options.hidden=[32]", "victim.train.epochs=5",
        "surrogate.options.hidden=[32]", "surrogate.train.epochs=20", "surrogate.train.learning_rate=0.003",
        "audit.budget=600", "audit.extraction.eval_inputs=100", "audit.extraction.curve_points=1",
        "~audit.extraction.attacks.jbda", "audit.extraction.attacks.knockoff.budget=200",
        "audit.extraction.attacks.equation_solving.budget=100", "audit.evasion.decision=null",
        "audit.evasion.transfer.count=20", "defense=rounding", "api.output=labels", "api.budget=250",
    ]  # fmt: skip
    result = run_audit(composed_audit(*small))
    found = {item.check: item for item in result.findings}
    assert not found["abuse.probes"].tested and found["abuse.probes"].severity == "info"
    assert found["extraction.knockoff"].present and found["extraction.knockoff"].figures["queries"] == 200
    assert found["extraction.knockoff"].severity in ("low", "medium")  # labels under a budget: never high
    assert "api.output=labels" in found["extraction.equation_solving"].happened
    assert result.spent["reference"] == 100 + 2 * 20 and sum(result.spent.values()) <= 600
    assert result.configuration["api"]["output"] == "labels"
    assert result.configuration["defense"]["decimals"] == 2
    with pytest.raises(TargetRefused, match="not only loopback"):
        run_audit(composed_audit("target=https://192.0.2.10:8443", *small))
