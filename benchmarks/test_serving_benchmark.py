"""Throughput and latency of the prediction server, defenses on, over HTTPS on loopback.

`python -m experiments.serve` runs in its own process (the real deployment: TLS, API keys and bearer tokens,
validation, the per-key quota and rate limit, the SQLite audit log, the defense chain and its online report);
``CLIENTS`` threads here each hold one key and one keep-alive HTTPS connection and send ``REQUESTS`` batches
of ``BATCH`` digits, one after another (a closed loop). Reported: requests/s, rows/s, p50 and p99 latency,
and the server's CPU time per request (what bounds its throughput on a machine of its own).

    python -m pytest benchmarks/test_serving_benchmark.py -q -s

The victim is the default MLP (64-256-256-10) on digits, from the victim cache (trained on first use).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.serving import cpu_seconds, free_port, served
from heistlab import data
from heistlab.experiments import keys
from heistlab.serving.client import read_credentials
from heistlab.serving.tls import client_context

CLIENTS, REQUESTS, BATCH = 8, 50, 16


SERVE_LIMITS = ("serve.quota=100000000", "serve.rate=1000000", "serve.burst=4096", "serve.log_level=warning")


def closed_loop(url: str, ca_file: Path, credentials, batches: list[np.ndarray]) -> dict:
    """Each client sends its batches one after another; returns rates and latency percentiles."""
    latencies: list[list[float]] = [[] for _ in credentials]
    statuses: list[list[int]] = [[] for _ in credentials]
    barrier = threading.Barrier(len(credentials))

    def client(index: int) -> None:
        credential = credentials[index]
        with httpx.Client(base_url=url, verify=client_context(ca_file), timeout=60) as http:
            form = {"grant_type": "client_credentials", "client_id": credential.key_id}
            token = http.post("/oauth/token", data={**form, "client_secret": credential.key}).json()
            headers = {"Authorization": f"Bearer {token['access_token']}"}
            barrier.wait(timeout=60)
            for batch in batches:
                started = time.perf_counter()
                response = http.post("/v1/predict", json={"inputs": batch.tolist()}, headers=headers)
                latencies[index].append(time.perf_counter() - started)
                statuses[index].append(response.status_code)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(credentials))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    wall = time.perf_counter() - started
    every = np.concatenate(latencies) * 1000
    requests = len(every)
    return {
        "requests": requests,
        "ok": sum(status == 200 for row in statuses for status in row),
        "requests_per_s": requests / wall,
        "rows_per_s": requests * len(batches[0]) / wall,
        "p50_ms": float(np.percentile(every, 50)),
        "p99_ms": float(np.percentile(every, 99)),
    }


@pytest.mark.parametrize("defense", ["none", "rounding", "prada"])
def test_serving_throughput_and_latency(benchmark, tmp_path, defense):
    keys.main(["selfsigned", "--out", str(tmp_path)])
    for _ in range(CLIENTS):
        keys.main(["create", "--store", str(tmp_path / "keys.json"), "--role", "probabilities",
                   "--out", str(tmp_path / "clients.json"), "--append"])  # fmt: skip
    credentials = read_credentials(tmp_path / "clients.json")
    splits = data.make_splits(data.load_digits(), seed=0)
    rng = np.random.default_rng(0)
    batches = [splits.pool[rng.choice(len(splits.pool), BATCH, replace=False)] for _ in range(REQUESTS)]
    ca_file = tmp_path / "cert.pem"
    with served(tmp_path, free_port(), f"defense={defense}", *SERVE_LIMITS) as server:
        closed_loop(server.url, ca_file, credentials[:1], batches[:5])  # warm-up: compile the batch shape
        cpu_before = cpu_seconds(server.process.pid)
        found = benchmark.pedantic(
            closed_loop, args=(server.url, ca_file, credentials, batches), rounds=1, iterations=1
        )
        found["server_cpu_ms_per_request"] = (
            (cpu_seconds(server.process.pid) - cpu_before) * 1000 / found["requests"]
        )
    benchmark.extra_info.update(kind="serving", defense=defense, clients=CLIENTS, batch=BATCH, **found)
    print(
        f"\ndefense={defense}: {CLIENTS} clients x {REQUESTS} requests of {BATCH} rows over HTTPS: "
        f"{found['requests_per_s']:.0f} requests/s ({found['rows_per_s']:.0f} rows/s), "
        f"p50 {found['p50_ms']:.1f} ms, p99 {found['p99_ms']:.1f} ms; "
        f"server CPU {found['server_cpu_ms_per_request']:.2f} ms per request; load {os.getloadavg()[0]:.1f}"
    )
    assert found["ok"] == found["requests"] == CLIENTS * REQUESTS
