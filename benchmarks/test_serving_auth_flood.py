"""A valid client's latency while 32 threads send its key id with wrong secrets (heistlab issue 13, item 4).

`python -m experiments.serve` runs in its own process with the default deployment (default MLP victim,
TLS, quota, rate limit, audit log; failed secret checks throttled per key id and source address). One valid
client sends ``REQUESTS`` batches of ``BATCH`` digits with its API key, one after another, first alone, then
while ``FLOOD_THREADS`` threads (half with ``X-API-Key: <its key id>.<wrong secret>`` on /v1/predict, half
with its client id and a wrong secret on /oauth/token) each send as fast as they are answered, ignoring
Retry-After, from a process of their own. The loaded measurement starts ``SETTLE_S`` seconds after the flood
has had its first answers. Reported: the valid client's
p50 and p99 alone and under the flood, their ratio, and what the flood was answered.

    python -m pytest benchmarks/test_serving_auth_flood.py -q -s

``throttle=default`` is the shipped configuration (the goal: loaded p50 within 2x of unloaded);
``throttle=off`` raises the allowance out of reach (every wrong secret a prompt 401), for comparison.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest

from benchmarks.serving import free_port, served
from benchmarks.test_serving_benchmark import SERVE_LIMITS
from heistlab import data
from heistlab.experiments import keys
from heistlab.serving.client import read_credentials
from heistlab.serving.tls import client_context

FLOOD_THREADS, REQUESTS, BATCH, SETTLE_S = 32, 200, 16, 3.0
THROTTLES = {"default": [], "off": ["serve.failed_auth_burst=1000000000"]}


def latencies_ms(http: httpx.Client, api_key: str, batches: list[np.ndarray]) -> list[float]:
    found = []
    for batch in batches:
        started = time.perf_counter()
        response = http.post("/v1/predict", json={"inputs": batch.tolist()}, headers={"X-API-Key": api_key})
        found.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.text
    return found


def flood_thread(url: str, ca_file, key_id: str, stop, statuses: Counter, index: int, started) -> None:
    wrong = f"wrong-secret-{index}"
    with httpx.Client(base_url=url, verify=client_context(ca_file), timeout=30) as http:
        while not stop.is_set():
            try:
                if index % 2:
                    form = {"grant_type": "client_credentials", "client_id": key_id, "client_secret": wrong}
                    status = http.post("/oauth/token", data=form).status_code
                else:
                    headers = {"X-API-Key": f"{key_id}.{wrong}"}
                    status = http.post("/v1/predict", json={"inputs": [[0.0]]}, headers=headers).status_code
            except httpx.TransportError:
                status = "transport error"
            statuses[str(status)] += 1
            if statuses.total() >= FLOOD_THREADS:
                started.set()


def flood(url: str, ca_file, key_id: str, stop, started, answered) -> None:
    """The attacker, in a process of its own: ``FLOOD_THREADS`` threads until ``stop`` is set. Sets
    ``started`` once it has had as many answers as threads; puts its statuses and seconds on ``answered``."""
    statuses: Counter = Counter()
    began = time.perf_counter()
    threads = [
        threading.Thread(target=flood_thread, args=(url, ca_file, key_id, stop, statuses, index, started))
        for index in range(FLOOD_THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    answered.put((dict(statuses), time.perf_counter() - began))


def measure(url: str, ca_file, credential, batches: list[np.ndarray]) -> dict:
    processes = multiprocessing.get_context("spawn")
    with httpx.Client(base_url=url, verify=client_context(ca_file), timeout=60) as http:
        latencies_ms(http, credential.api_key, batches[:5])  # warm-up: compile the batch shape
        alone = latencies_ms(http, credential.api_key, batches)
        stop, started, answered = processes.Event(), processes.Event(), processes.Queue()
        attacker = processes.Process(
            target=flood, args=(url, ca_file, credential.key_id, stop, started, answered)
        )
        attacker.start()
        try:
            assert started.wait(timeout=120), "the flood did not start"
            time.sleep(SETTLE_S)
            started = time.perf_counter()
            loaded = latencies_ms(http, credential.api_key, batches)
        finally:
            stop.set()
            statuses, flood_s = answered.get(timeout=90)
            attacker.join(timeout=30)
    return {
        "p50_alone_ms": float(np.percentile(alone, 50)),
        "p99_alone_ms": float(np.percentile(alone, 99)),
        "p50_flood_ms": float(np.percentile(loaded, 50)),
        "p99_flood_ms": float(np.percentile(loaded, 99)),
        "p50_ratio": float(np.percentile(loaded, 50) / np.percentile(alone, 50)),
        "flood_requests": sum(statuses.values()),
        "flood_s": flood_s,
        "flood_statuses": dict(sorted(statuses.items())),
    }


@pytest.mark.parametrize("throttle", list(THROTTLES))
def test_valid_client_latency_under_a_wrong_secret_flood(benchmark, tmp_path, throttle):
    keys.main(["selfsigned", "--out", str(tmp_path)])
    keys.main(["create", "--store", str(tmp_path / "keys.json"), "--role", "probabilities",
               "--out", str(tmp_path / "client.json")])  # fmt: skip
    (credential,) = read_credentials(tmp_path / "client.json")
    splits = data.make_splits(data.load_digits(), seed=0)
    rng = np.random.default_rng(0)
    batches = [splits.pool[rng.choice(len(splits.pool), BATCH, replace=False)] for _ in range(REQUESTS)]
    ca_file = tmp_path / "cert.pem"
    with served(tmp_path, free_port(), *SERVE_LIMITS, *THROTTLES[throttle]) as server:
        found = benchmark.pedantic(
            measure, args=(server.url, ca_file, credential, batches), rounds=1, iterations=1
        )
    benchmark.extra_info.update(found)
    print(
        f"\nthrottle={throttle}: valid client p50 {found['p50_alone_ms']:.1f} ms alone, "
        f"{found['p50_flood_ms']:.1f} ms under {FLOOD_THREADS} wrong-secret threads (ratio "
        f"{found['p50_ratio']:.2f}); p99 {found['p99_alone_ms']:.1f} -> {found['p99_flood_ms']:.1f} ms; "
        f"flood {found['flood_requests'] / found['flood_s']:.0f} requests/s answered "
        f"{found['flood_statuses']}; "
        f"load {os.getloadavg()[0]:.1f}"
    )
    if throttle == "default":
        assert found["p50_ratio"] <= 2.0
