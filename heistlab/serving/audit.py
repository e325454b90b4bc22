"""The server's audit log: one SQLite row per HTTP request, and the alarms online detectors raised.

The database is in WAL mode (readers never block the writer) with ``synchronous=NORMAL`` (a commit survives a
process crash; a power cut may lose the last transactions) and a busy timeout, so several processes may share
it. It survives restarts: the server seeds each key's served-query count from it, so a quota stays spent.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    time REAL NOT NULL,
    key_id TEXT,
    role TEXT,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    input_digest TEXT,
    rows INTEGER NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL,
    status INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS requests_by_key ON requests (key_id, outcome);
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    key_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    report TEXT NOT NULL
);
"""

# What became of a request: predictions served, refused (4xx), failed (5xx), or another request answered.
OUTCOMES = ("served", "refused", "error", "ok")


class AuditEntry(NamedTuple):
    request_id: str
    time: float
    key_id: str | None
    role: str | None
    method: str
    path: str
    input_digest: str | None
    rows: int
    outcome: str
    status: int
    reason: str = ""


def outcome_for(status: int, served: bool) -> str:
    if status >= 500:
        return "error"
    if status >= 400:
        return "refused"
    return "served" if served else "ok"


class AuditLog:
    """Appends ``AuditEntry`` rows and alarms to the SQLite file at ``path`` (created if absent)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.execute("PRAGMA busy_timeout=30000")
        with self._lock, self._connection:
            self._connection.executescript(SCHEMA)

    def record(self, entry: AuditEntry) -> None:
        if entry.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}; got {entry.outcome!r}")
        with self._lock, self._connection:
            self._connection.execute(
                "INSERT INTO requests (request_id, time, key_id, role, method, path, input_digest, rows, "
                "outcome, status, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                entry,
            )

    def record_alarm(self, key_id: str, name: str, value, report: dict, now: float | None = None) -> None:
        with self._lock, self._connection:
            self._connection.execute(
                "INSERT INTO alarms (time, key_id, name, value, report) VALUES (?, ?, ?, ?, ?)",
                (
                    time.time() if now is None else now,
                    key_id,
                    name,
                    json.dumps(value, default=str),
                    json.dumps(report, default=str, sort_keys=True),
                ),
            )

    def _rows(self, query: str, parameters: tuple) -> list[dict]:
        with self._lock:
            cursor = self._connection.execute(query, parameters)
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def requests(self, limit: int = 100, key_id: str | None = None) -> list[dict]:
        """The latest ``limit`` requests, newest first (only ``key_id``'s when given)."""
        if key_id is None:
            return self._rows("SELECT * FROM requests ORDER BY id DESC LIMIT ?", (limit,))
        return self._rows("SELECT * FROM requests WHERE key_id = ? ORDER BY id DESC LIMIT ?", (key_id, limit))

    def alarms(self, limit: int = 100) -> list[dict]:
        rows = self._rows("SELECT * FROM alarms ORDER BY id DESC LIMIT ?", (limit,))
        return [
            {**row, "value": json.loads(row["value"]), "report": json.loads(row["report"])} for row in rows
        ]

    def served_rows(self) -> dict[str, int]:
        """Input rows served to each key, over the whole log (the quota ledger after a restart)."""
        rows = self._rows(
            "SELECT key_id, SUM(rows) AS served FROM requests "
            "WHERE outcome = 'served' AND key_id IS NOT NULL GROUP BY key_id",
            (),
        )
        return {row["key_id"]: int(row["served"]) for row in rows}

    def count(self, key_id: str | None = None, outcome: str | None = None) -> int:
        clauses, parameters = [], []
        for column, value in (("key_id", key_id), ("outcome", outcome)):
            if value is not None:
                clauses.append(f"{column} = ?")
                parameters.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        return self._rows(f"SELECT COUNT(*) AS n FROM requests{where}", tuple(parameters))[0]["n"]

    def close(self) -> None:
        with self._lock:
            self._connection.close()
