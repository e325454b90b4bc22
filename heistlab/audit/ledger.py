"""The audit's total query budget: every input row sent to the target is charged to one battery member.

Rows are charged when they are sent, served or not, so the budget bounds the audit's traffic. Each member
queries through ``budgeted_oracle``, whose ``remaining`` is the smaller of what the target and the ledger
still allow, so attacks (which check the budget left before querying) stop inside it; a batch the ledger
cannot pay for is refused whole (``QueryRefused``) before it is sent. Batches are split to the target's
largest admissible batch (its ``max_batch`` and rate-limit burst), and served rows can be kept as a
transcript (for the fidelity-per-queries curves).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from heistlab.api import Oracle, QueryRefused


class QueryLedger:
    """A total of ``total`` input rows, charged per battery member (``spent``)."""

    def __init__(self, total: int):
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"audit.budget must be an integer >= 1 (input rows in all), got {total!r}")
        self.total = total
        self.spent: dict[str, int] = {}

    @property
    def left(self) -> int:
        return self.total - sum(self.spent.values())

    def charge(self, member: str, rows: int) -> None:
        """Charges ``rows`` to ``member``; ``QueryRefused`` (nothing charged) when they do not fit."""
        if rows > self.left:
            raise QueryRefused(
                member, rows, self.left, f"the audit's total budget of {self.total} rows", math.inf
            )
        self.spent[member] = self.spent.get(member, 0) + rows


class Transcript:
    """The inputs a member sent and the answers it was served, in order."""

    def __init__(self):
        self.inputs: list[np.ndarray] = []
        self.answers: list[np.ndarray] = []

    def add(self, inputs: np.ndarray, answers: np.ndarray) -> None:
        self.inputs.append(np.asarray(inputs))
        self.answers.append(np.asarray(answers))

    def __len__(self) -> int:
        return sum(len(part) for part in self.inputs)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.inputs), np.concatenate(self.answers)


def budgeted_oracle(
    oracle: Oracle,
    ledger: QueryLedger,
    member: str,
    max_rows: int | None = None,
    transcript: Transcript | None = None,
) -> Oracle:
    """``oracle`` charged to ``member`` in ``ledger``, its batches split to ``max_rows`` rows."""
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be an integer >= 1 or None, got {max_rows!r}")

    def remaining() -> int:
        left = oracle.remaining
        return ledger.left if left is None else min(left, ledger.left)

    def query(inputs) -> np.ndarray:
        inputs = np.asarray(inputs)
        ledger.charge(member, len(inputs))
        step = max_rows or max(len(inputs), 1)
        answers = [oracle.query(inputs[start : start + step]) for start in range(0, len(inputs), step)]
        answered = np.concatenate(answers)
        if transcript is not None:
            transcript.add(inputs, answered)
        return answered

    return Oracle(query, remaining, oracle.input_shape, oracle.num_classes, oracle.output, oracle.clients)


class LedgerAPI:
    """An API (in-process or remote) whose oracles are charged to the ledger, for evasion stages.

    Client names are prefixed with ``member`` so that each battery member's counts stay its own.
    """

    def __init__(self, api, ledger: QueryLedger, member: str, max_rows: int | None = None):
        self.api, self.ledger, self.member, self.max_rows = api, ledger, member, max_rows

    def name(self, client: str) -> str:
        return f"{self.member}-{client}"

    def oracle(self, client: str = "attacker", identities: int = 1) -> Oracle:
        if identities != 1:
            raise ValueError("an audit's battery members use one identity each")
        return budgeted_oracle(self.api.oracle(self.name(client)), self.ledger, self.member, self.max_rows)

    def served(self, client: str) -> int:
        return self.api.served(self.name(client))

    def refused(self, client: str) -> int:
        return self.api.refused(self.name(client))

    def simulated_seconds(self, client: str) -> float:
        return self.api.simulated_seconds(self.name(client))


def top1_labels(oracle: Oracle) -> Callable[[np.ndarray], np.ndarray]:
    """The target's served top-1 on given inputs, through ``oracle`` (every call is charged)."""

    def labels(inputs: np.ndarray) -> np.ndarray:
        answers = oracle.query(np.asarray(inputs, np.float32))
        return np.asarray(answers if oracle.output == "labels" else answers.argmax(axis=-1), np.int64)

    return labels
