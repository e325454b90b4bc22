"""Large request bodies against the event loop: does a server busy parsing 4 MB bodies still answer /healthz?

`python -m experiments.serve` runs in its own process (the real deployment, default MLP victim, no defense).
``BIG_CLIENTS`` threads each send ``/v1/predict`` bodies of about ``BODY_BYTES`` (valid JSON, under the 4 MiB
``serve.max_body_bytes``: rows of 64 numbers, more rows than ``max_batch``, so the server parses the whole
body and answers 422), one after another. Meanwhile one client sends ``PROBES`` ``GET /healthz`` requests on
a keep-alive HTTPS connection. Reported: the /healthz p50 and p99 unloaded and under that load, and their
ratio (the goal: p50 within 2x of unloaded), and the big bodies answered per second.

    python -m pytest benchmarks/test_serving_bodies.py -q -s
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import numpy as np

from benchmarks.serving import free_port, served
from benchmarks.test_serving_benchmark import SERVE_LIMITS
from heistlab.experiments import keys
from heistlab.serving.client import read_credentials
from heistlab.serving.tls import client_context

BIG_CLIENTS, BODY_BYTES, PROBES = 4, 4_000_000, 200


def big_body(size: int) -> bytes:
    """A JSON body of rows of 64 numbers, as many rows as fit in ``size`` bytes."""
    row = "[" + ", ".join(f"{value:.6f}" for value in np.linspace(0.1, 0.9, 64)) + "]"
    rows = (size - 20) // (len(row) + 2)
    return ('{"inputs": [' + ", ".join([row] * rows) + "]}").encode()


def healthz_latencies(url: str, ca_file, count: int) -> np.ndarray:
    with httpx.Client(base_url=url, verify=client_context(ca_file), timeout=60) as http:
        http.get("/healthz")
        latencies = []
        for _ in range(count):
            started = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
    return np.asarray(latencies) * 1000


def warm_up(url: str, ca_file, credential, body: bytes) -> None:
    """One big body, answered: the server's parsing worker is up (it starts with the server)."""
    headers = {"X-API-Key": credential.api_key, "Content-Type": "application/json"}
    with httpx.Client(base_url=url, verify=client_context(ca_file), timeout=120) as http:
        assert http.post("/v1/predict", content=body, headers=headers).status_code == 422


def under_big_bodies(url: str, ca_file, credential, body: bytes) -> dict:
    """/healthz latencies while ``BIG_CLIENTS`` clients send ``body`` back to back."""
    stop, statuses, lock = threading.Event(), [], threading.Lock()
    headers = {"X-API-Key": credential.api_key, "Content-Type": "application/json"}

    def sender() -> None:
        with httpx.Client(base_url=url, verify=client_context(ca_file), timeout=120) as http:
            while not stop.is_set():
                status = http.post("/v1/predict", content=body, headers=headers).status_code
                with lock:
                    statuses.append(status)

    senders = [threading.Thread(target=sender, daemon=True) for _ in range(BIG_CLIENTS)]
    for thread in senders:
        thread.start()
    time.sleep(2.0)  # every sender has a body in flight
    started, done = time.perf_counter(), len(statuses)
    loaded = healthz_latencies(url, ca_file, PROBES)
    elapsed, answered = time.perf_counter() - started, len(statuses) - done
    stop.set()
    for thread in senders:
        thread.join(timeout=120)
    return {"loaded": loaded, "bodies_per_s": answered / elapsed, "statuses": sorted(set(statuses))}


def test_healthz_latency_while_four_clients_send_4mb_bodies(benchmark, tmp_path):
    keys.main(["selfsigned", "--out", str(tmp_path)])
    keys.main(["create", "--store", str(tmp_path / "keys.json"), "--role", "probabilities",
               "--out", str(tmp_path / "client.json")])  # fmt: skip
    credential = read_credentials(tmp_path / "client.json")[0]
    body = big_body(BODY_BYTES)
    ca_file = tmp_path / "cert.pem"
    with served(tmp_path, free_port(), "defense=none", *SERVE_LIMITS) as server:
        warm_up(server.url, ca_file, credential, body)
        unloaded = healthz_latencies(server.url, ca_file, PROBES)
        found = benchmark.pedantic(
            under_big_bodies, args=(server.url, ca_file, credential, body), rounds=1, iterations=1
        )
    loaded = found.pop("loaded")
    result = {
        "body_bytes": len(body),
        "unloaded_p50_ms": float(np.percentile(unloaded, 50)),
        "unloaded_p99_ms": float(np.percentile(unloaded, 99)),
        "loaded_p50_ms": float(np.percentile(loaded, 50)),
        "loaded_p99_ms": float(np.percentile(loaded, 99)),
        **found,
    }
    result["p50_ratio"] = result["loaded_p50_ms"] / result["unloaded_p50_ms"]
    benchmark.extra_info.update(result)
    print(
        f"\n/healthz p50 {result['unloaded_p50_ms']:.1f} ms unloaded, {result['loaded_p50_ms']:.1f} ms while "
        f"{BIG_CLIENTS} clients send {len(body)}-byte bodies (ratio {result['p50_ratio']:.2f}); p99 "
        f"{result['unloaded_p99_ms']:.1f} -> {result['loaded_p99_ms']:.1f} ms; {found['bodies_per_s']:.1f} "
        f"bodies/s answered {found['statuses']}; load {os.getloadavg()[0]:.1f}"
    )
    assert found["statuses"] == [422]  # each body parsed whole, then refused: more rows than max_batch
