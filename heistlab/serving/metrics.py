"""What an operator watches on a served model: Prometheus metrics and one structured log line per request.

``GET /metrics`` answers in the Prometheus text format (prometheus_client), to a key whose role scrapes
metrics (``metrics``, or ``admin``); a prediction key gets 403. Model servers operators already run (MLServer,
KServe, Triton, TorchServe) expose the same kind of endpoint; the families here are:

- ``heistlab_requests_total`` and ``heistlab_request_rows_total`` by ``route``, ``status``, ``role`` and
  ``outcome`` (``request_outcome``: served, ok, unauthenticated, auth_throttled, forbidden, invalid,
  not_found, refused_quota, refused_rate_limit, refused_detector, refused_other, error);
- ``heistlab_request_rows`` (histogram): input rows per request that carried any, by route and outcome;
- ``heistlab_request_duration_seconds`` (histogram): time from the request's arrival to its audit row, by
  route;
- ``heistlab_key_quota_used_ratio{key_id}``: rows served to the key over ``serve.quota``;
- ``heistlab_key_alarms_total{key_id, alarm}`` and ``heistlab_alarms_total{alarm}``: alarms the defenses'
  online reports raised (PRADA's ``detected``);
- ``heistlab_defense_report{key_id, statistic}``: the numbers of the defense report last read for the key
  (PRADA's ``prada_min_w_attack``, the current minimum Shapiro-Wilk W of the key's stream, Juuti et al.,
  "PRADA: protecting against DNN model stealing attacks", EuroS&P 2019; a watermark's counters, any
  detector's statistics);
- ``heistlab_build_info``: versions and the SHA-256 of the served victim's parameters (the checkpoint digest).

Counts come from the audit log, the server's record of every request: each scrape reads the rows appended
since the last one (``AuditLog.rows_after``), so the counters equal the log's counts exactly, survive
restarts, and are the same whichever of several workers (``serve.workers``) answers the scrape, since they
share one audit database. The duration histogram and ``heistlab_defense_report`` are kept by the process
that served the request: with several workers a scrape sees the worker that answers it.

Cardinality is bounded: routes are the app's route templates (anything else is ``other``), roles the
server's roles, and per-key series are only for key ids in the key store, at most ``max_key_series`` of
them (those with the largest share of their quota used, then by key id); ``heistlab_key_series_omitted``
counts the keys left out.

Structured logs: ``request_log_line`` is one JSON object per request (the audit row's fields: request id,
which the response carries in ``X-Request-ID``, time, method, route, path, status, outcome, key id, role,
rows, input digest, reason; and the duration), written at INFO on a logger the operator names
(``serve.request_log``). Secrets, tokens and inputs are never part of it (the audit row holds none).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from flax import serialization
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from heistlab.serving.audit import AuditEntry, AuditLog
from heistlab.serving.auth import ROLES

OUTCOMES = (
    "served",
    "ok",
    "unauthenticated",
    "auth_throttled",
    "forbidden",
    "invalid",
    "not_found",
    "refused_quota",
    "refused_rate_limit",
    "refused_detector",
    "refused_other",
    "error",
)
DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OTHER_ROUTE = "other"
DEFAULT_MAX_KEY_SERIES = 100
READ_BATCH_ROWS = 10_000


def request_outcome(status: int, audit_outcome: str, reason: str) -> str:
    """What became of a request, finer than the audit log's outcome: a 429 is told apart by the refusal's
    reason (``defenses.budget``'s caps, ``defenses.rate_limit``, the failed-authentication throttle; any
    other admission refusal is a detector's, such as PRADA's ``prada alarm``)."""
    if audit_outcome == "served":
        return "served"
    if status == 401:
        return "unauthenticated"
    if status == 403:
        return "forbidden"
    if status == 429:
        if reason.startswith("throttled: "):
            return "auth_throttled"
        if reason.startswith(("per-client cap of", "global cap of")):
            return "refused_quota"
        if "rate limit" in reason:
            return "refused_rate_limit"
        return "refused_detector"
    if status in (400, 413, 415, 422):
        return "invalid"
    if status in (404, 405):
        return "not_found"
    if status >= 500:
        return "error"
    if status >= 400:
        return "refused_other"
    return "ok"


def route_matcher(templates: Callable[[], Iterable[tuple[str, re.Pattern]]]) -> Callable[[str, str], str]:
    """``route(method, path)``: the first route template whose pattern matches ``path`` (``other`` if none;
    ``unparsed`` for a request the HTTP parser refused, ``start`` for the server's own start-up rows)."""

    def route(method: str, path: str) -> str:
        if not method:
            return "unparsed"
        if method == "START":
            return "start"
        for template, pattern in templates():
            if pattern.match(path):
                return template
        return OTHER_ROUTE

    return route


def app_routes(app) -> Callable[[], list[tuple[str, re.Pattern]]]:
    """The route templates of a Starlette/FastAPI ``app``, read when asked (routes added later count)."""

    def templates() -> list[tuple[str, re.Pattern]]:
        return [
            (route.path, route.path_regex)
            for route in app.routes
            if hasattr(route, "path_regex") and hasattr(route, "path")
        ]

    return templates


def role_label(role: str | None) -> str:
    if role is None:
        return "none"
    return role if role in ROLES else "other"


def rows_buckets(max_batch: int) -> tuple[float, ...]:
    """Powers of two up to ``max_batch`` (and ``max_batch`` itself): the rows-per-request buckets."""
    bounds, bound = [], 1
    while bound < max_batch:
        bounds.append(float(bound))
        bound *= 2
    bounds.append(float(max_batch))
    return tuple(bounds)


class BuildInfo(NamedTuple):
    """What ``heistlab_build_info`` carries as labels (versions, the served victim's digest)."""

    labels: dict[str, str]


def build_info(versions: Mapping[str, str], victim_sha256: str) -> BuildInfo:
    """Versions (``heistlab.results.versions()``) and the served victim's parameter digest, as labels."""
    labels = {re.sub(r"[^a-zA-Z0-9_]", "_", name): str(value) for name, value in versions.items()}
    labels["victim_sha256"] = victim_sha256
    return BuildInfo(labels)


def victim_digest(victim) -> str:
    """SHA-256 of a Flax victim's serialized parameters: the ``sha256`` of its checkpoint's manifest
    (``heistlab.victims.save_checkpoint``); ``unknown`` for a victim without Flax parameters."""
    params = getattr(victim, "params", None)
    if params is None:
        return "unknown"
    return hashlib.sha256(serialization.to_bytes(params)).hexdigest()


class _Tally:
    """Counts over the audit log, advanced by the rows appended since the last read."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.last = {"requests": 0, "alarms": 0}
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.rows: dict[tuple[str, str, str, str], int] = {}
        self.batch_counts: dict[tuple[str, str], list[int]] = {}
        self.batch_sums: dict[tuple[str, str], int] = {}
        self.served_by_key: dict[str, int] = {}
        self.alarms: dict[tuple[str, str], int] = {}

    def add_request(self, row: Mapping, route: str) -> None:
        status, rows = int(row["status"]), int(row["rows"])
        outcome = request_outcome(status, row["outcome"], row["reason"] or "")
        labels = (route, str(status), role_label(row["role"]), outcome)
        self.requests[labels] = self.requests.get(labels, 0) + 1
        self.rows[labels] = self.rows.get(labels, 0) + rows
        if rows > 0:
            counts = self.batch_counts.setdefault((route, outcome), [0] * (len(self.buckets) + 1))
            slot = next((i for i, bound in enumerate(self.buckets) if rows <= bound), len(self.buckets))
            counts[slot] += 1
            self.batch_sums[(route, outcome)] = self.batch_sums.get((route, outcome), 0) + rows
        if row["outcome"] == "served" and row["key_id"] is not None:
            self.served_by_key[row["key_id"]] = self.served_by_key.get(row["key_id"], 0) + rows

    def add_alarm(self, row: Mapping) -> None:
        labels = (row["key_id"], row["name"])
        self.alarms[labels] = self.alarms.get(labels, 0) + 1


class ServerMetrics:
    """The server's metrics registry and request log (thread-safe; see the module docstring).

    audit: the audit log counted. route: ``route(method, path)``, a route template (``route_matcher``).
    key_ids: the key ids in the key store (the only keys given series). quota: ``serve.quota`` (None: no
    ratio). statistics: the defense report numbers per key (``ServingCore.statistics``). info: the build
    info. max_key_series: the most keys given per-key series. max_batch: the largest rows bucket.
    request_log: where one JSON line per request goes (None: nowhere).
    """

    def __init__(
        self,
        audit: AuditLog,
        route: Callable[[str, str], str],
        key_ids: Callable[[], Iterable[str]],
        quota: int | None,
        statistics: Callable[[], Mapping[str, Mapping[str, float]]],
        info: BuildInfo,
        *,
        max_key_series: int = DEFAULT_MAX_KEY_SERIES,
        max_batch: int = 256,
        request_log: logging.Logger | None = None,
    ):
        if isinstance(max_key_series, bool) or not isinstance(max_key_series, int) or max_key_series < 0:
            raise ValueError(f"serve.metrics.max_key_series must be an integer >= 0, got {max_key_series!r}")
        self.audit, self.route, self.key_ids, self.quota = audit, route, key_ids, quota
        self.statistics, self.info, self.max_key_series = statistics, info, max_key_series
        self.request_log = request_log
        self._tally = _Tally(rows_buckets(max_batch))
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.duration = Histogram(
            "heistlab_request_duration_seconds",
            "Seconds from a request's arrival to its audit row, by route (this process's requests).",
            ["route"],
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(_AuditCollector(self))

    def after_request(self, entry: AuditEntry, seconds: float) -> None:
        """Observes one audited request (its duration, its log line); never raises: monitoring must not fail
        the request it watches."""
        try:
            route = self.route(entry.method, entry.path)
            self.duration.labels(route).observe(seconds)
            if self.request_log is not None and self.request_log.isEnabledFor(logging.INFO):
                self.request_log.info(request_log_line(entry, route, seconds))
        except Exception:
            logging.getLogger("heistlab.serving").exception("monitoring request %s failed", entry.request_id)

    def refresh(self) -> None:
        """Counts the audit rows appended since the last refresh."""
        with self._lock:
            for table, add in (("requests", self._add_request), ("alarms", self._tally.add_alarm)):
                while True:
                    rows = self.audit.rows_after(table, self._tally.last[table], READ_BATCH_ROWS)
                    for row in rows:
                        add(row)
                        self._tally.last[table] = row["id"]
                    if len(rows) < READ_BATCH_ROWS:
                        break

    def _add_request(self, row: Mapping) -> None:
        self._tally.add_request(row, self.route(row["method"], row["path"] or ""))

    def exposition(self, names: Iterable[str] = ()) -> bytes:
        """The metrics in the Prometheus text format (only the families ``names`` when given)."""
        names = list(names)
        registry = self.registry.restricted_registry(names) if names else self.registry
        return generate_latest(registry)

    def chosen_keys(self) -> tuple[list[str], int]:
        """The key ids given per-key series, and how many keys of the store were left out."""
        served = self._tally.served_by_key
        keys = sorted(set(self.key_ids()), key=lambda key_id: (-served.get(key_id, 0), key_id))
        return keys[: self.max_key_series], max(0, len(keys) - self.max_key_series)


class _AuditCollector:
    """The families counted from the audit log and read from the server's state, at each scrape."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        metrics = self.metrics
        metrics.refresh()
        with metrics._lock:
            tally = metrics._tally
            yield from _request_families(tally)
            keys, omitted = metrics.chosen_keys()
            yield from _key_families(tally, keys, omitted, metrics.quota, metrics.statistics())
        info = GaugeMetricFamily(
            "heistlab_build_info",
            "Versions and the served victim's parameter SHA-256 (always 1).",
            labels=sorted(metrics.info.labels),
        )
        info.add_metric([metrics.info.labels[name] for name in sorted(metrics.info.labels)], 1.0)
        yield info


def _request_families(tally: _Tally):
    labels = ["route", "status", "role", "outcome"]
    requests = CounterMetricFamily(
        "heistlab_requests",
        "Requests by route, status, role and outcome (the audit log's rows).",
        labels=labels,
    )
    rows = CounterMetricFamily(
        "heistlab_request_rows", "Input rows asked by route, status, role and outcome.", labels=labels
    )
    for key in sorted(tally.requests):
        requests.add_metric(list(key), tally.requests[key])
        rows.add_metric(list(key), tally.rows[key])
    yield requests
    yield rows
    batches = HistogramMetricFamily(
        "heistlab_request_rows_per_request",
        "Input rows per request that carried any, by route and outcome.",
        labels=["route", "outcome"],
    )
    for key in sorted(tally.batch_counts):
        cumulative, buckets = 0, []
        for bound, count in zip((*tally.buckets, math.inf), tally.batch_counts[key], strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else _bound(bound), cumulative))
        batches.add_metric(list(key), buckets, tally.batch_sums[key])
    yield batches
    alarms: dict[str, int] = {}
    for (_, name), count in tally.alarms.items():
        alarms[name] = alarms.get(name, 0) + count
    total = CounterMetricFamily("heistlab_alarms", "Alarms raised, over all keys.", labels=["alarm"])
    for name in sorted(alarms):
        total.add_metric([name], alarms[name])
    yield total


def _bound(value: float) -> str:
    return str(int(value)) if value.is_integer() else str(value)


def _key_families(tally: _Tally, keys: list[str], omitted: int, quota, statistics):
    ratio = GaugeMetricFamily(
        "heistlab_key_quota_used_ratio", "Rows served to the key over its quota.", labels=["key_id"]
    )
    alarms = CounterMetricFamily(
        "heistlab_key_alarms", "Alarms raised for the key, by alarm.", labels=["key_id", "alarm"]
    )
    report = GaugeMetricFamily(
        "heistlab_defense_report",
        "The defense report last read for the key (PRADA's prada_min_w_attack, detected...).",
        labels=["key_id", "statistic"],
    )
    chosen = set(keys)
    for key_id in keys:
        if quota:
            ratio.add_metric([key_id], tally.served_by_key.get(key_id, 0) / quota)
        for statistic, value in sorted(statistics.get(key_id, {}).items()):
            report.add_metric([key_id, statistic], value)
    for (key_id, name), count in sorted(tally.alarms.items()):
        if key_id in chosen:
            alarms.add_metric([key_id, name], count)
    yield ratio
    yield alarms
    yield report
    yield GaugeMetricFamily(
        "heistlab_key_series_omitted",
        "Keys in the key store given no per-key series (past serve.metrics.max_key_series).",
        value=omitted,
    )


def request_log_line(entry: AuditEntry, route: str, seconds: float) -> str:
    """One request as a JSON line: the audit row's fields, its route and duration; never a secret, a
    token or an input (the audit row holds none: a digest of the inputs at most)."""
    return json.dumps(
        {
            "event": "request",
            "request_id": entry.request_id,
            "time": entry.time,
            "method": entry.method,
            "route": route,
            "path": entry.path,
            "status": entry.status,
            "outcome": request_outcome(entry.status, entry.outcome, entry.reason),
            "key_id": entry.key_id,
            "role": entry.role,
            "rows": entry.rows,
            "input_digest": entry.input_digest,
            "reason": entry.reason,
            "duration_s": round(seconds, 6),
        },
        sort_keys=True,
    )
