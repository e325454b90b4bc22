"""Quotas and rate limits on the real clock: the project's admission defenses, as a server applies them.

The server's admission is ``defenses.budget`` (the per-key quota, its ledger seeded from the audit log so a
quota stays spent across restarts) chained with ``defenses.rate_limit`` (a token bucket per key) and any
other defense with an ``admit`` part, called with ``Request.now`` in real seconds since the server started.
Those defenses were written for the simulated clock: a rate limit answers "admitted after ``delay``
seconds" where a server cannot hold a request that long. ``real_clock_verdict`` turns such an answer into a
refusal whose Retry-After is that delay, and the server keeps the admission state as it was, so the retry
finds the bucket refilled by then.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from heistlab.defenses.base import Defense, State, Verdict, chain
from heistlab.defenses.budget import BudgetState, budget
from heistlab.defenses.rate_limit import rate_limit

RETRY_AFTER_CAP_S = 86_400


def real_clock_verdict(verdict: Verdict) -> Verdict:
    """An admission with a delay, on a server, is a refusal to be retried after that delay."""
    if verdict.admitted and verdict.delay > 0:
        reason = verdict.reason or f"rate limited; retry in {verdict.delay:.2f} s"
        return Verdict(admitted=False, delay=verdict.delay, reason=reason)
    return verdict


def retry_after_header(delay: float, cap_s: int = RETRY_AFTER_CAP_S) -> str:
    """Retry-After seconds (RFC 9110: a non-negative integer), rounded up; an endless wait is capped."""
    if not math.isfinite(delay):
        return str(cap_s)
    return str(min(cap_s, max(1, math.ceil(delay))))


def server_admission(
    quota: int | None,
    rate: float | None,
    burst: int | None,
    spent: Mapping[str, int],
    extra: Iterable[Defense] = (),
) -> tuple[Defense | None, State]:
    """The server's admission defense and its initial state: quota, rate limit, then ``extra``.

    quota: ``defenses.budget(per_client=quota)``, its ledger starting from ``spent`` (None: no quota).
    rate, burst: ``defenses.rate_limit(rate, burst)`` (None rate: none; None burst: ``ceil(rate)``).

    Raises:
      ValueError: if an ``extra`` defense has no ``admit`` part (or a factory rejects its arguments).
    """
    members, states = [], []
    if quota is not None:
        members.append(budget(per_client=quota))
        states.append(BudgetState(admitted=dict(spent), total=sum(spent.values())))
    if rate is not None:
        limiter = rate_limit(rate, burst if burst is not None else max(1, math.ceil(rate)))
        members.append(limiter)
        states.append(limiter.init())
    for member in extra:
        if member.admit is None:
            raise ValueError("serve.extra_admission: every defense there must have an admit part")
        members.append(member)
        states.append(member.init())
    if not members:
        return None, None
    return chain(*members), tuple(states)
