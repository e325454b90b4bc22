"""Failed authentications, throttled per key id and per source address.

Each failed secret check (a wrong API key, a wrong token-endpoint secret, an unknown key id) takes one
allowance from its source address and, when the key id is in the store, from that key id. An allowance holds
``burst`` failures and refills at ``rate`` per second (a token bucket, as ``defenses.rate_limit`` counts
rows). A failure that finds either allowance empty is answered 429 with Retry-After (the seconds until it
holds one again), after being held ``hold_s`` seconds: a client that ignores Retry-After and retries at once
costs the server one cheap refusal per ``hold_s`` per connection, and the held request uses no thread.

Only failures are counted: a right secret is never refused because of them (a key hashed with SHA-256
protects a random 256-bit secret that no rate of guessing finds, so a lockout would only let anyone who knows
a key id lock its owner out). Keys under a slow KDF, which may hold a human-chosen secret, are the exception
(``Authenticator``). Key ids are counted for keys in the store only, so that table is bounded by the store;
at most ``max_addresses`` addresses are tracked (refilled ones are forgotten first, then the oldest).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

MAX_HOLD_S = 30.0


class Throttled(Exception):
    """Too many failed authentications for a key id or from an address (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: float, hold_s: float):
        super().__init__(message)
        self.retry_after, self.hold_s = retry_after, hold_s


class Allowances:
    """Token buckets of failures by name (thread-safe); ``take`` spends one, ``wait`` only looks."""

    def __init__(self, burst: int, rate: float, clock: Callable[[], float], max_names: int):
        self.burst, self.rate, self.clock, self.max_names = burst, rate, clock, max_names
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, when counted)
        self._lock = threading.Lock()

    def _tokens(self, name: str, now: float) -> float:
        tokens, then = self._buckets.get(name, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - then) * self.rate)

    def wait(self, name: str) -> float | None:
        """Seconds until ``name`` may fail again, or None when it has an allowance left."""
        with self._lock:
            tokens = self._tokens(name, self.clock())
        return None if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def take(self, name: str) -> float | None:
        """Spends one failure of ``name``; None if it had one, else the seconds until it has one."""
        with self._lock:
            now = self.clock()
            tokens = self._tokens(name, now)
            if name not in self._buckets and len(self._buckets) >= self.max_names:
                self._forget(now)
            if tokens < 1.0:
                self._buckets[name] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._buckets[name] = (tokens - 1.0, now)
            return None

    def _forget(self, now: float) -> None:
        for name in [name for name in self._buckets if self._tokens(name, now) >= self.burst]:
            del self._buckets[name]
        while len(self._buckets) >= self.max_names:
            del self._buckets[next(iter(self._buckets))]


class FailedAuthThrottle:
    """Counts failed secret checks per key id and per source address (see the module docstring).

    burst: failures allowed at once (an integer >= 1); rate: failures per second that refill it (> 0);
    hold_s: how long a throttled refusal is held before it is answered, in [0, 30].
    """

    def __init__(
        self,
        burst: int = 10,
        rate: float = 0.1,
        hold_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = 65_536,
    ):
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"serve.failed_auth_burst must be an integer >= 1, got {burst!r}")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < math.inf:
            raise ValueError(
                f"serve.failed_auth_rate must be a number of failures per second > 0, got {rate!r}"
            )
        if isinstance(hold_s, bool) or not isinstance(hold_s, int | float) or not 0 <= hold_s <= MAX_HOLD_S:
            raise ValueError(
                f"serve.failed_auth_hold_s must be seconds in [0, {MAX_HOLD_S:g}], got {hold_s!r}"
            )
        self.burst, self.rate, self.hold_s = burst, float(rate), float(hold_s)
        self._keys = Allowances(burst, self.rate, clock, max_names=2**31)
        self._addresses = Allowances(burst, self.rate, clock, max_names=max_addresses)

    def key_wait(self, key_id: str) -> float | None:
        """Seconds until ``key_id`` may fail again (None: it may now)."""
        return self._keys.wait(key_id)

    def refusal(self, what: str, wait: float) -> Throttled:
        message = (
            f"throttled: more than {self.burst} failed authentications {what}; retry in {math.ceil(wait)} s"
        )
        return Throttled(message, wait, self.hold_s)

    def failed(self, key_id: str | None, address: str | None) -> Throttled | None:
        """Counts one failure of ``key_id`` (a key in the store, else None) from ``address``; the refusal
        to answer with when either had no failure left, else None (answer 401)."""
        waits = {}
        if key_id is not None:
            waits[f"for key {key_id}"] = self._keys.take(key_id)
        if address is not None:
            waits[f"from {address}"] = self._addresses.take(address)
        spent = {what: wait for what, wait in waits.items() if wait is not None}
        if not spent:
            return None
        return self.refusal(" and ".join(spent), max(spent.values()))
