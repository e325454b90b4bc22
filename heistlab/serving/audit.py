"""The server's audit log: one SQLite row per HTTP request, and the alarms online detectors raised.

The database is in WAL mode (readers never block the writer) with ``synchronous=NORMAL`` (a commit survives a
process crash; a power cut may lose the last transactions) and a busy timeout, so several processes may share
it. It survives restarts: the server seeds each key's served-query count from it, so a quota stays spent.

Encryption at rest (``AuditLog(path, key=...)``, the key from ``serve.audit_key_file`` or
``serve.audit_key_env`` through ``heistlab.protection.load_key``): each row's sensitive payload (key id, role,
path, input digest and reason of a request; key id, name, value and report of an alarm) is stored as one
AES-256-GCM blob (``heistlab.protection.encrypt``) and the clear columns keep only the request id, time,
method, rows, outcome and status. The associated data binds the blob to its table, its row id and those
clear columns, so a blob moved to another row, or a changed outcome or row count (a quota reset), fails
authentication: every read of an encrypted row verifies it, and a wrong key or a modified byte raises
``ProtectionError`` naming the row. A key-check blob in the ``meta`` table refuses a wrong key when the log
is opened. Rows are not chained: deleting whole rows is not detected. A log is encrypted from its first row
or not at all: opening an unencrypted log that holds rows with a key (or an encrypted one without) is refused.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from heistlab.protection import ProtectionError, decrypt, encrypt

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
    reason TEXT NOT NULL DEFAULT '',
    payload BLOB
);
CREATE INDEX IF NOT EXISTS requests_by_key ON requests (key_id, outcome);
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    key_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    report TEXT NOT NULL,
    payload BLOB
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""

# What became of a request: predictions served, refused (4xx), failed (5xx), or another request answered.
OUTCOMES = ("served", "refused", "error", "ok")
ENCRYPTION = "aes-256-gcm"
KEY_CHECK = b"heistlab audit log key check"
# The columns an encrypted log stores inside each row's blob, and the clear columns the blob is bound to.
SEALED = {
    "requests": ("key_id", "role", "path", "input_digest", "reason"),
    "alarms": ("key_id", "name", "value", "report"),
}
BOUND = {
    "requests": {"request_id": str, "time": float, "method": str, "rows": int, "outcome": str, "status": int},
    "alarms": {"time": float},
}
# What a sealed column holds in the clear (NOT NULL columns get an empty string).
PLACEHOLDER = {
    "requests": {"key_id": None, "role": None, "path": "", "input_digest": None, "reason": ""},
    "alarms": {"key_id": "", "name": "", "value": "", "report": ""},
}
REQUEST_COLUMNS = (
    "id, request_id, time, key_id, role, method, path, input_digest, rows, outcome, status, reason"
)


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


def associated_data(table: str, row_id: int, clear: dict) -> bytes:
    """What a row's blob is bound to: its table, its id and its clear columns (so rows cannot be swapped)."""
    bound = {name: kind(clear[name]) for name, kind in BOUND[table].items()}
    return f"heistlab-audit/{table}/{row_id}/".encode() + json.dumps(bound, sort_keys=True).encode()


def seal_row(table: str, row_id: int, row: dict, key: bytes) -> bytes:
    sensitive = {name: row[name] for name in SEALED[table]}
    payload = json.dumps(sensitive, sort_keys=True).encode()
    return encrypt(payload, key, associated_data(table, row_id, row))


def open_row(table: str, row: dict, key: bytes, source: str) -> dict:
    """The row with its sealed columns decrypted and verified; ``ProtectionError`` naming the row if not."""
    blob = row.get("payload")
    where = f"{source}, {table} row {row['id']}"
    if blob is None:
        raise ProtectionError(f"{where} has no encrypted payload in an encrypted audit log")
    sealed = json.loads(decrypt(bytes(blob), key, where, associated_data(table, row["id"], row)))
    opened = {name: value for name, value in row.items() if name != "payload"}
    opened.update(sealed)
    return opened


class AuditLog:
    """Appends ``AuditEntry`` rows and alarms to the SQLite file at ``path`` (created if absent).

    key: a 32-byte AES-256 key (``heistlab.protection.load_key``) to keep each row's sensitive payload
    encrypted (see the module docstring); None keeps the log in the clear.

    Raises:
      ProtectionError: the log is encrypted and ``key`` is None or wrong, or it holds unencrypted rows and a
        key was given.
    """

    def __init__(self, path: Path | str, key: bytes | None = None):
        if key is not None and (not isinstance(key, bytes) or len(key) != 32):
            raise ValueError(
                "key must be 32 bytes (an AES-256 key from heistlab.protection.load_key) or None"
            )
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = key
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.execute("PRAGMA busy_timeout=30000")
        with self._lock, self._connection:
            self._connection.executescript(SCHEMA)
            for table in SEALED:  # logs written before encryption existed have no payload column
                columns = {row[1] for row in self._connection.execute(f"PRAGMA table_info({table})")}
                if "payload" not in columns:
                    self._connection.execute(f"ALTER TABLE {table} ADD COLUMN payload BLOB")
            self._check_key()

    @property
    def encrypted(self) -> bool:
        return self._key is not None

    def _check_key(self) -> None:
        """Marks a new log encrypted, or checks that the key (or its absence) fits the log."""
        meta = dict(self._connection.execute("SELECT name, value FROM meta").fetchall())
        if meta.get("encryption") is None:
            if self._key is None:
                return
            rows = sum(
                self._connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in SEALED
            )
            if rows:
                raise ProtectionError(
                    f"audit log {self.path} holds {rows} unencrypted rows; it cannot be encrypted in place: "
                    "point serve.audit_db at a new file, or drop the encryption key"
                )
            self._connection.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('encryption', ?), ('key_check', ?)",
                (ENCRYPTION, encrypt(KEY_CHECK, self._key, b"heistlab-audit/key-check")),
            )
            meta = dict(self._connection.execute("SELECT name, value FROM meta").fetchall())
        if self._key is None:
            raise ProtectionError(
                f"audit log {self.path} is encrypted; name its key "
                "(serve.audit_key_file or serve.audit_key_env)"
            )
        if meta["encryption"] != ENCRYPTION:
            raise ProtectionError(f"audit log {self.path}: unknown encryption {meta['encryption']!r}")
        decrypt(
            bytes(meta["key_check"]),
            self._key,
            f"audit log {self.path} key check",
            b"heistlab-audit/key-check",
        )

    def record(self, entry: AuditEntry) -> None:
        if entry.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}; got {entry.outcome!r}")
        self._insert("requests", entry._asdict())

    def record_alarm(self, key_id: str, name: str, value, report: dict, now: float | None = None) -> None:
        row = {
            "time": time.time() if now is None else now,
            "key_id": key_id,
            "name": name,
            "value": json.dumps(value, default=str),
            "report": json.dumps(report, default=str, sort_keys=True),
        }
        self._insert("alarms", row)

    def _insert(self, table: str, row: dict) -> None:
        stored = dict(row)
        if self._key is not None:
            stored.update(PLACEHOLDER[table])
        columns = ", ".join(stored)
        marks = ", ".join("?" for _ in stored)
        with self._lock, self._connection:
            cursor = self._connection.execute(
                f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(stored.values())
            )
            if self._key is not None:  # sealed in the same transaction, once the row id is known
                row_id = cursor.lastrowid
                self._connection.execute(
                    f"UPDATE {table} SET payload = ? WHERE id = ?",
                    (seal_row(table, row_id, row, self._key), row_id),
                )

    def _rows(self, query: str, parameters: tuple) -> list[dict]:
        with self._lock:
            cursor = self._connection.execute(query, parameters)
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _read(self, table: str, newest_first: bool = True) -> Iterator[dict]:
        """Every row of ``table``, opened and verified when the log is encrypted, without its payload."""
        order = "DESC" if newest_first else "ASC"
        for row in self._rows(f"SELECT * FROM {table} ORDER BY id {order}", ()):
            if self._key is None:
                yield {name: value for name, value in row.items() if name != "payload"}
            else:
                yield open_row(table, row, self._key, f"audit log {self.path}")

    def requests(self, limit: int = 100, key_id: str | None = None) -> list[dict]:
        """The latest ``limit`` requests, newest first (only ``key_id``'s when given)."""
        if self._key is None:
            if key_id is None:
                return self._rows(
                    f"SELECT {REQUEST_COLUMNS} FROM requests ORDER BY id DESC LIMIT ?", (limit,)
                )
            return self._rows(
                f"SELECT {REQUEST_COLUMNS} FROM requests WHERE key_id = ? ORDER BY id DESC LIMIT ?",
                (key_id, limit),
            )
        found = []
        for row in self._read("requests"):
            if key_id is None or row["key_id"] == key_id:
                found.append(row)
                if len(found) == limit:
                    break
        return found

    def alarms(self, limit: int = 100) -> list[dict]:
        rows = []
        for row in self._read("alarms"):
            rows.append({**row, "value": json.loads(row["value"]), "report": json.loads(row["report"])})
            if len(rows) == limit:
                break
        return rows

    def served_rows(self) -> dict[str, int]:
        """Input rows served to each key, over the whole log (the quota ledger after a restart).

        On an encrypted log every row is verified, so a row whose outcome or count was changed stops the read.
        """
        if self._key is None:
            rows = self._rows(
                "SELECT key_id, SUM(rows) AS served FROM requests "
                "WHERE outcome = 'served' AND key_id IS NOT NULL GROUP BY key_id",
                (),
            )
            return {row["key_id"]: int(row["served"]) for row in rows}
        served: dict[str, int] = {}
        for row in self._read("requests", newest_first=False):
            if row["outcome"] == "served" and row["key_id"] is not None:
                served[row["key_id"]] = served.get(row["key_id"], 0) + int(row["rows"])
        return served

    def count(self, key_id: str | None = None, outcome: str | None = None) -> int:
        if self._key is not None:
            return sum(
                1
                for row in self._read("requests")
                if (key_id is None or row["key_id"] == key_id)
                and (outcome is None or row["outcome"] == outcome)
            )
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
