"""Query budgets as admission control: a cap per client and a cap on all clients together.

The API's own ``api.budget`` caps each client name. A Sybil attacker, spreading its queries over several
identities (``api.attacker_identities``), multiplies any per-client cap by its number of identities; only a
global cap bounds what all clients together extract, at the price of counting honest clients too. ``budget``
offers both caps as a defense, so that they compose with rate limits and detectors in one ``chain``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from heistlab.defenses.base import ADMIT, Defense, Request, Verdict


class BudgetState(NamedTuple):
    """Rows admitted so far: per client name, and in total."""

    admitted: Mapping[str, int]
    total: int


def budget(per_client: int | None = None, total: int | None = None) -> Defense:
    """Refuses a batch whole if it would take its client past ``per_client`` rows or all past ``total``.

    A refusal names the cap it hit (``per-client cap of N queries`` or ``global cap of N queries``) and its
    Retry-After is ``inf``: caps never refill. ``None`` leaves that cap off; at least one must be set.

    Raises:
      ValueError: if a cap is not an int >= 0 or None, or both are None.
    """
    for name, value in (("per_client", per_client), ("total", total)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"budget: {name} must be an int >= 0 or None, got {value!r}")
    if per_client is None and total is None:
        raise ValueError("budget: per_client and total are both None; set at least one cap")

    def init() -> BudgetState:
        return BudgetState(admitted={}, total=0)

    def apply(probs, state, context):
        return probs, state

    def admit(state: BudgetState, request: Request) -> tuple[Verdict, BudgetState]:
        used = state.admitted.get(request.client, 0)
        if per_client is not None and used + request.size > per_client:
            reason = f"per-client cap of {per_client} queries ({used} used, {request.size} asked)"
            return Verdict(admitted=False, delay=math.inf, reason=reason), state
        if total is not None and state.total + request.size > total:
            reason = f"global cap of {total} queries ({state.total} used, {request.size} asked)"
            return Verdict(admitted=False, delay=math.inf, reason=reason), state
        admitted = {**state.admitted, request.client: used + request.size}
        return ADMIT, BudgetState(admitted=admitted, total=state.total + request.size)

    # host: the state is Python bookkeeping keyed by client names, kept out of jit.
    return Defense(init=init, apply=apply, admit=admit, host=True)
