"""The tamper-evident audit log: rows chained with HMAC-SHA256 and a MACed head beside the database.

Each way of hiding something in the log (deleting a middle row, reordering two rows, truncating the tail,
editing a field, removing or forging the head) is done here with plain SQL, as an attacker with write access
to the disk would, and must be reported with its row ids; a server on such a log refuses to start unless told
to accept it, and then logs that decision. The database and its -wal and -shm files are private (0600).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from hydra import compose, initialize_config_dir

from heistlab.defenses import rounding
from heistlab.experiments import audit_log, keys
from heistlab.protection import ProtectionError
from heistlab.serving.app import app_from_config, create_app
from heistlab.serving.audit import (
    ACCEPTED_BROKEN_PATH,
    AuditEntry,
    AuditLog,
    BrokenAuditLog,
    verify_log,
)
from heistlab.serving.auth import Authenticator, KeyStore, create_key
from heistlab.serving.server import serve_in_thread
from heistlab.serving.service import build_core
from heistlab.serving.tls import client_context, self_signed_pair
from heistlab.serving.validation import input_schema

REPO = Path(__file__).resolve().parent.parent
MAC_KEY = bytes(range(32))
CHEAP_KDF = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1, "dklen": 32}
TINY_VICTIM = ["victim.options.hidden=[32]", "victim.train.epochs=5"]


def entry(index: int, key_id: str = "k1", rows: int = 2) -> AuditEntry:
    return AuditEntry(
        f"r{index}", 1000.0 + index, key_id, "labels", "POST", "/v1/predict", f"d{index}", rows, "served", 200
    )


def chained_log(path: Path, rows: int = 8, **options) -> AuditLog:
    log = AuditLog(path, mac_key=MAC_KEY, **options)
    for index in range(1, rows + 1):
        log.record(entry(index))
    return log


def tamper(path: Path, *statements: str) -> None:
    """Changes the database behind the server's back, as plain SQL on the file."""
    connection = sqlite3.connect(path)
    with connection:
        for statement in statements:
            connection.execute(statement)
    connection.close()


def findings(path: Path, head: Path | None = None) -> dict[str, tuple[int, ...]]:
    return {finding.kind: finding.row_ids for finding in verify_log(path, MAC_KEY, head).findings}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_untouched_log_verifies_and_its_files_are_private(tmp_path):
    log = chained_log(tmp_path / "audit.sqlite")
    log.record_alarm("k1", "detected", True, {"detected": True})
    report = log.verify()
    assert report.intact and report.rows == {"requests": 8, "alarms": 1} and not report.notes
    for name in ("audit.sqlite", "audit.sqlite-wal", "audit.sqlite-shm", "audit.sqlite.head"):
        assert mode(tmp_path / name) == 0o600, name
    log.close()
    reopened = AuditLog(tmp_path / "audit.sqlite", mac_key=MAC_KEY)  # the chain goes on across restarts
    reopened.record(entry(9))
    assert reopened.verify().intact and reopened.served_rows() == {"k1": 18}


def test_an_encrypted_chained_log_verifies_and_reports_edits(tmp_path):
    log = chained_log(tmp_path / "audit.sqlite", rows=4, key=bytes(32))
    assert log.verify().intact and log.requests(1)[0]["request_id"] == "r4"
    tamper(tmp_path / "audit.sqlite", "UPDATE requests SET rows = 0 WHERE id = 2")
    assert findings(tmp_path / "audit.sqlite") == {"edited": (2,)}


def test_a_deleted_middle_row_is_reported_with_its_id(tmp_path):
    log = chained_log(tmp_path / "audit.sqlite")
    tamper(log.path, "DELETE FROM requests WHERE id = 4")
    assert log.served_rows() == {"k1": 14}  # what deletion did silently before: two rows of quota back
    assert findings(log.path) == {"deleted": (4,)}


def test_two_reordered_rows_are_reported_with_their_ids(tmp_path):
    log = chained_log(tmp_path / "audit.sqlite")
    tamper(
        log.path,
        "UPDATE requests SET id = 100 WHERE id = 3",
        "UPDATE requests SET id = 3 WHERE id = 6",
        "UPDATE requests SET id = 6 WHERE id = 100",
    )
    report = verify_log(log.path, MAC_KEY)
    assert [(finding.kind, finding.row_ids) for finding in report.findings] == [("reordered", (3, 6))]
    assert "row 6 now at id 3" in report.findings[0].detail


def test_a_truncated_tail_is_reported_with_the_missing_ids(tmp_path):
    log = chained_log(tmp_path / "audit.sqlite")
    tamper(log.path, "DELETE FROM requests WHERE id >= 6")
    assert findings(log.path) == {"truncated": (6, 7, 8)}


def test_an_edited_field_is_reported_with_its_row(tmp_path):
    log = chained_log(tmp_path / "audit.sqlite")
    tamper(log.path, "UPDATE requests SET outcome = 'refused' WHERE id = 5")
    assert findings(log.path) == {"edited": (5,)}
    tamper(log.path, "UPDATE requests SET outcome = 'served' WHERE id = 5")  # undone: intact again
    assert findings(log.path) == {}


def test_a_removed_or_forged_head_is_reported(tmp_path):
    log = chained_log(tmp_path / "audit.sqlite")
    original = log.head_path.read_bytes()  # two slots: the head after row 8, and the one before it
    assert original.count(b'"last_id": 8') == 1 and original.count(b'"last_id": 7') == 1
    log.head_path.write_bytes(original.replace(b'"last_id": 8', b'"last_id": 5'))  # to hide rows 6-8
    report = verify_log(log.path, MAC_KEY)
    assert [(finding.kind, finding.row_ids) for finding in report.findings] == [("head", ())]
    assert "slot 0" in report.findings[0].detail
    log.head_path.write_bytes(original.replace(b'"last_id": 8', b'"last_id": 5').replace(b": 7,", b": 5,"))
    assert [finding.kind for finding in verify_log(log.path, MAC_KEY).findings] == ["head", "head"]
    log.head_path.unlink()
    report = verify_log(log.path, MAC_KEY)
    assert [finding.kind for finding in report.findings] == ["head"]
    assert "missing" in report.findings[0].detail


def test_a_database_deleted_beside_its_head_is_reported_as_truncated(tmp_path):
    chained_log(tmp_path / "audit.sqlite").close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"audit.sqlite{suffix}").unlink(missing_ok=True)
    fresh = AuditLog(tmp_path / "audit.sqlite", mac_key=MAC_KEY)  # the head is kept, not overwritten
    with pytest.raises(BrokenAuditLog, match=r"truncated: requests rows 1-8"):
        fresh.check_at_start()


def test_a_wrong_mac_key_or_a_log_chained_without_one_is_refused(tmp_path):
    chained_log(tmp_path / "audit.sqlite", rows=2).close()
    with pytest.raises(ProtectionError, match="not the one this log was chained with"):
        AuditLog(tmp_path / "audit.sqlite", mac_key=bytes(32))
    with pytest.raises(ProtectionError, match="is chained; name its MAC key"):
        AuditLog(tmp_path / "audit.sqlite")
    AuditLog(tmp_path / "plain.sqlite").record(entry(1))
    with pytest.raises(ProtectionError, match="cannot be chained in place"):
        AuditLog(tmp_path / "plain.sqlite", mac_key=MAC_KEY)


def test_the_verify_command_names_each_finding_and_exits_1(tmp_path, capsys):
    log = chained_log(tmp_path / "audit.sqlite")
    (tmp_path / "mac.key").write_text(MAC_KEY.hex())
    command = ["verify", "--db", str(log.path), "--mac-key-file", str(tmp_path / "mac.key")]
    assert audit_log.main(command) == 0 and "intact" in capsys.readouterr().out
    tamper(log.path, "DELETE FROM requests WHERE id = 2", "UPDATE requests SET reason = 'x' WHERE id = 4")
    tamper(log.path, "DELETE FROM requests WHERE id = 8")
    assert audit_log.main(command) == 1
    out = capsys.readouterr().out
    assert "FAIL deleted: requests rows 2" in out and "FAIL edited: requests rows 4" in out
    assert "FAIL truncated: requests rows 8" in out
    os.environ["HEISTLAB_TEST_WRONG_MAC"] = bytes(32).hex()
    try:
        wrong = ["verify", "--db", str(log.path), "--mac-key-env", "HEISTLAB_TEST_WRONG_MAC"]
        assert audit_log.main(wrong) == 2
    finally:
        del os.environ["HEISTLAB_TEST_WRONG_MAC"]


APPENDER = """
import sys
from heistlab.serving.audit import AuditEntry, AuditLog
log = AuditLog(sys.argv[1], mac_key=bytes(range(32)))
for index in range(40):
    log.record(AuditEntry(f"{sys.argv[2]}-{index}", 1.0, sys.argv[2], "labels", "POST", "/v1/predict",
                          None, 1, "served", 200))
"""


def test_appenders_in_four_processes_keep_one_intact_chain(tmp_path):
    AuditLog(tmp_path / "audit.sqlite", mac_key=MAC_KEY).close()
    appenders = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(tmp_path / "audit.sqlite"), f"k{n}"], cwd=REPO)
        for n in range(4)
    ]
    assert [appender.wait(timeout=60) for appender in appenders] == [0, 0, 0, 0]
    report = verify_log(tmp_path / "audit.sqlite", MAC_KEY)
    assert report.intact and report.rows["requests"] == 160, report


def test_the_database_and_its_wal_and_shm_are_0600_on_a_live_server(tmp_path, small_victim):
    tls = self_signed_pair(tmp_path / "tls")
    store = tmp_path / "keys.json"
    credential = create_key(store, "labels", kdf=CHEAP_KDF)
    audit = AuditLog(tmp_path / "audit.sqlite", mac_key=MAC_KEY)
    core = build_core(small_victim, rounding(6), audit=audit, quota=100)
    app = create_app(
        core, Authenticator(KeyStore(store), b"s" * 32), audit, input_schema(small_victim.input_shape)
    )
    server = serve_in_thread(app, tls.certfile, tls.keyfile)
    try:
        with httpx.Client(verify=client_context(tls.certfile), timeout=30) as client:
            answer = client.post(
                f"{server.url}/v1/predict",
                json={"inputs": [[[[0.0]] * 8] * 8]},
                headers={"X-API-Key": credential.api_key},
            )
            assert answer.status_code == 200
            files = [tmp_path / f"audit.sqlite{suffix}" for suffix in ("", "-wal", "-shm", ".head")]
            assert {path.name: mode(path) for path in files} == {path.name: 0o600 for path in files}
    finally:
        server.stop()
    assert audit.verify().intact and audit.count(outcome="served") == 1


def prepare_deployment(tmp_path: Path) -> None:
    """A certificate, an admin key and the MAC key file a served config names."""
    assert keys.main(["selfsigned", "--out", str(tmp_path / "tls")]) == 0
    create_key(tmp_path / "keys.json", "admin", kdf=CHEAP_KDF)
    (tmp_path / "mac.key").write_text(MAC_KEY.hex())


def serve_config(tmp_path: Path, cache_dir: Path, *extra: str):
    overrides = [
        f"cache_dir={cache_dir}",
        f"serve.key_store={tmp_path / 'keys.json'}",
        f"serve.certfile={tmp_path / 'tls' / 'cert.pem'}",
        f"serve.keyfile={tmp_path / 'tls' / 'key.pem'}",
        f"serve.audit_db={tmp_path / 'audit.sqlite'}",
        f"serve.audit_mac_key_file={tmp_path / 'mac.key'}",
        *TINY_VICTIM,
        *extra,
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="serve", overrides=overrides)


def test_a_server_on_a_tampered_log_refuses_to_start_unless_told_and_logs_that(tmp_path, cache_dir):
    prepare_deployment(tmp_path)
    chained_log(tmp_path / "audit.sqlite").close()
    tamper(tmp_path / "audit.sqlite", "DELETE FROM requests WHERE id = 3")
    with pytest.raises(BrokenAuditLog, match=r"deleted: requests rows 3.*accept_broken_audit_log=true"):
        app_from_config(serve_config(tmp_path, cache_dir))
    assert AuditLog(tmp_path / "audit.sqlite", mac_key=MAC_KEY).count() == 7  # nothing was written

    app, settings = app_from_config(serve_config(tmp_path, cache_dir, "serve.accept_broken_audit_log=true"))
    server = serve_in_thread(app, settings.certfile, settings.keyfile)
    try:
        with httpx.Client(verify=client_context(settings.certfile), timeout=30) as client:
            assert client.get(f"{server.url}/healthz").status_code == 200
    finally:
        server.stop()
    log = AuditLog(tmp_path / "audit.sqlite", mac_key=MAC_KEY)
    accepted = [row for row in log.requests(10) if row["path"] == ACCEPTED_BROKEN_PATH]
    assert len(accepted) == 1 and accepted[0]["method"] == "START"
    assert "deleted: requests rows 3" in accepted[0]["reason"]
    assert findings(log.path) == {"deleted": (3,)}  # the damage stays visible; the new rows chain on
