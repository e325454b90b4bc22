"""Quotas and rate limits shared by several server processes, through the audit log's SQLite database.

Each worker of ``serve.workers`` admits a batch in one ``BEGIN IMMEDIATE`` transaction: it reads the key's
row of the ``shared_admission`` table (rows admitted so far, the token bucket's tokens and time), runs the
server's own admission defenses on that slice (``defenses.budget`` then ``defenses.rate_limit``, as
``throttle.server_admission`` chains them), and writes the key's new row before committing. SQLite lets one
writer in at a time across processes, so two workers never admit against the same count: a quota is exact
however the requests are spread. The answer is computed after the commit; a batch the victim then fails to
answer is refunded (its rows and tokens given back), so a failed batch costs nothing, as with one process.

The table is reset from the audit log's served rows when the server starts, so a spent quota stays spent.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from heistlab.defenses.base import Request, Verdict
from heistlab.defenses.budget import BudgetState
from heistlab.defenses.rate_limit import Bucket, BucketState
from heistlab.serving.audit import immediate_transaction
from heistlab.serving.throttle import real_clock_verdict, server_admission

SCHEMA = """
CREATE TABLE IF NOT EXISTS shared_admission (
    key_id TEXT PRIMARY KEY,
    admitted INTEGER NOT NULL DEFAULT 0,
    tokens REAL,
    at REAL
);
"""


class SharedAdmission:
    """``serve.quota`` and ``serve.rate``/``serve.burst`` per key, kept in the SQLite file at ``path``.

    quota: rows one key is ever admitted (None: no quota). rate, burst: the token bucket (None rate: none;
    None burst: ``ceil(rate)``). The rows' count and the bucket are the states of ``defenses.budget`` and
    ``defenses.rate_limit`` for one key, so the rules are theirs.
    """

    def __init__(self, path: Path | str, quota: int | None, rate: float | None, burst: int | None):
        self.path, self.quota, self.rate = Path(path), quota, rate
        self.burst = burst if burst is not None or rate is None else max(1, math.ceil(rate))
        self.admission, _ = server_admission(quota, rate, self.burst, {})
        self._lock = threading.Lock()  # one connection, used by the worker's threads one at a time
        self._connection = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._connection.execute("PRAGMA busy_timeout=30000")
        self._connection.executescript(SCHEMA)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock, immediate_transaction(self._connection):
            yield

    def reset(self, spent: Mapping[str, int]) -> None:
        """Starts every key from the rows the audit log says it was served (buckets full again)."""
        with self._transaction():
            self._connection.execute("DELETE FROM shared_admission")
            self._connection.executemany(
                "INSERT INTO shared_admission (key_id, admitted) VALUES (?, ?)", sorted(spent.items())
            )

    def _slice(self, key_id: str) -> tuple[int, Bucket | None]:
        row = self._connection.execute(
            "SELECT admitted, tokens, at FROM shared_admission WHERE key_id = ?", (key_id,)
        ).fetchone()
        if row is None:
            return 0, None
        return int(row[0]), None if row[1] is None else Bucket(float(row[1]), float(row[2]))

    def _states(self, key_id: str, admitted: int, bucket: Bucket | None) -> tuple:
        states = []
        if self.quota is not None:
            states.append(BudgetState(admitted={key_id: admitted}, total=admitted))
        if self.rate is not None:
            states.append(BucketState(buckets={} if bucket is None else {key_id: bucket}))
        return tuple(states)

    def _store(self, key_id: str, states: tuple, admitted: int) -> None:
        bucket = None
        for state in states:
            if isinstance(state, BudgetState):
                admitted = state.admitted[key_id]
            elif isinstance(state, BucketState):
                bucket = state.buckets.get(key_id)
        self._connection.execute(
            "INSERT INTO shared_admission (key_id, admitted, tokens, at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (key_id) DO UPDATE SET admitted = excluded.admitted, tokens = excluded.tokens, "
            "at = excluded.at",
            (
                key_id,
                admitted,
                None if bucket is None else bucket.tokens,
                None if bucket is None else bucket.at,
            ),
        )

    def admit(self, key_id: str, rows: int, now: float) -> tuple[Verdict, int | None]:
        """The verdict on ``rows`` more for ``key_id`` at ``now`` (real seconds), committed when admitted,
        and the rows the key has left after it (None: no quota)."""
        if self.admission is None:
            return Verdict(admitted=True, delay=0.0), None
        with self._transaction():
            admitted, bucket = self._slice(key_id)
            verdict, states = self.admission.admit(
                self._states(key_id, admitted, bucket), Request(key_id, rows, now)
            )
            verdict = real_clock_verdict(verdict)
            if verdict.admitted:
                admitted += rows
                self._store(key_id, states, admitted)
        return verdict, None if self.quota is None else max(0, self.quota - admitted)

    def refund(self, key_id: str, rows: int) -> None:
        """Gives back an admitted batch that was not answered: its rows, and its tokens up to the burst."""
        with self._transaction():
            admitted, bucket = self._slice(key_id)
            tokens = None if bucket is None else min(float(self.burst), bucket.tokens + rows)
            self._connection.execute(
                "UPDATE shared_admission SET admitted = ?, tokens = ? WHERE key_id = ?",
                (max(0, admitted - rows), tokens, key_id),
            )

    def remaining(self, key_id: str) -> int | None:
        if self.quota is None:
            return None
        with self._lock:
            admitted, _ = self._slice(key_id)
        return max(0, self.quota - admitted)

    def close(self) -> None:
        with self._lock:
            self._connection.close()
