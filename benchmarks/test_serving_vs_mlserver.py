"""The prediction server beside MLServer, batch-1 requests from 1 and 32 concurrent clients, in one run.

heistlab: ``python -m experiments.serve`` in its own process over HTTPS on loopback, with API keys and bearer
tokens, validation, a per-key quota and rate limit, the SQLite audit log and the ``none`` defense chain.
MLServer 1.7.1: its scikit-learn runtime serving an ``MLPClassifier`` of the same size (64-256-256-10) over
plain HTTP on loopback, with no authentication, quota or audit (``parallel_workers`` 0, as
``tests/test_oip_mlserver.py`` starts it). Each client holds one keep-alive connection and sends its requests
one after another (a closed loop); reported: requests/s, p50 and p99 latency and the load average, and the
ratio of heistlab's requests/s to MLServer's at each client count, and each server's CPU time per request
(user + system of its main process; the load generator shares the machine).

    python -m pytest benchmarks/test_serving_vs_mlserver.py -q -s

Skipped, saying so, when ``.cache/mlserver-venv`` (or ``$HEISTLAB_MLSERVER_VENV``) has no MLServer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.serving import cpu_seconds, free_port, served
from benchmarks.test_serving_benchmark import SERVE_LIMITS
from heistlab import data
from heistlab.experiments import keys
from heistlab.serving.client import read_credentials
from heistlab.serving.tls import client_context

REPO = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("HEISTLAB_MLSERVER_VENV", REPO / ".cache" / "mlserver-venv"))
MODEL = "digits-mlp"
REQUESTS_PER_CLIENT = {1: 200, 32: 40}  # clients: requests each

TRAIN = """
import sys, joblib, numpy as np
from sklearn.neural_network import MLPClassifier
split = np.load(sys.argv[1])
model = MLPClassifier(hidden_layer_sizes=(256, 256), max_iter=200, random_state=0)
model.fit(split["x"], split["y"])
joblib.dump(model, sys.argv[2])
"""


def start_mlserver(folder: Path) -> tuple[subprocess.Popen, str]:
    """MLServer serving a 64-256-256-10 MLPClassifier trained on the digits victim split; (process, url)."""
    splits = data.make_splits(data.load_digits(), seed=0)
    train = splits.victim_train
    np.savez(folder / "split.npz", x=train.x.reshape(len(train.x), -1), y=train.y)
    python = str(VENV / "bin" / "python")
    subprocess.run([python, "-c", TRAIN, str(folder / "split.npz"), str(folder / "model.joblib")],
                   check=True, timeout=300, capture_output=True)  # fmt: skip
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    settings = {"host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
                "metrics_port": metrics_port, "parallel_workers": 0}  # fmt: skip
    (folder / "settings.json").write_text(json.dumps(settings))
    model_settings = {"name": MODEL, "implementation": "mlserver_sklearn.SKLearnModel",
                      "parameters": {"uri": "./model.joblib"}}  # fmt: skip
    (folder / "model-settings.json").write_text(json.dumps(model_settings))
    log = (folder / "mlserver.log").open("w")
    process = subprocess.Popen([str(VENV / "bin" / "mlserver"), "start", "."], cwd=folder, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, (folder / "mlserver.log").read_text()
        try:
            if httpx.get(f"{url}/v2/models/{MODEL}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    raise TimeoutError("MLServer was not ready within 120 s")


def closed_loop(clients: list[Callable[[], Callable[[np.ndarray], int]]], rows: list[np.ndarray]) -> dict:
    """Each client opens its session, then sends ``rows`` one request each; rates and latency percentiles."""
    latencies: list[list[float]] = [[] for _ in clients]
    statuses: list[list[int]] = [[] for _ in clients]
    barrier = threading.Barrier(len(clients))

    def run(index: int) -> None:
        send = clients[index]()
        barrier.wait(timeout=120)
        for row in rows:
            started = time.perf_counter()
            statuses[index].append(send(row))
            latencies[index].append(time.perf_counter() - started)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(clients))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    wall = time.perf_counter() - started
    every = np.concatenate(latencies) * 1000
    return {
        "requests": len(every),
        "ok": sum(status == 200 for row in statuses for status in row),
        "requests_per_s": len(every) / wall,
        "p50_ms": float(np.percentile(every, 50)),
        "p99_ms": float(np.percentile(every, 99)),
        "load_1min": os.getloadavg()[0],
    }


def with_server_cpu(pid: int, clients: list, rows: list[np.ndarray]) -> dict:
    """``closed_loop``'s figures and the server's CPU milliseconds (user + system) per request."""
    before = cpu_seconds(pid)
    found = closed_loop(clients, rows)
    return {**found, "server_cpu_ms_per_request": (cpu_seconds(pid) - before) * 1000 / found["requests"]}


def heistlab_client(url: str, ca_file: Path, credential) -> Callable[[], Callable[[np.ndarray], int]]:
    def session() -> Callable[[np.ndarray], int]:
        http = httpx.Client(base_url=url, verify=client_context(ca_file), timeout=60)
        form = {
            "grant_type": "client_credentials",
            "client_id": credential.key_id,
            "client_secret": credential.key,
        }
        token = http.post("/oauth/token", data=form).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        return lambda row: (
            http.post("/v1/predict", json={"inputs": row[None].tolist()}, headers=headers).status_code
        )

    return session


def mlserver_client(url: str) -> Callable[[], Callable[[np.ndarray], int]]:
    def session() -> Callable[[np.ndarray], int]:
        http = httpx.Client(base_url=url, timeout=60)

        def send(row: np.ndarray) -> int:
            flat = row.reshape(-1)
            body = {
                "inputs": [{"name": "x", "shape": [1, flat.size], "datatype": "FP32", "data": flat.tolist()}],
                "outputs": [{"name": "predict_proba"}],
            }
            return http.post(f"/v2/models/{MODEL}/infer", json=body).status_code

        return send

    return session


@pytest.mark.skipif(not (VENV / "bin" / "mlserver").exists(), reason=f"MLServer is not installed in {VENV}")
def test_serving_beside_mlserver(benchmark, tmp_path):
    keys.main(["selfsigned", "--out", str(tmp_path)])
    for _ in range(max(REQUESTS_PER_CLIENT)):
        keys.main(["create", "--store", str(tmp_path / "keys.json"), "--role", "probabilities",
                   "--out", str(tmp_path / "clients.json"), "--append"])  # fmt: skip
    credentials = read_credentials(tmp_path / "clients.json")
    splits = data.make_splits(data.load_digits(), seed=0)
    rng = np.random.default_rng(0)
    rows = list(splits.pool[rng.choice(len(splits.pool), max(REQUESTS_PER_CLIENT.values()), replace=False)])
    ca_file = tmp_path / "cert.pem"
    (tmp_path / "mlserver").mkdir()
    found = {}
    with served(tmp_path, free_port(), "defense=none", *SERVE_LIMITS) as ours:
        theirs, their_url = start_mlserver(tmp_path / "mlserver")
        try:
            closed_loop([heistlab_client(ours.url, ca_file, credentials[0])], rows[:5])  # warm-up
            closed_loop([mlserver_client(their_url)], rows[:5])
            for count, requests in REQUESTS_PER_CLIENT.items():
                their_clients = [mlserver_client(their_url)] * count
                our_clients = [heistlab_client(ours.url, ca_file, key) for key in credentials[:count]]
                found[f"mlserver_{count}"] = with_server_cpu(theirs.pid, their_clients, rows[:requests])
                found[f"heistlab_{count}"] = with_server_cpu(ours.process.pid, our_clients, rows[:requests])
        finally:
            os.killpg(theirs.pid, signal.SIGTERM)
            try:
                theirs.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(theirs.pid, signal.SIGKILL)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(found)
    for count, requests in REQUESTS_PER_CLIENT.items():
        ours_found, theirs_found = found[f"heistlab_{count}"], found[f"mlserver_{count}"]
        print(
            f"\n{count} clients x {requests} batch-1 requests: "
            f"heistlab (HTTPS, keys, quota, rate limit, audit) {ours_found['requests_per_s']:.0f} req/s, "
            f"p50 {ours_found['p50_ms']:.1f} ms, p99 {ours_found['p99_ms']:.1f} ms, "
            f"server CPU {ours_found['server_cpu_ms_per_request']:.2f} ms/request; "
            f"MLServer sklearn (HTTP, no security) {theirs_found['requests_per_s']:.0f} req/s, "
            f"p50 {theirs_found['p50_ms']:.1f} ms, p99 {theirs_found['p99_ms']:.1f} ms, "
            f"server CPU {theirs_found['server_cpu_ms_per_request']:.2f} ms/request; "
            f"ratio {ours_found['requests_per_s'] / theirs_found['requests_per_s']:.2f}; "
            f"load {ours_found['load_1min']:.1f}"
        )
        for side in (ours_found, theirs_found):
            assert side["ok"] == side["requests"] == count * requests
