"""What tamper evidence costs the audit log: microseconds per appended row (plain, chained, encrypted and
chained) and seconds to verify the chain, on ``ROWS`` request rows appended one at a time, as a server does.

    python -m pytest benchmarks/test_audit_log_benchmark.py -q -s
"""

from __future__ import annotations

import time

from heistlab.serving.audit import AuditEntry, AuditLog

ROWS = 2000
DIGEST, PATH = "d" * 64, "/v1/predict"
MAC_KEY, ENCRYPTION_KEY = bytes(range(32)), bytes(32)
VARIANTS = {
    "plain": {},
    "chained": {"mac_key": MAC_KEY},
    "encrypted + chained": {"mac_key": MAC_KEY, "key": ENCRYPTION_KEY},
}


def test_audit_log_append_and_verify_cost(tmp_path):
    lines = ["| audit log | us per row | verify s |", "|---|---|---|"]
    for name, keys in VARIANTS.items():
        log = AuditLog(tmp_path / f"{name.replace(' ', '')}.sqlite", **keys)
        started = time.perf_counter()
        for index in range(ROWS):
            log.record(AuditEntry(f"r{index}", 1.0, "k", "labels", "POST", PATH, DIGEST, 16, "served", 200))
        per_row_us = (time.perf_counter() - started) / ROWS * 1e6
        verify_s = "-"
        if "mac_key" in keys:
            started = time.perf_counter()
            assert log.verify().intact
            verify_s = f"{time.perf_counter() - started:.2f}"
        assert log.count() == ROWS
        lines.append(f"| {name} | {per_row_us:.0f} | {verify_s} |")
        log.close()
    print("\n" + "\n".join(lines))
