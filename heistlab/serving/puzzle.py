"""Hashcash puzzles over HTTP: the served form of the calibrated proof-of-work (Dziedzic et al., "Increasing
the Cost of Model Extraction with Calibrated Proof of Work", ICLR 2022; ``defenses.proof_of_work``).

A prediction request without a solved puzzle is answered ``428 Precondition Required`` with a puzzle: a random
server ``nonce`` and a difficulty ``bits``, bound to the key and to this request (the SHA-256 of its inputs
and requested output). The client finds a ``solution`` such that

    SHA-256("heistlab-pow/1:" + nonce + ":" + key_id + ":" + request + ":" + solution)

starts with ``bits`` zero bits (about ``2 ** bits`` hashes), and sends the same request again with the
headers ``X-PoW-Nonce`` and ``X-PoW-Solution``. The server accepts a nonce once: it is spent by the first
request that presents it, solved or not, and is refused for another key, another request, after it expires,
or when the hash falls short.

The difficulty comes from the proof-of-work defense in the served chain: the key's next per-query puzzle
(``defenses.proof_of_work.next_bits``, which rises with the information the key's answers leaked), plus
``ceil(log2(rows))`` so that a batch costs about as much work as its rows asked one by one.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

PREFIX = "heistlab-pow/1"
ALGORITHM = "sha256-leading-zero-bits"
NONCE_HEADER = "X-PoW-Nonce"
SOLUTION_HEADER = "X-PoW-Solution"
MAX_SOLUTION_CHARS = 64


class Puzzle(NamedTuple):
    """An issued puzzle: what the client must hash, how hard, for which key and request, until when."""

    nonce: str
    bits: int
    key_id: str
    request: str
    expires_at: float

    def public(self, now: float) -> dict:
        """The puzzle as a 428 answer carries it."""
        return {
            "algorithm": ALGORITHM,
            "nonce": self.nonce,
            "bits": self.bits,
            "key_id": self.key_id,
            "request": self.request,
            "expires_in": max(0.0, round(self.expires_at - now, 3)),
            "preimage": f"{PREFIX}:{self.nonce}:{self.key_id}:{self.request}:<solution>",
            "headers": [NONCE_HEADER, SOLUTION_HEADER],
        }


class PuzzleRequired(Exception):
    """The request must carry a solved puzzle: ``puzzle`` is a fresh one, ``reason`` says why it is asked."""

    def __init__(self, reason: str, puzzle: dict):
        super().__init__(reason)
        self.reason, self.puzzle = reason, puzzle


def request_digest(inputs_digest: str, output: str) -> str:
    """What a puzzle is bound to: the request's inputs (their audit digest) and the output it asks for."""
    return hashlib.sha256(f"{inputs_digest}:{output}".encode()).hexdigest()


def puzzle_hash(nonce: str, key_id: str, request: str, solution: str) -> bytes:
    return hashlib.sha256(f"{PREFIX}:{nonce}:{key_id}:{request}:{solution}".encode()).digest()


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def solve(puzzle: Mapping, max_attempts: int = 1 << 32) -> str:
    """A solution to a puzzle as a 428 answer carries it: counts up until the hash has enough zero bits."""
    nonce, key_id, request, bits = puzzle["nonce"], puzzle["key_id"], puzzle["request"], int(puzzle["bits"])
    stem = hashlib.sha256(f"{PREFIX}:{nonce}:{key_id}:{request}:".encode())
    for counter in range(max_attempts):
        candidate = stem.copy()
        candidate.update(str(counter).encode())
        if leading_zero_bits(candidate.digest()) >= bits:
            return str(counter)
    raise RuntimeError(f"no solution to a {bits}-bit puzzle in {max_attempts} attempts")


def batch_bits(per_query_bits: int, rows: int) -> int:
    """A batch's difficulty: ``rows`` puzzles of ``per_query_bits`` bits are about one of this many."""
    return per_query_bits + math.ceil(math.log2(max(1, rows)))


class PuzzleBook:
    """Issues and redeems puzzles for one server process (thread-safe).

    difficulty: ``difficulty(key_id) -> bits`` of the key's next per-query puzzle.
    ttl_s: how long a puzzle may be redeemed. max_open_per_key: outstanding puzzles a key may hold (the oldest
    is dropped beyond it), so that asking for puzzles cannot grow the server's memory without end.
    """

    def __init__(
        self,
        difficulty: Callable[[str], int],
        *,
        ttl_s: float = 120.0,
        max_open_per_key: int = 8,
        max_bits: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not (isinstance(ttl_s, int | float) and 0 < ttl_s < math.inf):
            raise ValueError(f"puzzle ttl_s must be a finite number of seconds > 0, got {ttl_s!r}")
        if type(max_open_per_key) is not int or max_open_per_key < 1:
            raise ValueError(f"puzzle max_open_per_key must be an integer >= 1, got {max_open_per_key!r}")
        self.difficulty, self.ttl_s, self.max_open_per_key = difficulty, float(ttl_s), max_open_per_key
        self.max_bits, self.clock = max_bits, clock
        self._open: dict[str, Puzzle] = {}
        self._lock = threading.Lock()

    def issue(self, key_id: str, request: str, rows: int) -> Puzzle:
        now = self.clock()
        bits = min(self.max_bits, batch_bits(self.difficulty(key_id), rows))
        puzzle = Puzzle(secrets.token_hex(16), bits, key_id, request, now + self.ttl_s)
        with self._lock:
            self._forget_expired(now)
            held = [nonce for nonce, open_puzzle in self._open.items() if open_puzzle.key_id == key_id]
            for nonce in held[: max(0, len(held) - self.max_open_per_key + 1)]:
                del self._open[nonce]
            self._open[puzzle.nonce] = puzzle
        return puzzle

    def admit(self, key_id: str, request: str, rows: int, headers: Mapping[str, str]) -> None:
        """Returns when the headers carry a valid solution for this key and request (spending its nonce);
        raises ``PuzzleRequired`` with a fresh puzzle otherwise."""
        nonce, solution = headers.get(NONCE_HEADER.lower()), headers.get(SOLUTION_HEADER.lower())
        if nonce is None and solution is None:
            reason = "this server asks a proof of work for every prediction: solve the puzzle and resend"
        else:
            reason = self._redeem(key_id, request, nonce, solution)
            if reason is None:
                return
        raise PuzzleRequired(reason, self.issue(key_id, request, rows).public(self.clock()))

    def _redeem(self, key_id: str, request: str, nonce: str | None, solution: str | None) -> str | None:
        """None when the solution is valid (the nonce is then spent), else why it is refused."""
        if not nonce or solution is None:
            return f"send both {NONCE_HEADER} and {SOLUTION_HEADER}"
        if len(solution) > MAX_SOLUTION_CHARS:
            return f"{SOLUTION_HEADER} is longer than {MAX_SOLUTION_CHARS} characters"
        now = self.clock()
        with self._lock:
            puzzle = self._open.pop(nonce, None)  # single use: spent by this attempt, whatever its fate
        if puzzle is None:
            return "unknown or already used puzzle nonce"
        if puzzle.expires_at < now:
            return "the puzzle expired"
        if puzzle.key_id != key_id:
            return "the puzzle was issued to another key"
        if puzzle.request != request:
            return "the puzzle was issued for another request (inputs or output differ)"
        if leading_zero_bits(puzzle_hash(nonce, key_id, request, solution)) < puzzle.bits:
            return f"the solution's hash has fewer than the {puzzle.bits} leading zero bits asked"
        return None

    def _forget_expired(self, now: float) -> None:
        for nonce in [nonce for nonce, puzzle in self._open.items() if puzzle.expires_at < now]:
            del self._open[nonce]
