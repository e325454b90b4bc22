"""Group commit (``AuditLog.record_in_turn``): the rows, chain and head equal those of one append per row."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from heistlab.serving.audit import AuditEntry, AuditLog, read_head

MAC_KEY, KEY = bytes(range(32)), bytes(range(32, 64))
GROUPS = ((1,), (2, 3, 4), (5, 6, 7, 8, 9, 10, 11), (12,))


def entry(index: int, outcome: str = "served") -> AuditEntry:
    status = 200 if outcome == "served" else 429
    return AuditEntry(f"r{index}", 1000.0 + index, f"k{index % 3}", "labels", "POST", "/v1/predict",
                      f"d{index}", index % 4, outcome, status, f"reason {index}")  # fmt: skip


def raw_rows(path: Path, table: str) -> list[tuple]:
    with sqlite3.connect(path) as connection:
        return connection.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()


def one_by_one(path: Path, **keys) -> AuditLog:
    log = AuditLog(path, **keys)
    for group in GROUPS:
        for index in group:
            log.record(entry(index))
        log.record_alarm(f"k{group[0]}", "detected", True, {"group": group[0]}, now=2000.0 + group[0])
    return log


def grouped(path: Path, **keys) -> AuditLog:
    log = AuditLog(path, **keys)
    for group in GROUPS:
        assert log.record_in_turn([entry(index) for index in group]) == [None] * len(group)
        log.record_alarm(f"k{group[0]}", "detected", True, {"group": group[0]}, now=2000.0 + group[0])
    return log


def test_grouped_rows_chain_and_head_equal_one_append_per_row(tmp_path):
    single = one_by_one(tmp_path / "single.sqlite", mac_key=MAC_KEY)
    group = grouped(tmp_path / "group.sqlite", mac_key=MAC_KEY)
    for table in ("requests", "alarms", "meta"):
        assert raw_rows(single.path, table) == raw_rows(group.path, table), table
    assert read_head(single.head_path, MAC_KEY) == read_head(group.head_path, MAC_KEY)
    assert single.verify().intact and group.verify().intact


def test_grouped_encrypted_rows_read_back_equal_and_verify(tmp_path):
    single = one_by_one(tmp_path / "single.sqlite", key=KEY, mac_key=MAC_KEY)
    group = grouped(tmp_path / "group.sqlite", key=KEY, mac_key=MAC_KEY)
    assert single.requests(limit=100) == group.requests(limit=100)
    assert single.served_rows() == group.served_rows() and single.alarms() == group.alarms()
    assert group.verify().intact and group.verify().rows == single.verify().rows


def test_an_invalid_entry_fails_alone_as_it_would_one_by_one(tmp_path):
    entries = [entry(1), entry(2, outcome="bogus"), entry(3)]
    single = AuditLog(tmp_path / "single.sqlite", mac_key=MAC_KEY)
    for item in entries:
        if item.outcome == "bogus":
            with pytest.raises(ValueError, match="outcome must be one of"):
                single.record(item)
        else:
            single.record(item)
    group = AuditLog(tmp_path / "group.sqlite", mac_key=MAC_KEY)
    outcomes = group.record_in_turn(entries)
    assert outcomes[0] is None and outcomes[2] is None and isinstance(outcomes[1], ValueError)
    assert raw_rows(single.path, "requests") == raw_rows(group.path, "requests")
    assert group.verify().intact


def test_a_failed_transaction_fails_every_entry_and_commits_none(tmp_path):
    log = AuditLog(tmp_path / "audit.sqlite", mac_key=MAC_KEY)
    log.record(entry(1))
    with sqlite3.connect(log.path) as connection:
        connection.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON requests WHEN NEW.request_id = 'r3' "
            "BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END"
        )
    outcomes = log.record_in_turn([entry(2), entry(3), entry(4)])
    assert all(isinstance(outcome, sqlite3.IntegrityError) for outcome in outcomes)
    assert log.count() == 1 and log.verify().intact
