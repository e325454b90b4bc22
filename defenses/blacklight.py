"""Blacklight: stateful detection of query-based black-box attacks by hashed input segments (Li, Shan, Wenger,
Zhang, Zheng and Zhao, "Blacklight: Scalable Defense for Neural Networks against Query-Based Black-Box
Attacks", USENIX Security 2022).

A query-based attack (Square, HopSkipJump) sends thousands of inputs that differ from each other only a
little; natural inputs almost never do. Blacklight turns each query into a fingerprint: its pixels are
quantised to a coarse grid (``quantisation_step`` on the 0-255 scale), the flattened result is cut into
overlapping windows (``window`` values, every ``stride``), each window is hashed with SHA-256, and the
``fingerprint_size`` hashes that sort first are kept (a pseudo-random but fixed sample of the windows, so
similar inputs keep similar samples). One table holds the hashes of every query the API has seen, whoever sent
it: the table is per API, not per client, so an attacker who spreads its queries over Sybil keys still meets
its own earlier queries. A query whose fingerprint shares at least ``match_threshold`` hashes with one stored
query is flagged. Every query is stored, flagged or not, and none is evicted: the table grows with the
API's traffic.

The check needs only the input, so it runs at admission, before the victim sees the query. ``action`` says
what a flag does: ``log`` (nothing; reported only), ``refuse`` (the flagged request is refused with reason
``blacklight match``; the client may send other queries, as in Feng et al.'s evaluation of stateful
defenses), or ``switch`` (the flagged rows are answered through ``fallback``).

Semantics follow the public Python implementation in the stateful-defense evaluation code of Feng et al.
(2023): pixels times 255, rounded to the nearest multiple of the step, windows over the flattened input,
duplicate window hashes kept once, the top hashes by a fixed order, a match counted against each stored query.
Differences: no secret salt is added to the pixels (that code's option, off by default); flagged queries are
always stored (an option there); the kept hashes are the largest SHA-256 digests, where it keeps the largest
reversed hexadecimal digests (an equally arbitrary fixed order); windows start at ``0, stride, 2 * stride...``
while they fit (the same windows at stride 1).

The paper's CIFAR-10 setting is a quantisation step of 50, windows of 20 values at stride 1, the top 50 hashes
and a threshold of 25 shared hashes, on 3,072 values per input. An 8x8 digit has 64 values; its scaled
defaults are in ``configs/defense/blacklight.yaml``, which says how they were chosen.

A known limit, by design: any exact or near re-send of an image already in the table is flagged, whoever sent
it first. Honest clients that send the same images (heistlab's benign clients all stream the same test
split) flag each other.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np

from heistlab.defenses.base import ADMIT, DefenderData, Defense, Evidence, QueryContext, Request, Verdict

ACTIONS = ("log", "refuse", "switch")
REFUSAL_REASON = "blacklight match"
# Distinct quantised rows whose fingerprints a Blacklight instance remembers before starting afresh: each
# costs its row's SHA-256 and a fingerprint of ``fingerprint_size`` 32-byte digests (about 2 KB at 50), so
# the memo stays under about 50 MB whatever the input size.
MEMO_LIMIT = 20_000
# Window values laid out at once when fingerprinting a batch (int16; bounds the memory of large inputs).
WINDOW_VALUES_PER_BLOCK = 1 << 23


class FirstFlag(NamedTuple):
    """When a client was first flagged: its query count then (the flagged query included), every client's
    count at that moment, and how many hashes the flagged query shared with its closest stored query."""

    queries: int
    counts: Mapping[str, int]
    shared: int


class ClientRecord(NamedTuple):
    queries: int
    flagged: int
    first_flag: FirstFlag | None


class HashTable:
    """The distinct fingerprints stored so far, indexed by hash; append-only.

    A query's closest stored query shares as many hashes as the closest stored distinct fingerprint, so a
    re-sent fingerprint is only counted: ``known`` numbers the distinct fingerprints, ``first_query`` says
    which query first stored each, ``ids`` maps a hash to the distinct fingerprints holding it, and ``size``
    counts every stored query. A ``BlacklightState`` sees the first ``stored`` queries of its table; when a
    state whose table has moved on is used again, ``for_state`` gives it a copy cut back to its own view.
    """

    def __init__(self) -> None:
        self.ids: dict[bytes, array] = {}
        self.known: dict[tuple[bytes, ...], int] = {}
        self.first_query = array("q")
        self.size = 0

    def for_state(self, stored: int) -> HashTable:
        if stored == self.size:
            return self
        kept = [index for index, query in enumerate(self.first_query) if query < stored]
        renumbered = {old: new for new, old in enumerate(kept)}
        copy = HashTable()
        copy.first_query = array("q", (self.first_query[old] for old in kept))
        copy.known = {prints: renumbered[old] for prints, old in self.known.items() if old in renumbered}
        for digest, ids in self.ids.items():
            ids_kept = array("q", (renumbered[old] for old in ids if old in renumbered))
            if ids_kept:
                copy.ids[digest] = ids_kept
        copy.size = stored
        return copy

    def closest(self, fingerprint: tuple[bytes, ...]) -> int:
        """The most hashes of ``fingerprint`` that any one stored query shares (0 when none)."""
        if fingerprint in self.known:
            return len(fingerprint)
        hits = [holders for holders in map(self.ids.get, fingerprint) if holders is not None]
        if not hits:
            return 0
        ids = np.frombuffer(b"".join(hits), np.int64)
        if len(self.first_query) > max(1 << 16, 16 * len(ids)):
            return int(np.unique(ids, return_counts=True)[1].max())
        return int(np.bincount(ids).max())

    def add(self, fingerprint: tuple[bytes, ...]) -> None:
        self.add_batch([fingerprint], np.zeros(1, np.int64))

    def add_batch(self, fingerprints: list[tuple[bytes, ...]], groups: np.ndarray) -> np.ndarray:
        """Stores a batch's queries in order, row ``i`` having fingerprint ``fingerprints[groups[i]]``, and
        returns per row the most hashes it shares with one query stored before it (earlier rows of the batch
        included): what ``closest`` then ``add`` row by row gives. Only a fingerprint's first row is checked,
        every later one meets its identical twin."""
        shared = np.array([len(prints) for prints in fingerprints], np.int64)[groups]
        first_rows = (
            np.sort(np.unique(groups, return_index=True)[1]) if len(groups) > 1 else range(len(groups))
        )
        for row in first_rows:
            prints = fingerprints[groups[row]]
            if prints in self.known:
                continue
            shared[row] = self.closest(prints)
            distinct = len(self.first_query)
            self.known[prints] = distinct
            self.first_query.append(self.size + int(row))
            for digest in prints:
                holders = self.ids.get(digest)
                if holders is None:
                    self.ids[digest] = array("q", (distinct,))
                else:
                    holders.append(distinct)
        self.size += len(groups)
        return shared


class BlacklightState(NamedTuple):
    table: HashTable
    stored: int
    clients: Mapping[str, ClientRecord]
    # The rows of the request just admitted that were flagged (for action=switch); None before any.
    pending_flags: np.ndarray | None
    fallback_state: object


def fingerprint(
    row: np.ndarray, quantisation_step: float, window: int, stride: int, size: int
) -> tuple[bytes, ...]:
    """Blacklight's fingerprint of one input with values in [0, 1]: the ``size`` largest distinct SHA-256
    digests of the quantised input's windows."""
    prints, _ = fingerprints(np.reshape(row, (1, -1)), quantisation_step, window, stride, size)
    return prints[0]


def fingerprints(
    rows: np.ndarray,
    quantisation_step: float,
    window: int,
    stride: int,
    size: int,
    memo: dict[bytes, tuple[bytes, ...]] | None = None,
) -> tuple[list[tuple[bytes, ...]], np.ndarray]:
    """``fingerprint`` of every row of a ``(batch, values)`` array, as the distinct fingerprints and each
    row's index into them. Identical quantised rows are fingerprinted once and identical windows (across the
    whole batch) hashed once; ``memo`` (quantised row bytes -> fingerprint, for these settings) keeps the
    fingerprints of rows seen in earlier batches (keyed by the SHA-256 of the row's bytes, so that its size
    does not grow with the input's), and is filled with the new ones."""
    levels = np.round(np.asarray(rows, np.float64) * 255.0 / quantisation_step) * quantisation_step
    quantised = np.ascontiguousarray(levels.astype(np.int16))
    if window > quantised.shape[1]:
        return [()], np.zeros(len(quantised), np.int64)
    distinct_rows, groups = unique_rows(quantised)
    memo = {} if memo is None else memo
    buffer, step = distinct_rows.tobytes(), distinct_rows.itemsize * distinct_rows.shape[1]
    keys = [hashlib.sha256(buffer[start : start + step]).digest() for start in range(0, len(buffer), step)]
    missing = [index for index, key in enumerate(keys) if key not in memo]
    windows_per_row = (quantised.shape[1] - window) // stride + 1
    block = max(1, WINDOW_VALUES_PER_BLOCK // (windows_per_row * window))
    for start in range(0, len(missing), block):
        chosen = missing[start : start + block]
        computed = fingerprint_rows(distinct_rows[chosen], window, stride, size)
        memo.update(zip((keys[index] for index in chosen), computed, strict=True))
    return [memo[key] for key in keys], groups


def fingerprint_rows(quantised: np.ndarray, window: int, stride: int, size: int) -> list[tuple[bytes, ...]]:
    """The fingerprint of each row of quantised inputs, ``(rows, values)`` int16 with ``values >= window``."""
    if len(quantised) == 1:
        return [row_fingerprint(quantised[0], window, stride, size)]
    windows = np.lib.stride_tricks.sliding_window_view(quantised, window, axis=1)[:, ::stride]
    window_codes, digests = hashed_windows(windows)
    words = np.frombuffer(b"".join(digests), ">u8").reshape(len(digests), -1)
    descending = np.lexsort(words.T[::-1])[::-1]
    by_rank = np.empty(len(digests) + 1, object)
    by_rank[:-1] = digests
    by_rank[:-1] = by_rank[descending]
    ranks = np.empty(len(digests), np.int64)
    ranks[descending] = np.arange(len(digests))
    ordered = np.sort(ranks[window_codes], axis=1)
    repeated = np.zeros(ordered.shape, bool)
    repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    ordered[repeated] = len(digests)
    kept = np.sort(ordered, axis=1)[:, :size]
    lengths = (kept < len(digests)).sum(axis=1).tolist()
    columns = kept.shape[1]
    return [
        tuple(row) if length == columns else tuple(row[:length])
        for row, length in zip(by_rank[kept].tolist(), lengths, strict=True)
    ]


def row_fingerprint(quantised: np.ndarray, window: int, stride: int, size: int) -> tuple[bytes, ...]:
    """The fingerprint of one quantised input, window by window (cheaper than the batched path for one)."""
    starts = range(0, len(quantised) - window + 1, stride)
    digests = {hashlib.sha256(quantised[start : start + window].tobytes()).digest() for start in starts}
    return tuple(sorted(digests, reverse=True)[:size])


def unique_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of a 2-D array (compared byte for byte) and each row's index into them."""
    if len(values) < 2:
        return values, np.zeros(len(values), np.int64)
    as_bytes = np.ascontiguousarray(values).view(np.uint8).reshape(len(values), -1)
    padding = -as_bytes.shape[1] % 8
    if padding:
        as_bytes = np.pad(as_bytes, ((0, 0), (0, padding)))
    words = np.ascontiguousarray(as_bytes).view(np.uint64)
    order = np.lexsort(words.T[::-1])
    ordered = words[order]
    starts = np.ones(len(order), bool)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    groups = np.empty(len(order), np.int64)
    groups[order] = np.cumsum(starts) - 1
    return values[order[starts]], groups


def hashed_windows(windows: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
    """SHA-256 of each distinct window of a ``(rows, windows, window)`` array: the digests, and each
    window's index into them."""
    rows, count, width = windows.shape
    flat = np.ascontiguousarray(windows).reshape(rows * count, width)
    distinct, codes = unique_rows(flat)
    buffer = distinct.tobytes()
    step = distinct.dtype.itemsize * width
    digests = [hashlib.sha256(buffer[start : start + step]).digest() for start in range(0, len(buffer), step)]
    return codes.reshape(rows, count), digests


def blacklight(
    quantisation_step: float = 50.0,
    window: int = 20,
    stride: int = 1,
    fingerprint_size: int = 50,
    match_threshold: int = 25,
    action: str = "log",
    fallback: Defense | None = None,
    defender: DefenderData | None = None,
) -> Defense:
    """Builds Blacklight's detector (the factory defaults are the paper's CIFAR-10 setting).

    quantisation_step: grid step on the 0-255 pixel scale (inputs are in [0, 1] and multiplied by 255).
    window, stride: windows of ``window`` flattened values starting every ``stride`` values.
    fingerprint_size: how many window hashes each query keeps; match_threshold: how many of them a query
        must share with one stored query to be flagged.
    action: ``log``, ``refuse`` or ``switch`` (see the module docstring); ``fallback``: the defense that
        answers flagged rows under ``switch`` (for example ``label_only()``), and only then.
    defender: when given, its ``input_shape`` is checked against ``window`` and ``match_threshold`` before
        anything runs.

    ``report`` gives, over the extraction attacker's identities: ``detected`` and ``queries_to_detection``
    (queries those identities had sent together when the first of them was flagged, the flagged one
    included; None without a flag); the same over the evasion attacker as ``evasion_detected`` and
    ``evasion_queries_to_detection``; ``false_positive_rate`` (fraction of benign clients flagged at least
    once; None without benign clients); and the flagged share of each side's queries
    (``blacklight_attack_flag_rate``, ``blacklight_evasion_flag_rate``, ``blacklight_benign_flag_rate``).

    Raises:
      ValueError: naming the argument, if ``quantisation_step`` is not a number in (0, 255], the counts are
        not ints >= 1, ``match_threshold`` exceeds ``fingerprint_size``, ``action`` is unknown, ``fallback``
        is missing for ``switch`` (or given for another action, or not a response-side Defense), or the
        defender's inputs hold fewer windows than ``match_threshold``.
    """
    check_arguments(quantisation_step, window, stride, fingerprint_size, match_threshold, action, fallback)
    if defender is not None:
        check_input_size(int(np.prod(defender.input_shape)), window, stride, match_threshold)
    # Fingerprints depend on the quantised row alone, so every state of this defense may share them.
    memo: dict[bytes, tuple[bytes, ...]] = {}

    def init() -> BlacklightState:
        fallback_state = fallback.init() if fallback is not None else None
        return BlacklightState(HashTable(), 0, {}, None, fallback_state)

    def admit(state: BlacklightState, request: Request) -> tuple[Verdict, BlacklightState]:
        if request.inputs is None:
            raise ValueError("blacklight: admission needs the request's inputs; the API did not pass them")
        table = state.table.for_state(state.stored)
        record = state.clients.get(request.client, ClientRecord(0, 0, None))
        counts = {name: other.queries for name, other in state.clients.items()}
        rows = np.asarray(request.inputs).reshape(len(request.inputs), -1)
        if len(memo) > MEMO_LIMIT:
            memo.clear()
        prints, groups = fingerprints(rows, quantisation_step, window, stride, fingerprint_size, memo)
        shared = table.add_batch(prints, groups)
        flags = shared >= match_threshold
        if flags.any() and record.first_flag is None:
            index = int(np.argmax(flags))
            queries = record.queries + index + 1
            first = FirstFlag(queries, {**counts, request.client: queries}, int(shared[index]))
            record = record._replace(first_flag=first)
        record = record._replace(
            queries=record.queries + len(rows), flagged=record.flagged + int(flags.sum())
        )
        state = state._replace(
            table=table,
            stored=table.size,
            clients={**state.clients, request.client: record},
            pending_flags=flags,
        )
        if action == "refuse" and flags.any():
            return Verdict(admitted=False, delay=0.0, reason=REFUSAL_REASON), state
        return ADMIT, state

    def apply(probs: jax.Array, state: BlacklightState, context: QueryContext):
        flags = state.pending_flags
        if action != "switch" or flags is None or len(flags) != len(probs) or not flags.any():
            return probs, state._replace(pending_flags=None)
        rows = np.flatnonzero(flags)
        switched_context = context._replace(inputs=np.asarray(context.inputs)[rows])
        answers, fallback_state = fallback.apply(
            np.asarray(probs)[rows], state.fallback_state, switched_context
        )
        served = np.array(probs, copy=True)
        served[rows] = np.asarray(answers, dtype=served.dtype)
        return served, state._replace(pending_flags=None, fallback_state=fallback_state)

    def report(state: BlacklightState, evidence: Evidence) -> dict:
        found = detection_report(state.clients, evidence.attackers, evidence.benign)
        evasion = detection_report(state.clients, evidence.evaders, evidence.benign)
        found.update(
            evasion_detected=evasion["detected"],
            evasion_queries_to_detection=evasion["queries_to_detection"],
            blacklight_attack_flag_rate=flag_rate(state.clients, evidence.attackers),
            blacklight_evasion_flag_rate=flag_rate(state.clients, evidence.evaders),
            blacklight_benign_flag_rate=flag_rate(state.clients, evidence.benign),
        )
        if fallback is not None and fallback.report is not None:
            found.update(fallback.report(state.fallback_state, evidence))
        return found

    return Defense(init=init, apply=apply, admit=admit, report=report, host=True)


def detection_report(
    clients: Mapping[str, ClientRecord], attackers: tuple[str, ...], benign: tuple[str, ...]
) -> dict:
    flags = [clients[name].first_flag for name in attackers if name in clients]
    flags = [flag for flag in flags if flag is not None]
    first = min(flags, key=lambda flag: sum(flag.counts.values()), default=None)
    benign_flagged = [name for name in benign if name in clients and clients[name].flagged > 0]
    return {
        "detected": first is not None,
        "queries_to_detection": None
        if first is None
        else sum(first.counts.get(name, 0) for name in attackers),
        "false_positive_rate": len(benign_flagged) / len(benign) if benign else None,
    }


def flag_rate(clients: Mapping[str, ClientRecord], names: tuple[str, ...]) -> float | None:
    """Flagged queries over checked queries of ``names``; None when they sent none."""
    records = [clients[name] for name in names if name in clients]
    sent = sum(record.queries for record in records)
    return sum(record.flagged for record in records) / sent if sent else None


def check_arguments(quantisation_step, window, stride, fingerprint_size, match_threshold, action, fallback):
    if (
        isinstance(quantisation_step, bool)
        or not isinstance(quantisation_step, int | float)
        or not 0 < quantisation_step <= 255
    ):
        raise ValueError(
            "blacklight: quantisation_step must be a number in (0, 255] (on the 0-255 pixel scale), "
            f"got {quantisation_step!r}"
        )
    for name, value in (("window", window), ("stride", stride), ("fingerprint_size", fingerprint_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"blacklight: {name} must be an int >= 1, got {value!r}")
    if (
        isinstance(match_threshold, bool)
        or not isinstance(match_threshold, int)
        or not 1 <= match_threshold <= fingerprint_size
    ):
        raise ValueError(
            f"blacklight: match_threshold must be an int in [1, fingerprint_size={fingerprint_size}], "
            f"got {match_threshold!r}"
        )
    if action not in ACTIONS:
        raise ValueError(f"blacklight: action must be one of {', '.join(ACTIONS)}; got {action!r}")
    if action == "switch" and not isinstance(fallback, Defense):
        raise ValueError(f"blacklight: action 'switch' needs fallback to be a Defense, got {fallback!r}")
    if action != "switch" and fallback is not None:
        raise ValueError(f"blacklight: fallback is only used with action 'switch', got action {action!r}")
    if fallback is not None and (fallback.preprocess is not None or fallback.augment_training is not None):
        raise ValueError("blacklight: fallback must act on answers or admission, not on inputs or the model")


def check_input_size(values: int, window: int, stride: int, match_threshold: int) -> None:
    """Refuses settings under which no query of ``values`` values could ever be flagged."""
    windows = 0 if window > values else (values - window) // stride + 1
    if windows < match_threshold:
        raise ValueError(
            f"blacklight: inputs of {values} values hold {windows} windows of {window} at stride {stride}, "
            f"fewer than match_threshold={match_threshold}, so no query could ever be flagged; lower window, "
            "stride or match_threshold"
        )
