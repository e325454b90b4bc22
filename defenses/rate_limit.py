"""Throttling on the simulated clock: a token bucket per client, and delays that grow with a client's count.

Neither changes an answer; they change *when* it is served. The API keeps a simulated clock per client and
advances it by each admitted batch's delay, so the cost of an attack under throttling is measured
(``simulated_seconds``), never slept. Throttling bounds how fast, not how much, a client can extract, and a
Sybil attacker's identities each get their own bucket: a baseline beside detection (PRADA, Juuti et al.,
EuroS&P 2019) and budgets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from heistlab.defenses.base import Defense, Evidence, Request, Verdict


class Bucket(NamedTuple):
    """A client's bucket: ``tokens`` left at simulated time ``at`` (the client's clock when last served)."""

    tokens: float
    at: float


class BucketState(NamedTuple):
    buckets: Mapping[str, Bucket]


def rate_limit(rate: float, burst: int) -> Defense:
    """A token bucket per client: ``rate`` tokens per simulated second, holding at most ``burst``.

    A client starts with a full bucket. A batch of ``n`` rows takes ``n`` tokens. When fewer are there, the
    client waits exactly until the bucket has refilled to ``n`` (the verdict's delay), then spends them all,
    so no row is ever served before the bucket allowed it: after any batch, a client has been served at most
    ``burst + rate * t`` rows by its simulated time ``t``. A batch larger than ``burst`` can never be served
    and is refused (Retry-After ``inf``).

    ``report`` gives ``rate_limit_benign_seconds``: the longest simulated time a benign client spent waiting
    (the cost to honest clients; the attacker's is the experiment's ``simulated_seconds``).

    Raises:
      ValueError: if ``rate`` is not a finite number > 0 or ``burst`` not an int >= 1.
    """
    if not (_is_finite_number(rate) and rate > 0):
        raise ValueError(f"rate_limit: rate must be a finite number > 0 (tokens per second), got {rate!r}")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"rate_limit: burst must be an int >= 1 (bucket capacity in queries), got {burst!r}")

    def init() -> BucketState:
        return BucketState(buckets={})

    def admit(state: BucketState, request: Request) -> tuple[Verdict, BucketState]:
        if request.size > burst:
            reason = f"batch of {request.size} queries exceeds the rate limit's burst of {burst}"
            return Verdict(admitted=False, delay=math.inf, reason=reason), state
        bucket = state.buckets.get(request.client, Bucket(tokens=float(burst), at=request.now))
        available = min(float(burst), bucket.tokens + rate * max(0.0, request.now - bucket.at))
        if available >= request.size:
            left, wait = available - request.size, 0.0
        else:
            left, wait = 0.0, (request.size - available) / rate
        buckets = {**state.buckets, request.client: Bucket(tokens=left, at=request.now + wait)}
        return Verdict(admitted=True, delay=wait), BucketState(buckets)

    def report(state: BucketState, evidence: Evidence) -> dict:
        benign = [state.buckets[name].at for name in evidence.benign if name in state.buckets]
        return {"rate_limit_benign_seconds": max(benign, default=0.0)}

    return Defense(init=init, apply=_serve_unchanged, admit=admit, report=report, host=True)


class CountState(NamedTuple):
    """Rows admitted per client, and the simulated seconds of delay each was given."""

    counts: Mapping[str, int]
    waited: Mapping[str, float]


def progressive_delay(threshold: int, base_delay: float, growth: float) -> Defense:
    """Free service for a client's first ``threshold`` queries, then a delay that grows with its count.

    The ``k``-th query past the threshold (``k = 1, 2, ...``) costs ``base_delay * growth ** (k - 1)``
    simulated seconds, so a batch taking a client from ``k0`` to ``k1`` queries past the threshold waits the
    geometric sum

        delay = base_delay * (growth ** k1 - growth ** k0) / (growth - 1)     (base_delay * (k1 - k0) at 1)

    and a client that has made ``threshold + k`` queries has waited
    ``base_delay * (growth ** k - 1) / (growth - 1)`` in all. With ``growth = 1`` the delay is linear in the
    count; above 1 it grows exponentially, which leaves a benign client's few hundred queries cheap and makes
    bulk extraction impractically slow. A delay too large
    for a float is ``inf``.

    ``report`` gives ``progressive_delay_benign_seconds``: the longest delay a benign client was given in all.

    Raises:
      ValueError: if ``threshold`` is not an int >= 0, ``base_delay`` not a finite number > 0, or ``growth``
        not a finite number >= 1.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"progressive_delay: threshold must be an int >= 0, got {threshold!r}")
    if not (_is_finite_number(base_delay) and base_delay > 0):
        raise ValueError(
            f"progressive_delay: base_delay must be a finite number > 0 (seconds), got {base_delay!r}"
        )
    if not (_is_finite_number(growth) and growth >= 1):
        raise ValueError(f"progressive_delay: growth must be a finite number >= 1, got {growth!r}")

    def init() -> CountState:
        return CountState(counts={}, waited={})

    def admit(state: CountState, request: Request) -> tuple[Verdict, CountState]:
        count = state.counts.get(request.client, 0)
        before = max(0, count - threshold)
        after = max(0, count + request.size - threshold)
        wait = cumulative_delay(after, base_delay, growth) - cumulative_delay(before, base_delay, growth)
        if math.isnan(wait):
            wait = math.inf
        counts = {**state.counts, request.client: count + request.size}
        waited = {**state.waited, request.client: state.waited.get(request.client, 0.0) + wait}
        return Verdict(admitted=True, delay=wait), CountState(counts, waited)

    def report(state: CountState, evidence: Evidence) -> dict:
        benign = [state.waited[name] for name in evidence.benign if name in state.waited]
        return {"progressive_delay_benign_seconds": max(benign, default=0.0)}

    return Defense(init=init, apply=_serve_unchanged, admit=admit, report=report, host=True)


def cumulative_delay(past_threshold: int, base_delay: float, growth: float) -> float:
    """Seconds of delay for the first ``past_threshold`` queries past the threshold, ``inf`` on overflow."""
    if growth == 1.0:
        return base_delay * past_threshold
    try:
        return base_delay * math.expm1(past_threshold * math.log(growth)) / (growth - 1.0)
    except OverflowError:
        return math.inf


def _serve_unchanged(probs, state, context):
    return probs, state


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
