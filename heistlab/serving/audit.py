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
is opened. A log is encrypted from its first row or not at all: opening an unencrypted log that holds rows
with a key (or an encrypted one without) is refused.

Tamper evidence (``AuditLog(path, mac_key=...)``, the key from ``serve.audit_mac_key_file`` or
``serve.audit_mac_key_env``): each row carries ``row_mac``, an HMAC-SHA256 of its table, id and every
column, and ``chain_mac``, an HMAC-SHA256 of the previous row's ``chain_mac`` and its own ``row_mac`` (a hash
chain, as in Schneier and Kelsey, "Secure audit logs to support computer forensics", ACM TISSEC 1999, without
their key evolution). After every append (one row, or the rows of one group commit: ``record_in_turn``),
the head of each table's chain (last row id, its ``chain_mac``, the row count), MACed under the same key, is
written to a file beside the database (``<audit_db>.head`` or one the operator names; two slots written in
turn, see ``write_head``) while the writer lock is held. ``verify_log`` walks the chains and compares them
with the head: deleted rows (an id gap), rows moved to other ids (reordering), a truncated tail (the head
names a row past the last one) and edited rows are each reported with their ids. Chaining, like encryption,
starts with the first row: a log holding unchained rows is not chained in place. Files are created 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
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
CHAIN = "hmac-sha256"
CHAIN_CHECK = b"heistlab audit log chain key check"
HEAD_FORMAT = "heistlab-audit-head/1"
GENESIS = b"\0" * 32
HEAD_SLOT_BYTES = 1024
# The columns each row's MAC covers (a column added later by someone else is not trusted, and not covered).
MAC_COLUMNS = {
    "requests": (
        "id",
        "request_id",
        "time",
        "key_id",
        "role",
        "method",
        "path",
        "input_digest",
        "rows",
        "outcome",
        "status",
        "reason",
        "payload",
    ),
    "alarms": ("id", "time", "key_id", "name", "value", "report", "payload"),
}
FINDING_KINDS = ("deleted", "reordered", "truncated", "edited", "head")


@contextlib.contextmanager
def immediate_transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` transaction: SQLite's writer lock is taken first, so writers (threads or worker
    processes) never interleave; rolled back on any exception, committed otherwise."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


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


def checked_entry(entry: AuditEntry) -> dict:
    """The row of ``entry``; ``ValueError`` naming the outcome when it is not one of ``OUTCOMES``."""
    if entry.outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}; got {entry.outcome!r}")
    return entry._asdict()


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


# -- the hash chain and its head ---------------------------------------------------------------------------


class Finding(NamedTuple):
    """One thing ``verify_log`` found wrong: its kind (``FINDING_KINDS``), table, row ids, and meaning."""

    kind: str
    table: str
    row_ids: tuple[int, ...]
    detail: str

    def __str__(self) -> str:
        ids = f" rows {format_ids(self.row_ids)}" if self.row_ids else ""
        return f"{self.kind}: {self.table}{ids}: {self.detail}"


class ChainReport(NamedTuple):
    """What ``verify_log`` checked: rows per table, findings (empty: intact) and notes that are not damage."""

    rows: dict[str, int]
    findings: tuple[Finding, ...]
    notes: tuple[str, ...] = ()

    @property
    def intact(self) -> bool:
        return not self.findings


def format_ids(ids: tuple[int, ...]) -> str:
    """``1, 2, 3, 7`` as ``1-3, 7``."""
    spans, start = [], None
    for position, row_id in enumerate(ids):
        if start is None:
            start = row_id
        if position + 1 == len(ids) or ids[position + 1] != row_id + 1:
            spans.append(str(start) if start == row_id else f"{start}-{row_id}")
            start = None
    return ", ".join(spans)


def head_path_for(database: Path | str) -> Path:
    """Where the head is kept unless the operator names a file: beside the database."""
    return Path(f"{database}.head")


def _canonical(value):
    return value.hex() if isinstance(value, bytes | memoryview) else value


def row_mac(key: bytes, table: str, row: dict, row_id: int | None = None) -> bytes:
    """HMAC-SHA256 of a row's table, id and covered columns (``row_id`` overrides the id it claims)."""
    covered = {name: _canonical(row.get(name)) for name in MAC_COLUMNS[table]}
    if row_id is not None:
        covered["id"] = row_id
    message = f"heistlab-audit/row/{table}/".encode() + json.dumps(covered, sort_keys=True).encode()
    return hmac.new(key, message, hashlib.sha256).digest()


def chain_mac(key: bytes, previous: bytes, own_row_mac: bytes) -> bytes:
    return hmac.new(key, b"heistlab-audit/link/" + previous + own_row_mac, hashlib.sha256).digest()


def head_mac(key: bytes, sequence: int, tables: dict) -> str:
    message = f"{HEAD_FORMAT}/{sequence}/".encode() + json.dumps(tables, sort_keys=True).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def write_head(path: Path, sequence: int, tables: dict, key: bytes) -> None:
    """Writes the MACed head into slot ``sequence % 2`` of the head file, in place (created 0600).

    Two fixed-size slots, each overwritten in place by one ``pwrite``, rather than a new file renamed over
    the old: a rename cost about 3 ms per row here (the file system flushes the new file on rename), a slot
    write a few microseconds. A write cut short by a power cut spoils at most one slot; the reader takes
    the newest slot whose MAC verifies (and reports the spoiled one).
    """
    document = {"format": HEAD_FORMAT, "sequence": sequence, "tables": tables}
    document["mac"] = head_mac(key, sequence, tables)
    encoded = json.dumps(document, sort_keys=True).encode()
    if len(encoded) >= HEAD_SLOT_BYTES:
        raise ValueError(f"the audit head needs {len(encoded)} bytes; a slot holds {HEAD_SLOT_BYTES - 1}")
    record = encoded.ljust(HEAD_SLOT_BYTES - 1) + b"\n"
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fresh = os.fstat(descriptor).st_size < 2 * HEAD_SLOT_BYTES
        for slot in (0, 1) if fresh else (sequence % 2,):
            os.pwrite(descriptor, record, slot * HEAD_SLOT_BYTES)
    finally:
        os.close(descriptor)


def _head_slot(chunk: bytes, key: bytes) -> dict:
    document = json.loads(chunk)
    tables, sequence, mac = document["tables"], document["sequence"], document["mac"]
    if document.get("format") != HEAD_FORMAT or not isinstance(tables, dict) or not isinstance(mac, str):
        raise ValueError(f"format must be {HEAD_FORMAT!r}")
    if not isinstance(sequence, int) or not hmac.compare_digest(mac, head_mac(key, sequence, tables)):
        raise ValueError("its MAC does not verify")
    return document


def read_head(path: Path, key: bytes) -> tuple[dict | None, list[Finding]]:
    """The newest head slot whose MAC verifies (its tables), and findings about the head file."""
    if not path.exists():
        return None, [Finding("head", "*", (), f"the head file {path} is missing")]
    data = path.read_bytes()
    valid, findings = [], []
    for slot in (0, 1):
        try:
            valid.append(_head_slot(data[slot * HEAD_SLOT_BYTES : (slot + 1) * HEAD_SLOT_BYTES], key))
        except (ValueError, KeyError, TypeError) as error:
            detail = f"slot {slot} of the head file {path} is not a valid head ({error}): edited, forged, or "
            findings.append(Finding("head", "*", (), detail + "cut short by a power cut during a write"))
    if not valid:
        return None, findings
    return max(valid, key=lambda document: document["sequence"])["tables"], findings


def _raw_rows(connection: sqlite3.Connection, table: str) -> list[dict]:
    cursor = connection.execute(f"SELECT * FROM {table} ORDER BY id ASC")
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def verify_rows(table: str, rows: list[dict], key: bytes, head: dict | None) -> tuple[list[Finding], list]:
    """The findings of one table's chain against its ``head`` entry (None: no trusted head), and notes."""
    findings, notes = [], []
    by_id = {row["id"]: row for row in rows}
    misplaced = [row for row in rows if not _equal(row.get("row_mac"), row_mac(key, table, row))]
    moved: dict[int, int] = {}  # id a row sits at -> the id its MAC was made for
    upper = max(rows[-1]["id"] if rows else 0, int(head["last_id"]) if head else 0)
    missing = [row_id for row_id in range(1, upper + 1) if row_id not in by_id][:1000]
    candidates = [row["id"] for row in misplaced] + missing  # a row may be moved into a gap
    for row in misplaced[:1000]:  # a mass edit is reported as edits, not searched pairwise
        for other in candidates:
            if other != row["id"] and _equal(row.get("row_mac"), row_mac(key, table, row, other)):
                moved[row["id"]] = other
                break
    if moved:
        findings.append(
            Finding(
                "reordered",
                table,
                tuple(sorted(moved)),
                "rows moved to other ids: "
                + ", ".join(f"row {origin} now at id {at}" for at, origin in sorted(moved.items())),
            )
        )
    edited = sorted(row["id"] for row in misplaced if row["id"] not in moved)
    # Links are checked in the order the rows were written: a moved row stands at the id it was made for.
    written = sorted(rows, key=lambda row: moved.get(row["id"], row["id"]))
    previous_id, previous_mac, broken_links = 0, GENESIS, []
    for row in written:
        origin = moved.get(row["id"], row["id"])
        if origin != previous_id + 1:
            gap = tuple(range(previous_id + 1, origin))
            findings.append(Finding("deleted", table, gap, f"{len(gap)} row(s) missing before row {origin}"))
        elif row["id"] not in edited and not _equal(
            row.get("chain_mac"), chain_mac(key, previous_mac, _bytes(row.get("row_mac")))
        ):
            broken_links.append(row["id"])
        previous_id, previous_mac = origin, _bytes(row.get("chain_mac"))
    edited = sorted({*edited, *broken_links})
    if edited:
        findings.append(Finding("edited", table, tuple(edited), "row contents or MACs changed"))
    if head is None:
        return findings, notes
    last_id, count = int(head["last_id"]), int(head["count"])
    last_present = rows[-1]["id"] if rows else 0
    if last_present < last_id:
        lost = tuple(range(last_present + 1, last_id + 1))
        findings.append(
            Finding("truncated", table, lost, f"the head names row {last_id}; the log ends at {last_present}")
        )
    elif last_id and not _equal(by_id[last_id].get("chain_mac"), bytes.fromhex(head["chain_mac"])):
        findings.append(Finding("head", table, (last_id,), "the head's chain MAC differs from that row's"))
    if last_present > last_id:
        notes.append(
            f"{table}: rows {last_id + 1}-{last_present} came after the last head write (a crash between "
            "the two writes); they verify on the chain alone"
        )
    covered = sum(1 for row in rows if row["id"] <= last_id)
    if covered != count and not any(f.kind in ("deleted", "truncated") for f in findings):
        findings.append(Finding("head", table, (), f"the head counts {count} rows; {covered} are there"))
    return findings, notes


def _bytes(value) -> bytes:
    return bytes(value) if value is not None else b""


def _equal(stored, expected: bytes) -> bool:
    return stored is not None and hmac.compare_digest(bytes(stored), expected)


def verify_log(path: Path | str, mac_key: bytes, head_path: Path | str | None = None) -> ChainReport:
    """Checks the chained audit log at ``path`` against its head (``<path>.head`` unless named).

    Reports, with row ids: ``deleted`` rows (an id gap), ``reordered`` rows (a row whose MAC was made for
    another id), ``truncated`` tails (the head names rows past the end), ``edited`` rows (contents or MACs
    that do not verify) and ``head`` problems (missing, forged, or disagreeing with the rows).

    Raises:
      FileNotFoundError: there is no database at ``path``. ProtectionError: the log is not chained, or
        ``mac_key`` is not its key.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no audit log at {path}")
    head_file = Path(head_path) if head_path is not None else head_path_for(path)
    connection = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    try:
        # Appenders write the head while holding the writer lock: holding it while reading, the head and the
        # rows are of one moment. Appends wait for the read (not for the MAC checks after it).
        connection.execute("BEGIN IMMEDIATE")
        meta = dict(connection.execute("SELECT name, value FROM meta").fetchall())
        _check_chain_key(meta, mac_key, path)
        tables = {table: _raw_rows(connection, table) for table in SEALED}
        head, findings = read_head(head_file, mac_key)
        connection.execute("ROLLBACK")
    finally:
        connection.close()
    notes = []
    for table, rows in tables.items():
        entry = None if head is None else head.get(table, {"last_id": 0, "chain_mac": "", "count": 0})
        found, noted = verify_rows(table, rows, mac_key, entry)
        findings += found
        notes += noted
    return ChainReport({table: len(rows) for table, rows in tables.items()}, tuple(findings), tuple(notes))


def _check_chain_key(meta: dict, mac_key: bytes, path: Path) -> None:
    if meta.get("chain") is None:
        raise ProtectionError(f"audit log {path} is not chained (it was written without a MAC key)")
    if meta["chain"] != CHAIN:
        raise ProtectionError(f"audit log {path}: unknown chain {meta['chain']!r}")
    expected = hmac.new(mac_key, CHAIN_CHECK, hashlib.sha256).digest()
    if not hmac.compare_digest(bytes(meta["chain_check"]), expected):
        raise ProtectionError(f"audit log {path}: the MAC key is not the one this log was chained with")


@contextlib.contextmanager
def private_files(*paths: Path) -> Iterator[None]:
    """Files created inside are readable by their owner only (umask 077), and ``paths`` are made 0600."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(path, 0o600)


class BrokenAuditLog(RuntimeError):
    """A chained audit log that fails verification, refused at start (``serve.accept_broken_audit_log``)."""

    def __init__(self, message: str, report: ChainReport):
        super().__init__(message)
        self.report = report


ACCEPTED_BROKEN_PATH = "/audit-log/accepted-broken"


class AuditLog:
    """Appends ``AuditEntry`` rows and alarms to the SQLite file at ``path`` (created 0600 if absent).

    key: a 32-byte AES-256 key (``heistlab.protection.load_key``) to keep each row's sensitive payload
    encrypted (see the module docstring); None keeps the log in the clear.
    mac_key: a 32-byte key to chain the rows and MAC the head (None: the log is not tamper-evident).
    head_path: where the head is written (default ``<path>.head``); only with ``mac_key``.

    Several processes may append to one log: every append is one ``BEGIN IMMEDIATE`` transaction, so the
    chain stays one sequence and the head is written while the writer lock is held.

    Raises:
      ProtectionError: the log is encrypted and ``key`` is None or wrong, or it holds unencrypted rows and a
        key was given; likewise for a chained log and ``mac_key``.
    """

    def __init__(
        self,
        path: Path | str,
        key: bytes | None = None,
        mac_key: bytes | None = None,
        head_path: Path | str | None = None,
    ):
        for name, value in (("key", key), ("mac_key", mac_key)):
            if value is not None and (not isinstance(value, bytes) or len(value) != 32):
                raise ValueError(f"{name} must be 32 bytes (a key from heistlab.protection.load_key) or None")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.head_path = Path(head_path) if head_path is not None else head_path_for(self.path)
        self._key, self._mac_key = key, mac_key
        self._lock = threading.Lock()
        sidecars = [Path(f"{self.path}{suffix}") for suffix in ("", "-wal", "-shm")]
        with private_files(*sidecars):
            self._connection = sqlite3.connect(
                self.path, check_same_thread=False, timeout=30.0, isolation_level=None
            )
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.execute("PRAGMA busy_timeout=30000")
            self._connection.executescript(SCHEMA)
            with self._lock, self._transaction():
                for table in SEALED:  # logs written before encryption or chaining lack these columns
                    columns = {row[1] for row in self._connection.execute(f"PRAGMA table_info({table})")}
                    for column in ("payload", "row_mac", "chain_mac"):
                        if column not in columns:
                            self._connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} BLOB")
                self._check_key()
                self._check_chain()

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return immediate_transaction(self._connection)

    @property
    def chained(self) -> bool:
        return self._mac_key is not None

    def _check_chain(self) -> None:
        """Marks a new log chained, or checks that the MAC key (or its absence) fits the log."""
        meta = dict(self._connection.execute("SELECT name, value FROM meta").fetchall())
        if meta.get("chain") is None:
            if self._mac_key is None:
                return
            rows = sum(
                self._connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in SEALED
            )
            if rows:
                raise ProtectionError(
                    f"audit log {self.path} holds {rows} unchained rows; it cannot be chained in place: "
                    "point serve.audit_db at a new file, or drop the MAC key"
                )
            check = hmac.new(self._mac_key, CHAIN_CHECK, hashlib.sha256).digest()
            self._connection.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('chain', ?), ('chain_check', ?)",
                (CHAIN, check),
            )
            if not self.head_path.exists():  # a head left by a deleted database stays, for verify to compare
                self._write_head()
            return
        if self._mac_key is None:
            raise ProtectionError(
                f"audit log {self.path} is chained; name its MAC key "
                "(serve.audit_mac_key_file or serve.audit_mac_key_env)"
            )
        _check_chain_key(meta, self._mac_key, self.path)

    def _write_head(self) -> None:
        """The head of every table's chain, written inside the current transaction (writer lock held)."""
        tables = {}
        for table in SEALED:
            last = self._connection.execute(
                f"SELECT id, chain_mac FROM {table} ORDER BY id DESC LIMIT 1"
            ).fetchone()
            counted = self._connection.execute("SELECT value FROM meta WHERE name = ?", (f"count/{table}",))
            count = counted.fetchone()
            tables[table] = {
                "last_id": last[0] if last else 0,
                "chain_mac": _bytes(last[1]).hex() if last else "",
                "count": int(count[0]) if count else 0,
            }
        sequence = sum(entry["count"] for entry in tables.values())  # one more with every append
        write_head(self.head_path, sequence, tables, self._mac_key)

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
        self._insert("requests", [checked_entry(entry)])

    def record_in_turn(self, entries: Sequence[AuditEntry]) -> list[Exception | None]:
        """Appends ``entries`` in the order given, in one transaction (a group commit, as database logs
        commit the records of concurrent transactions together: Gawlick and Kinkade, "Varieties of
        concurrency control in IMS/VS Fast Path", IEEE Database Engineering 1985). The rows, their chain and
        the head are those that ``record`` called on each entry in turn leaves; one outcome per entry: None
        once its row is committed, or the exception that kept it out (an invalid entry alone; a failed
        transaction, every entry in it). What ``heistlab.serving.batching.Coalescer`` runs for the server."""
        outcomes: list[Exception | None] = []
        rows = []
        for entry in entries:
            try:
                rows.append(checked_entry(entry))
                outcomes.append(None)
            except ValueError as error:
                outcomes.append(error)
        if rows:
            try:
                self._insert("requests", rows)
            except Exception as error:
                return [error if outcome is None else outcome for outcome in outcomes]
        return outcomes

    def record_alarm(self, key_id: str, name: str, value, report: dict, now: float | None = None) -> None:
        row = {
            "time": time.time() if now is None else now,
            "key_id": key_id,
            "name": name,
            "value": json.dumps(value, default=str),
            "report": json.dumps(report, default=str, sort_keys=True),
        }
        self._insert("alarms", [row])

    def _insert(self, table: str, rows: Sequence[dict]) -> None:
        """Appends ``rows`` to ``table`` in one transaction: each sealed and chained in turn, then the head
        written."""
        with self._lock, self._transaction():
            link = None
            for row in rows:
                stored = dict(row)
                if self._key is not None:
                    stored.update(PLACEHOLDER[table])
                columns = ", ".join(stored)
                marks = ", ".join("?" for _ in stored)
                cursor = self._connection.execute(
                    f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(stored.values())
                )
                row_id = cursor.lastrowid
                if self._key is not None:  # sealed in the same transaction, once the row id is known
                    stored["payload"] = seal_row(table, row_id, row, self._key)
                    self._connection.execute(
                        f"UPDATE {table} SET payload = ? WHERE id = ?", (stored["payload"], row_id)
                    )
                if self._mac_key is not None:
                    link = self._chain(table, row_id, stored, link)
            if self._mac_key is not None:
                self._connection.execute(
                    "INSERT INTO meta (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                    (f"count/{table}", len(rows)),
                )
                self._write_head()

    def _chain(self, table: str, row_id: int, stored: dict, previous: bytes | None) -> bytes:
        """Links row ``row_id`` to its predecessor, whose chain MAC is ``previous`` (None: read from the
        table); returns the row's own chain MAC. Inside the append's transaction."""
        if previous is None:
            found = self._connection.execute(
                f"SELECT chain_mac FROM {table} WHERE id < ? ORDER BY id DESC LIMIT 1", (row_id,)
            ).fetchone()
            previous = _bytes(found[0]) if found else GENESIS
        own = row_mac(self._mac_key, table, {**stored, "id": row_id})
        link = chain_mac(self._mac_key, previous, own)
        self._connection.execute(
            f"UPDATE {table} SET row_mac = ?, chain_mac = ? WHERE id = ?", (own, link, row_id)
        )
        return link

    def _rows(self, query: str, parameters: tuple) -> list[dict]:
        with self._lock:
            cursor = self._connection.execute(query, parameters)
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _read(self, table: str, newest_first: bool = True) -> Iterator[dict]:
        """Every row of ``table``, opened and verified when the log is encrypted, without its payload."""
        order = "DESC" if newest_first else "ASC"
        for row in self._rows(f"SELECT * FROM {table} ORDER BY id {order}", ()):
            row = {name: value for name, value in row.items() if name not in ("row_mac", "chain_mac")}
            if self._key is None:
                yield {name: value for name, value in row.items() if name != "payload"}
            else:
                yield open_row(table, row, self._key, f"audit log {self.path}")

    def rows_after(self, table: str, after_id: int, limit: int = 10_000) -> list[dict]:
        """Up to ``limit`` rows of ``table`` with an id above ``after_id``, oldest first, opened and verified
        when the log is encrypted (an incremental reader, such as the server's metrics, keeps the last id)."""
        if table not in SEALED:
            raise ValueError(f"table must be one of {', '.join(SEALED)}; got {table!r}")
        found = []
        query = f"SELECT * FROM {table} WHERE id > ? ORDER BY id ASC LIMIT ?"
        for row in self._rows(query, (after_id, limit)):
            row = {name: value for name, value in row.items() if name not in ("row_mac", "chain_mac")}
            if self._key is None:
                found.append({name: value for name, value in row.items() if name != "payload"})
            else:
                found.append(open_row(table, row, self._key, f"audit log {self.path}"))
        return found

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

    def verify(self) -> ChainReport:
        """``verify_log`` of this log with its MAC key and head."""
        if self._mac_key is None:
            raise ProtectionError(f"audit log {self.path} is not chained: there is nothing to verify")
        with self._lock:
            return verify_log(self.path, self._mac_key, self.head_path)

    def check_at_start(self, accept_broken: bool = False) -> ChainReport | None:
        """Verifies a chained log before serving from it (None: not chained, nothing to verify).

        A log that fails raises ``BrokenAuditLog`` naming its findings, unless ``accept_broken``: then the
        decision and the findings are appended as one row (method ``START``, path ``ACCEPTED_BROKEN_PATH``),
        chained like any other, and the head is rewritten to the log as it now stands.
        """
        if self._mac_key is None:
            return None
        report = self.verify()
        if report.intact:
            return report
        findings = "; ".join(str(finding) for finding in report.findings)
        if not accept_broken:
            raise BrokenAuditLog(
                f"audit log {self.path} fails verification: {findings}. Inspect it with "
                f"`python -m experiments.audit_log verify --db {self.path} --head {self.head_path} "
                "--mac-key-file FILE` (or --mac-key-env VAR); to serve from it anyway, set "
                "serve.accept_broken_audit_log=true (the decision is logged)",
                report,
            )
        self.record(
            AuditEntry(
                request_id=secrets.token_hex(8),
                time=time.time(),
                key_id=None,
                role=None,
                method="START",
                path=ACCEPTED_BROKEN_PATH,
                input_digest=None,
                rows=0,
                outcome="ok",
                status=0,
                reason=f"serve.accept_broken_audit_log=true: {findings}"[:4000],
            )
        )
        return report

    def close(self) -> None:
        with self._lock:
            self._connection.close()
