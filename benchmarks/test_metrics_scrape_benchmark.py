"""What monitoring costs the server: milliseconds for a first scrape of ``GET /metrics`` over an audit log
of ``ROWS`` request rows (every row read once), for a scrape after 100 more rows (only those read), and
microseconds per request for the duration and the JSON log line (``ServerMetrics.after_request``).

    python -m pytest benchmarks/test_metrics_scrape_benchmark.py -q -s
"""

from __future__ import annotations

import logging
import re
import time

from heistlab.serving.audit import AuditEntry, AuditLog
from heistlab.serving.metrics import BuildInfo, ServerMetrics, route_matcher

ROWS = 20_000
ROUTES = [(path, re.compile(f"^{path}$")) for path in ("/healthz", "/oauth/token", "/v1/info", "/v1/predict")]
VARIANTS = {"plain": {}, "encrypted": {"key": bytes(32)}}


def entry(index: int) -> AuditEntry:
    served = index % 4 != 0
    status, reason = (200, "") if served else (429, "per-client cap of 100 queries (100 used, 16 asked)")
    return AuditEntry(
        f"r{index}", 1.0, f"k{index % 50}", "labels", "POST", "/v1/predict", "d" * 64, 16,
        "served" if served else "refused", status, reason,
    )  # fmt: skip


def test_metrics_scrape_and_per_request_cost(tmp_path):
    lines = ["| audit log | rows | first scrape ms | next scrape (100 new rows) ms | us per request |"]
    lines.append("|---|---|---|---|---|")
    quiet = logging.getLogger("heistlab.bench.requests")
    quiet.setLevel(logging.INFO)
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    for name, keys in VARIANTS.items():
        log = AuditLog(tmp_path / f"{name}.sqlite", **keys)
        for index in range(ROWS):
            log.record(entry(index))
        metrics = ServerMetrics(
            log,
            route_matcher(lambda: ROUTES),
            lambda: [f"k{index}" for index in range(50)],
            10_000,
            dict,
            BuildInfo({}),
            request_log=quiet,
        )
        started = time.perf_counter()
        first = metrics.exposition()
        first_ms = (time.perf_counter() - started) * 1e3
        for index in range(100):
            log.record(entry(ROWS + index))
        started = time.perf_counter()
        metrics.exposition()
        next_ms = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        for index in range(1000):
            metrics.after_request(entry(index), 0.01)
        per_request_us = (time.perf_counter() - started) / 1000 * 1e6
        quota_refusals = 'outcome="refused_quota",role="labels",route="/v1/predict",status="429"'
        assert f"heistlab_requests_total{{{quota_refusals}}} {ROWS // 4}.0".encode() in first
        lines.append(f"| {name} | {ROWS} | {first_ms:.0f} | {next_ms:.1f} | {per_request_us:.0f} |")
        log.close()
    print("\n" + "\n".join(lines))
