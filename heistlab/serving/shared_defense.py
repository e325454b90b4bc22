"""The defense chain's state shared by several server processes, through the audit log's SQLite database.

A stateful defense (PRADA's per-key query histories, DAWN's watermark records, feature squeezing's tallies)
must see each key's whole stream, whichever worker of ``serve.workers`` the kernel hands a connection to. The
state is one pytree (``Defense.init()`` and what ``apply`` returns), so the workers keep one copy of it in
the database, under a version number. A worker answers a batch inside one ``BEGIN IMMEDIATE`` transaction:
it reads the version, decodes the stored state only if the version moved since it last wrote or read it,
runs the defense (through the prediction API) on it, and writes the new state with the next version before
committing. SQLite lets one writer in at a time across processes, so the batches of all workers go through
the defense one after another, exactly as in one process: the same stream, in the same order, raises PRADA's
alarm at the same query.

Only what changed is written. Every value of a mapping in the state (one key's PRADA trace, one class's
growing set) whose encoding takes at least ``CHUNK_MIN_BYTES`` is stored as its own chunk, named by its
BLAKE2b digest, and the state refers to it. Defense states are immutable (``apply`` returns a new state and
keeps the parts it did not change), so a worker remembers, by identity, the chunk each value was stored or
loaded as, encodes only the values that are new, and decodes only the chunks it has not seen: a request
costs about the size of what its batch changed (the requesting key's trace, the classes its rows fell in),
not of every key's history. Chunks no state refers to any more are deleted in the same transaction.

Chains whose state cannot change (every member built by ``defenses.stateless``: rounding, noise, top-k...)
are not synchronised at all, so their workers stay parallel (``is_stateless``).

The state is serialised with msgpack and a small closed set of types: None, bool, int, float, str, bytes,
lists, tuples, mappings, NamedTuples of modules already imported, and numpy arrays of numbers (jax arrays
are stored as numpy arrays). Decoding never runs code from the database (no pickle): a NamedTuple is rebuilt
only from a class already loaded in the worker. Anyone who can write the database can still rewrite the
state (erase a key's history), as they can its quota rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import msgpack
import numpy as np

from heistlab.defenses.base import Defense, EmptyState, State
from heistlab.serving.audit import immediate_transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS shared_defense (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    version INTEGER NOT NULL,
    state BLOB
);
CREATE TABLE IF NOT EXISTS shared_defense_chunks (
    digest BLOB PRIMARY KEY,
    data BLOB NOT NULL
);
"""
TUPLE, NAMED_TUPLE, ARRAY, CHUNK = 1, 2, 3, 4  # msgpack extension codes
CHUNK_MIN_BYTES = 4096
SCALARS = (type(None), bool, int, float, str, bytes)
Result = TypeVar("Result")


class ServingState(NamedTuple):
    """What the workers share about the defense: its state, the batches served (each batch's PRNG key is
    folded from this count), the requests served per key (the monitoring cadence) and the alarms already
    raised per key (so that each is raised once, not once per worker)."""

    defense: State
    batches: int = 0
    requests: Mapping[str, int] = {}
    raised: Mapping[str, tuple[str, ...]] = {}


class Chunk(NamedTuple):
    """A value stored on its own: the value, its digest, the digests of the chunks inside it, its size."""

    value: Any
    digest: bytes
    children: tuple[bytes, ...]
    size: int


def is_stateless(state: State) -> bool:
    """Whether a defense state can never change: ``EmptyState``, or a tuple (a chain) of such states."""
    if isinstance(state, EmptyState):
        return True
    return type(state) is tuple and all(is_stateless(inner) for inner in state)


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True, strict_types=True)


def _packable(value: Any, entry: Callable[[Any], Any]) -> Any:
    """``value`` in msgpack's own types, each value of a mapping in it through ``entry``."""
    kind = type(value)
    if kind in SCALARS:
        return value
    if kind is list:
        return [_packable(item, entry) for item in value]
    if isinstance(value, tuple) and hasattr(kind, "_fields"):
        fields = [_packable(item, entry) for item in value]
        return msgpack.ExtType(NAMED_TUPLE, _pack([kind.__module__, kind.__qualname__, fields]))
    if kind is tuple:
        return msgpack.ExtType(TUPLE, _pack([_packable(item, entry) for item in value]))
    if isinstance(value, Mapping):
        return {_inline(key): entry(item) for key, item in value.items()}
    if isinstance(value, np.generic | np.ndarray) or kind.__module__.startswith("jax"):
        array = np.asarray(value)
        if array.dtype.kind not in "biufc":
            raise TypeError(f"cannot share a defense state array of dtype {array.dtype}: numbers only")
        payload = [array.dtype.str, list(array.shape), np.ascontiguousarray(array).tobytes()]
        return msgpack.ExtType(ARRAY, _pack(payload))
    raise TypeError(
        f"cannot share a defense state holding a {kind.__qualname__}: the shared state takes None, bool, "
        "int, float, str, bytes, lists, tuples, NamedTuples, mappings and numpy or jax arrays of numbers"
    )


def _inline(value: Any) -> Any:
    return _packable(value, _inline)


def _named_tuple_class(module: str, qualname: str) -> type:
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not (isinstance(found, type) and issubclass(found, tuple) and hasattr(found, "_fields")):
        raise ValueError(f"the shared defense state names {module}.{qualname}, not a loaded NamedTuple")
    return found


def _unpack(data: bytes, chunk: Callable[[bytes], Any]) -> Any:
    """The value ``data`` encodes; ``chunk(digest)`` gives the value of a chunk it refers to."""

    def extension(code: int, payload: bytes) -> Any:
        if code == CHUNK:
            return chunk(payload)
        inner = _unpack(payload, chunk)
        if code == TUPLE:
            return tuple(inner)
        if code == NAMED_TUPLE:
            module, qualname, fields = inner
            return _named_tuple_class(module, qualname)._make(fields)
        if code == ARRAY:
            dtype, shape, raw = inner
            array = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
            return array[()] if array.ndim == 0 else array
        raise ValueError(f"the shared defense state holds an unknown msgpack extension {code}")

    return msgpack.unpackb(data, ext_hook=extension, raw=False, strict_map_key=False)


def _no_chunks(digest: bytes) -> Any:
    raise ValueError("a tree encoded by encode_tree refers to no chunks")


def encode_tree(tree: Any) -> bytes:
    """``tree`` as bytes, in one piece (``TypeError`` naming a value of a type it cannot take)."""
    return _pack(_inline(tree))


def decode_tree(data: bytes) -> Any:
    """The tree ``encode_tree`` encoded (arrays come back as numpy arrays, mappings as dicts)."""
    return _unpack(data, _no_chunks)


def store_for(path: Path | str, defense: Defense) -> DefenseStateStore | None:
    """The shared store for ``defense``'s state in the SQLite file at ``path``; None for a stateless chain,
    whose workers need no synchronisation."""
    initial = ServingState(defense.init())
    if is_stateless(initial.defense):
        return None
    try:
        return DefenseStateStore(path, initial)
    except TypeError as error:
        raise ValueError(f"serve.workers > 1 shares the defense state, and {error}; use one worker") from None


def reset_shared_state(path: Path | str) -> None:
    """Starts every worker from its defense's ``init()`` again (the server's start), under a new version."""
    with contextlib.closing(sqlite3.connect(path, timeout=30.0, isolation_level=None)) as connection:
        connection.execute("PRAGMA busy_timeout=30000")
        connection.executescript(SCHEMA)
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("DELETE FROM shared_defense_chunks")
        connection.execute(
            "INSERT INTO shared_defense (id, version, state) VALUES (0, 1, NULL) "
            "ON CONFLICT (id) DO UPDATE SET version = version + 1, state = NULL"
        )
        connection.execute("COMMIT")


class DefenseStateStore:
    """One shared ``ServingState`` in the SQLite file at ``path``, updated one transaction at a time.

    initial: the state while the database holds none (a fresh start: ``ServingState(defense.init())``).
    ``loads`` and ``stores`` count the states decoded and written by this store; ``written_bytes`` is what
    its last store wrote (the state's root and its new chunks), ``state_bytes`` the size of the whole state
    then, and ``loaded_bytes`` what its last load read (the root and the chunks it did not know).
    """

    def __init__(self, path: Path | str, initial: ServingState):
        self.path, self.initial = Path(path), initial
        encode_tree(initial)  # a state the store cannot take is refused at start-up, not on a request
        self.loads = self.stores = self.written_bytes = self.state_bytes = self.loaded_bytes = 0
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
        self._chunks: dict[bytes, Chunk] = {}  # the chunks the stored state at self._version refers to
        self._by_identity: dict[int, Chunk] = {}

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return immediate_transaction(self._connection)

    def _stored_version(self) -> int:
        row = self._connection.execute("SELECT version FROM shared_defense WHERE id = 0").fetchone()
        return 0 if row is None else int(row[0])

    def _reach(self, chunk: Chunk, reached: dict[bytes, Chunk]) -> None:
        reached[chunk.digest] = chunk
        for child in chunk.children:
            self._reach(self._chunks[child], reached)

    def _load(self) -> tuple[ServingState, dict[bytes, Chunk]]:
        """The stored state and the chunks it refers to, decoding only chunks not already known."""
        row = self._connection.execute("SELECT state FROM shared_defense WHERE id = 0").fetchone()
        if row is None or row[0] is None:
            self.loaded_bytes = 0
            return self.initial, {}
        self.loaded_bytes = len(row[0])
        reached: dict[bytes, Chunk] = {}
        found: list[list[bytes]] = [[]]

        def chunk(digest: bytes) -> Any:
            known = self._chunks.get(digest)
            if known is not None:
                self._reach(known, reached)
            else:
                stored = self._connection.execute(
                    "SELECT data FROM shared_defense_chunks WHERE digest = ?", (digest,)
                ).fetchone()
                if stored is None:
                    raise ValueError(f"the shared defense state refers to a missing chunk {digest.hex()}")
                self.loaded_bytes += len(stored[0])
                found.append([])
                value = _unpack(stored[0], chunk)
                known = reached[digest] = Chunk(value, digest, tuple(found.pop()), len(stored[0]))
            found[-1].append(digest)
            return known.value

        return _unpack(row[0], chunk), reached

    def _encode(self, state: ServingState) -> tuple[bytes, dict[bytes, Chunk], dict[bytes, bytes]]:
        """The state's root, the chunks it refers to, and the bytes of those not stored before."""
        reached: dict[bytes, Chunk] = {}
        new: dict[bytes, bytes] = {}
        found: list[list[bytes]] = [[]]

        def entry(value: Any) -> Any:
            if type(value) in SCALARS:
                return value
            known = self._by_identity.get(id(value))
            if known is None or known.value is not value:
                found.append([])
                packable = _packable(value, entry)
                children = found.pop()
                data = _pack(packable)
                if len(data) < CHUNK_MIN_BYTES:
                    found[-1].extend(children)
                    return packable
                digest = hashlib.blake2b(data, digest_size=16).digest()
                known = Chunk(value, digest, tuple(children), len(data))
                reached[known.digest] = known
                new[known.digest] = data
            else:
                self._reach(known, reached)
            found[-1].append(known.digest)
            return msgpack.ExtType(CHUNK, known.digest)

        return _pack(_packable(state, entry)), reached, new

    def update(self, step: Callable[[ServingState], tuple[Result, ServingState]]) -> Result:
        """Runs ``step`` on the newest shared state and stores the state it returns, in one transaction.

        ``step`` runs while every other worker waits for the transaction; if it raises, nothing is stored.
        A state ``step`` returns unchanged (the same object) is not written again.
        """
        with self._lock:
            with self._transaction():
                version = self._stored_version()
                if version != self._version:
                    self._value, chunks = self._load()
                    self._version, self._chunks = version, chunks
                    self._by_identity = {id(chunk.value): chunk for chunk in chunks.values()}
                    self.loads += 1
                result, value = step(self._value)
                chunks = self._chunks
                if value is not self._value:
                    root, chunks, new = self._encode(value)
                    gone = [(digest,) for digest in self._chunks if digest not in chunks]
                    added = [(digest, new[digest]) for digest in chunks if digest not in self._chunks]
                    self._connection.executemany("DELETE FROM shared_defense_chunks WHERE digest = ?", gone)
                    self._connection.executemany(
                        "INSERT OR IGNORE INTO shared_defense_chunks (digest, data) VALUES (?, ?)", added
                    )
                    self._connection.execute(
                        "INSERT INTO shared_defense (id, version, state) VALUES (0, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET version = excluded.version, state = excluded.state",
                        (version + 1, root),
                    )
                    version += 1
                    self.stores += 1
                    self.written_bytes = len(root) + sum(len(data) for _, data in added)
                    self.state_bytes = len(root) + sum(chunk.size for chunk in chunks.values())
            if chunks is not self._chunks:  # only once committed
                self._chunks = chunks
                self._by_identity = {id(chunk.value): chunk for chunk in chunks.values()}
            self._value, self._version = value, version
        return result

    def close(self) -> None:
        with self._lock:
            self._connection.close()
