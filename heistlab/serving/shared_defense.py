"""The defense chain's state shared by several server processes, through the audit log's SQLite database.

A stateful defense (PRADA's per-key query histories, DAWN's watermark records, feature squeezing's tallies)
must see each key's whole stream, whichever worker of ``serve.workers`` the kernel hands a connection to. The
state is one pytree (``Defense.init()`` and what ``apply`` returns), so the workers keep one copy of it in
the ``shared_defense`` table: one row holding the serialised state and a version number. A worker answers a
batch inside one ``BEGIN IMMEDIATE`` transaction: it reads the version, decodes the stored state only if the
version moved since it last wrote or read it, runs the defense (through the prediction API) on it, and
writes the new state with the next version before committing. SQLite lets one writer in at a time across
processes, so the batches of all workers go through the defense one after another, exactly as in one
process: the same stream, in the same order, raises PRADA's alarm at the same query.

Chains whose state cannot change (every member built by ``defenses.stateless``: rounding, noise, top-k...)
are not synchronised at all, so their workers stay parallel (``is_stateless``).

The state is serialised with msgpack and a small closed set of types (``encode_tree``): None, bool, int,
float, str, bytes, lists, tuples, mappings, NamedTuples of modules already imported, and numpy arrays (jax
arrays are stored as numpy arrays). Decoding never runs code from the database (no pickle): a NamedTuple is
rebuilt only from a class already loaded in the worker.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import msgpack
import numpy as np

from defenses.base import Defense, EmptyState, State

SCHEMA = """
CREATE TABLE IF NOT EXISTS shared_defense (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    version INTEGER NOT NULL,
    state BLOB
);
"""
TUPLE, NAMED_TUPLE, ARRAY = 1, 2, 3  # msgpack extension codes
Result = TypeVar("Result")


class ServingState(NamedTuple):
    """What the workers share about the defense: its state, the batches served (each batch's PRNG key is
    folded from this count), the requests served per key (the monitoring cadence) and the alarms already
    raised per key (so that each is raised once, not once per worker)."""

    defense: State
    batches: int = 0
    requests: Mapping[str, int] = {}
    raised: Mapping[str, tuple[str, ...]] = {}


def is_stateless(state: State) -> bool:
    """Whether a defense state can never change: ``EmptyState``, or a tuple (a chain) of such states."""
    if isinstance(state, EmptyState):
        return True
    return type(state) is tuple and all(is_stateless(inner) for inner in state)


def _encode(value: Any) -> msgpack.ExtType:
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        kind = type(value)
        payload = [kind.__module__, kind.__qualname__, list(value)]
        return msgpack.ExtType(NAMED_TUPLE, _pack(payload))
    if isinstance(value, tuple):
        return msgpack.ExtType(TUPLE, _pack(list(value)))
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, np.generic | np.ndarray) or type(value).__module__.startswith("jax"):
        array = np.asarray(value)
        if array.dtype.kind not in "biufc":
            raise TypeError(f"cannot share a defense state array of dtype {array.dtype}: numbers only")
        payload = [array.dtype.str, list(array.shape), np.ascontiguousarray(array).tobytes()]
        return msgpack.ExtType(ARRAY, _pack(payload))
    raise TypeError(
        f"cannot share a defense state holding a {type(value).__qualname__}: the shared state takes None, "
        "bool, int, float, str, bytes, lists, tuples, NamedTuples, mappings and numpy or jax arrays"
    )


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, default=_encode, use_bin_type=True, strict_types=True)


def _named_tuple_class(module: str, qualname: str) -> type:
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not (isinstance(found, type) and issubclass(found, tuple) and hasattr(found, "_fields")):
        raise ValueError(f"the shared defense state names {module}.{qualname}, not a loaded NamedTuple")
    return found


def _decode(code: int, data: bytes) -> Any:
    payload = _unpack(data)
    if code == TUPLE:
        return tuple(payload)
    if code == NAMED_TUPLE:
        module, qualname, fields = payload
        return _named_tuple_class(module, qualname)._make(fields)
    if code == ARRAY:
        dtype, shape, raw = payload
        array = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
        return array[()] if array.ndim == 0 else array
    raise ValueError(f"the shared defense state holds an unknown msgpack extension {code}")


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_decode, raw=False, strict_map_key=False)


def encode_tree(tree: Any) -> bytes:
    """``tree`` as bytes; ``TypeError`` naming a value of a type the shared state does not take."""
    return _pack(tree)


def decode_tree(data: bytes) -> Any:
    """The tree ``encode_tree`` encoded (arrays come back as numpy arrays, mappings as dicts)."""
    return _unpack(data)


def store_for(path: Path | str, defense: Defense) -> DefenseStateStore | None:
    """The shared store for ``defense``'s state in the SQLite file at ``path``; None for a stateless chain,
    whose workers need no synchronisation."""
    initial = ServingState(defense.init())
    return None if is_stateless(initial.defense) else DefenseStateStore(path, initial)


def reset_shared_state(path: Path | str) -> None:
    """Starts every worker from its defense's ``init()`` again (the server's start), under a new version."""
    with contextlib.closing(sqlite3.connect(path, timeout=30.0, isolation_level=None)) as connection:
        connection.execute("PRAGMA busy_timeout=30000")
        connection.executescript(SCHEMA)
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(
            "INSERT INTO shared_defense (id, version, state) VALUES (0, 1, NULL) "
            "ON CONFLICT (id) DO UPDATE SET version = version + 1, state = NULL"
        )
        connection.execute("COMMIT")


class DefenseStateStore:
    """One shared ``ServingState`` in the SQLite file at ``path``, updated one transaction at a time.

    initial: the state while the table holds none (a fresh start: ``ServingState(defense.init())``).
    ``loads`` and ``stores`` count the states decoded and written by this store (the synchronisation's cost).
    """

    def __init__(self, path: Path | str, initial: ServingState):
        self.path, self.initial = Path(path), initial
        encode_tree(initial)  # a state the store cannot take is refused at start-up, not on a request
        self.loads = self.stores = 0
        self.stored_bytes = 0
        self._lock = threading.Lock()  # one connection, used by the worker's threads one at a time
        self._connection = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._connection.execute("PRAGMA busy_timeout=30000")
        # No fsync per commit (the audit log's WAL database stays consistent): the state starts afresh at
        # every server start, so a power cut loses nothing it would have kept.
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.executescript(SCHEMA)
        self._version: int | None = None
        self._value = initial

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise
        self._connection.execute("COMMIT")

    def _stored_version(self) -> int:
        row = self._connection.execute("SELECT version FROM shared_defense WHERE id = 0").fetchone()
        return 0 if row is None else int(row[0])

    def update(self, step: Callable[[ServingState], tuple[Result, ServingState]]) -> Result:
        """Runs ``step`` on the newest shared state and stores the state it returns, in one transaction.

        ``step`` runs while every other worker waits for the transaction; if it raises, nothing is stored.
        A state ``step`` returns unchanged (the same object) is not written again.
        """
        with self._lock:
            with self._transaction():
                version = self._stored_version()
                if version != self._version:
                    row = self._connection.execute("SELECT state FROM shared_defense WHERE id = 0").fetchone()
                    stored = None if row is None else row[0]
                    self._value = self.initial if stored is None else decode_tree(stored)
                    self._version = version
                    self.loads += 1
                result, value = step(self._value)
                if value is not self._value:
                    data = encode_tree(value)
                    self._connection.execute(
                        "INSERT INTO shared_defense (id, version, state) VALUES (0, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET version = excluded.version, state = excluded.state",
                        (version + 1, data),
                    )
                    version += 1
                    self.stores += 1
                    self.stored_bytes = len(data)
            self._value, self._version = value, version  # only once committed
        return result

    def close(self) -> None:
        with self._lock:
            self._connection.close()
