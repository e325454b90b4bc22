"""Calibrated proof-of-work (Dziedzic et al., "Increasing the Cost of Model Extraction with Calibrated Proof
of Work", ICLR 2022).

Before a query is answered the client must solve a hashcash puzzle: find a string whose SHA-256, together
with a server nonce, starts with ``bits`` zero bits, which takes ``2 ** bits`` hashes on average. The puzzle's
difficulty is calibrated to how much information the client's queries have leaked so far: the paper measures
that leakage as the differential-privacy cost of the answers (PATE's data-dependent Renyi accounting), so a
client whose queries sit where the model is uncertain (out of distribution, near decision boundaries, as
extraction attacks' do) pays more than an honest client whose answers are confident.

Here the leakage is a measure passed in (``defenses.leakage``: ``pate_privacy_cost`` or ``answer_entropy``),
accumulated per client from the answers it was served. The next query's difficulty is

    bits = min(max_bits, base_bits + floor(log2(1 + leakage / leakage_unit)))

so a query's expected work, ``2 ** bits`` hashes, grows about linearly with the client's accumulated leakage:
each ``leakage_unit`` leaked adds one base puzzle's work to every later query. The paper fits its mapping from
privacy cost to puzzle time on benign users' streams; this closed form is our simplification of it.

The leakage is measured on the probabilities reaching this defense (place it last in a chain to account for
what is served; an API serving labels only still charges for its probabilities' leakage, a conservative
choice). Accounts are per client, like rate limits: a Sybil attacker's identities each start at
``base_bits``, so splitting a stream over keys lowers its cost.

In-process the work is not done: admission makes the client wait the expected solving time,
``2 ** bits / hashes_per_second`` simulated seconds per row, on the API's simulated clock. Over HTTP
(``heistlab.serving.puzzle``) the server issues real puzzles at the same difficulty and verifies them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from heistlab.defenses.base import Defense, Evidence, Request, Verdict
from heistlab.defenses.leakage import Leakage, pate_privacy_cost

UNKNOWN_CLIENT = "unknown"


class ClientWork(NamedTuple):
    """One client's account: summed leakage costs, rows served, simulated seconds of solving, and the
    difficulty (leading zero bits) of its next puzzle."""

    leakage: np.ndarray
    queries: int
    seconds: float
    next_bits: int


class ProofOfWorkState(NamedTuple):
    """Every client's account; ``base_bits`` is the puzzle of a client not seen yet."""

    clients: Mapping[str, ClientWork]
    base_bits: int


class Calibration(NamedTuple):
    """The leakage-to-difficulty map and the solver's speed (see the module docstring)."""

    base_bits: int
    leakage_unit: float
    max_bits: int
    hashes_per_second: float

    def bits(self, leaked: float) -> int:
        """Leading zero bits of the next puzzle for a client that has leaked ``leaked`` so far."""
        extra = math.floor(math.log2(1.0 + max(0.0, leaked) / self.leakage_unit))
        return min(self.max_bits, self.base_bits + extra)

    def seconds(self, bits: int, rows: int) -> float:
        """Expected simulated seconds to solve ``rows`` puzzles of ``bits`` bits."""
        return rows * 2.0**bits / self.hashes_per_second


def proof_of_work(
    leakage: Leakage | None = None,
    base_bits: int = 12,
    leakage_unit: float = 1.0,
    max_bits: int = 40,
    hashes_per_second: float = 1.0e6,
) -> Defense:
    """A hashcash puzzle per query whose difficulty grows with the client's leakage so far.

    leakage: the leakage measure (default ``pate_privacy_cost()``); base_bits: every query's puzzle at zero
    leakage; leakage_unit: leakage that adds one base puzzle's work to each later query; max_bits: the
    hardest puzzle; hashes_per_second: the client's solving speed for the simulated clock (on 2 shared, busy
    CPU cores a bare hashlib SHA-256 loop ran 1.2e6 a second, ``heistlab.serving.puzzle.solve`` 0.4e6-0.6e6).

    A batch's difficulty is fixed when it is admitted, from the leakage of the answers served before it; its
    own answers then raise the difficulty of the next batch.

    ``report`` gives, for the attacking clients (summed) and the benign ones (the worst), the simulated
    seconds spent solving, the leakage, the last difficulty, and ``*_overhead``: seconds divided by what the
    same rows cost at ``base_bits`` (an uncalibrated proof-of-work): 1.0 means leakage added nothing.

    Raises:
      ValueError: if ``base_bits`` is not an int in [0, 64], ``max_bits`` not an int in [base_bits, 128],
        ``leakage_unit`` or ``hashes_per_second`` not a finite number > 0, or ``leakage`` not a ``Leakage``.
    """
    leakage = pate_privacy_cost() if leakage is None else leakage
    if not isinstance(leakage, Leakage):
        raise ValueError(
            "proof_of_work: leakage must be heistlab.defenses.leakage.pate_privacy_cost(...) or "
            f"heistlab.defenses.leakage.answer_entropy(), got {leakage!r}"
        )
    if isinstance(base_bits, bool) or not isinstance(base_bits, int) or not 0 <= base_bits <= 64:
        raise ValueError(f"proof_of_work: base_bits must be an int in [0, 64], got {base_bits!r}")
    if isinstance(max_bits, bool) or not isinstance(max_bits, int) or not base_bits <= max_bits <= 128:
        raise ValueError(
            f"proof_of_work: max_bits must be an int in [base_bits={base_bits}, 128], got {max_bits!r}"
        )
    if not (_is_finite_number(leakage_unit) and leakage_unit > 0):
        raise ValueError(f"proof_of_work: leakage_unit must be a finite number > 0, got {leakage_unit!r}")
    if not (_is_finite_number(hashes_per_second) and hashes_per_second > 0):
        raise ValueError(
            f"proof_of_work: hashes_per_second must be a finite number > 0, got {hashes_per_second!r}"
        )
    calibration = Calibration(base_bits, float(leakage_unit), max_bits, float(hashes_per_second))

    def init() -> ProofOfWorkState:
        return ProofOfWorkState(clients={}, base_bits=base_bits)

    def account(state: ProofOfWorkState, client: str) -> ClientWork:
        return state.clients.get(client) or ClientWork(np.zeros(0), 0, 0.0, base_bits)

    def leaked(work: ClientWork) -> float:
        return 0.0 if work.leakage.size == 0 else leakage.total(work.leakage)

    def admit(state: ProofOfWorkState, request: Request) -> tuple[Verdict, ProofOfWorkState]:
        work = account(state, request.client)
        wait = calibration.seconds(work.next_bits, request.size)
        clients = {**state.clients, request.client: work._replace(seconds=work.seconds + wait)}
        return Verdict(admitted=True, delay=wait), state._replace(clients=clients)

    def apply(probs, state: ProofOfWorkState, context):
        client = context.client or UNKNOWN_CLIENT
        work = account(state, client)
        costs = leakage.per_answer(np.asarray(probs)).sum(axis=0)
        work = work._replace(
            leakage=costs if work.leakage.size == 0 else work.leakage + costs,
            queries=work.queries + len(probs),
        )
        work = work._replace(next_bits=calibration.bits(leaked(work)))
        return probs, state._replace(clients={**state.clients, client: work})

    def report(state: ProofOfWorkState, evidence: Evidence) -> dict:
        found = {"proof_of_work_leakage_measure": leakage.name}
        for role, names, combine in (("attacker", evidence.attackers, sum), ("benign", evidence.benign, max)):
            accounts = [
                state.clients[name] for name in names if name in state.clients and state.clients[name].queries
            ]
            if not accounts:
                continue
            found[f"proof_of_work_{role}_seconds"] = combine(work.seconds for work in accounts)
            found[f"proof_of_work_{role}_overhead"] = max(
                work.seconds / calibration.seconds(base_bits, work.queries) for work in accounts
            )
            found[f"proof_of_work_{role}_leakage"] = max(leaked(work) for work in accounts)
            found[f"proof_of_work_{role}_bits"] = max(work.next_bits for work in accounts)
        return found

    return Defense(init=init, apply=apply, admit=admit, report=report, host=True)


def next_bits(defense_state, client: str) -> int | None:
    """The difficulty of ``client``'s next puzzle under the proof-of-work in a defense's state (a chain's
    state is searched; the first proof-of-work found decides), or ``None`` when it holds none."""
    if isinstance(defense_state, ProofOfWorkState):
        work = defense_state.clients.get(client)
        return defense_state.base_bits if work is None else work.next_bits
    if isinstance(defense_state, tuple) and not hasattr(defense_state, "_fields"):
        for member in defense_state:
            found = next_bits(member, client)
            if found is not None:
                return found
    return None


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
