"""Several server processes behind one port: the shared quota and rate limit, and a live 4-worker server on
loopback where 32 concurrent clients get exactly the quota and a revocation holds in every worker at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest

from heistlab.defenses import QueryContext, budget, prada, rounding
from heistlab.experiments import audit_log, keys
from heistlab.serving.audit import AuditLog
from heistlab.serving.auth import create_key
from heistlab.serving.service import build_core
from heistlab.serving.shared import SharedAdmission
from heistlab.serving.tls import client_context
from heistlab.serving.workers import check_workers

REPO = Path(__file__).resolve().parent.parent
MAC_KEY = bytes(range(32))
CHEAP_KDF = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1, "dklen": 32}
TINY_VICTIM = ["victim.options.hidden=[32]", "victim.train.epochs=5"]
ONE_DIGIT = [[[0.0]] * 8] * 8


def test_two_workers_share_one_exact_quota_and_one_bucket(tmp_path):
    AuditLog(tmp_path / "audit.sqlite").close()
    first, second = (SharedAdmission(tmp_path / "audit.sqlite", 10, 1.0, 6) for _ in range(2))
    first.reset({"k": 3})  # three rows already served, as the audit log said at start
    verdicts = [worker.admit("k", 2, now=0.0)[0].admitted for worker in (first, second, first, second)]
    assert verdicts == [True, True, True, False]  # the bucket of 6 is shared: the fourth batch waits
    verdict, remaining = second.admit("k", 1, now=0.0)  # within the quota, but the shared bucket is empty
    assert not verdict.admitted and verdict.delay == pytest.approx(1.0) and remaining == 1
    verdict, remaining = first.admit("k", 1, now=10.0)  # the bucket refilled: 3 + 6 + 1 rows, the quota
    assert verdict.admitted and remaining == 0
    refused, left = second.admit("k", 1, now=100.0)
    assert not refused.admitted and "per-client cap of 10" in refused.reason and left == 0
    second.refund("k", 1)  # an admitted batch the victim failed to answer costs nothing
    assert first.remaining("k") == 1 and second.admit("other", 6, now=0.0)[0].admitted


def test_workers_are_validated_and_extra_admission_is_not_shared(tmp_path, small_victim):
    for bad in (0, 65, True, "4"):
        with pytest.raises(ValueError, match=r"serve.workers must be an integer in \[1, 64\]"):
            check_workers(bad)
    audit = AuditLog(tmp_path / "audit.sqlite")
    shared = SharedAdmission(audit.path, 5, None, None)
    with pytest.raises(ValueError, match="serve.extra_admission"):
        build_core(small_victim, rounding(2), audit=audit, shared=shared, extra_admission=[budget(total=5)])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_pids(parent: int) -> list[int]:
    """The spawned worker processes of ``parent`` (not multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in command:
            found.append(int(entry.name))
    return sorted(found)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.slow  # four processes import JAX and load the victim: about a minute on 2 busy cores
def test_four_workers_serve_exactly_the_quota_to_32_clients_and_revoke_in_every_worker(tmp_path, cache_dir):
    assert keys.main(["selfsigned", "--out", str(tmp_path / "tls")]) == 0
    store, quota = tmp_path / "keys.json", 48
    hammered, revoked, admin = (
        create_key(store, role, kdf=CHEAP_KDF) for role in ("labels", "top_k", "admin")
    )
    (tmp_path / "mac.key").write_text(MAC_KEY.hex())
    port, log_file = free_port(), tmp_path / "server.log"
    command = [
        sys.executable, "-m", "experiments.serve", *TINY_VICTIM, f"cache_dir={cache_dir}",
        "serve.workers=4", f"serve.port={port}", f"serve.quota={quota}", "serve.rate=null",
        f"serve.key_store={store}", f"serve.audit_db={tmp_path / 'audit.sqlite'}",
        f"serve.audit_mac_key_file={tmp_path / 'mac.key'}",
        f"serve.certfile={tmp_path / 'tls' / 'cert.pem'}", f"serve.keyfile={tmp_path / 'tls' / 'key.pem'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    with open(log_file, "wb") as output:
        server = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, "CI": "true"}, stdout=output, stderr=output
        )
    url, context = f"https://127.0.0.1:{port}", client_context(tmp_path / "tls" / "cert.pem")
    try:
        deadline = time.monotonic() + 300
        while "with 4 workers" not in log_file.read_text():
            assert server.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, "the 4 workers did not start within 300 s"
            time.sleep(0.5)
        workers = worker_pids(server.pid)
        assert len(workers) == 4, workers
        before = {pid: cpu_ticks(pid) for pid in workers}

        statuses, served_rows, lock = [], [], threading.Lock()

        def client() -> None:  # its own connection: the kernel hands connections to the workers
            with httpx.Client(verify=context, timeout=60) as session:
                for _ in range(4):
                    answer = session.post(
                        f"{url}/v1/predict",
                        json={"inputs": [ONE_DIGIT]},
                        headers={"X-API-Key": hammered.api_key},
                    )
                    with lock:
                        statuses.append(answer.status_code)
                        served_rows.append(len(answer.json()["outputs"]) if answer.status_code == 200 else 0)

        threads = [threading.Thread(target=client) for _ in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
        assert not any(thread.is_alive() for thread in threads)
        assert sum(served_rows) == quota and statuses.count(200) == quota
        assert statuses.count(429) == 128 - quota, sorted(set(statuses))
        assert all(cpu_ticks(pid) > before[pid] for pid in workers), "a worker served nothing"

        with httpx.Client(verify=context, timeout=60) as session:  # a token from one worker works in all
            form = {
                "grant_type": "client_credentials",
                "client_id": revoked.key_id,
                "client_secret": revoked.key,
            }
            token = session.post(f"{url}/oauth/token", data=form).json()["access_token"]
        bearer = {"Authorization": f"Bearer {token}"}

        def fresh_connections(headers: dict, count: int = 16) -> list[int]:
            found = []

            def one() -> None:
                with httpx.Client(verify=context, timeout=60) as session:
                    found.append(session.get(f"{url}/v1/info", headers=headers).status_code)

            spread = [threading.Thread(target=one) for _ in range(count)]
            for thread in spread:
                thread.start()
            for thread in spread:
                thread.join(timeout=60)
            return found

        assert fresh_connections(bearer) == [200] * 16
        with httpx.Client(verify=context, timeout=60) as session:
            answer = session.post(
                f"{url}/admin/keys/{revoked.key_id}/revoke", headers={"X-API-Key": admin.api_key}
            )
        assert answer.status_code == 200
        # Every request sent once the revocation is answered is refused, whichever worker takes it.
        after = fresh_connections(bearer) + fresh_connections({"X-API-Key": revoked.api_key})
        assert after == [401] * 32
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    log = log_file.read_text()
    assert server.returncode == 0 and "Traceback" not in log, log[-3000:]
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    audit = AuditLog(tmp_path / "audit.sqlite", mac_key=MAC_KEY)
    assert audit.served_rows() == {hammered.key_id: quota} and audit.verify().intact
    check = ["verify", "--db", str(audit.path), "--mac-key-file", str(tmp_path / "mac.key")]
    assert audit_log.main(check) == 0


def established_by(port: int, workers: list[int]) -> set[int]:
    """The workers holding an established connection on the server's ``port`` (from ``/proc/net/tcp``)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01" and fields[9] != "0":
                inodes.add(f"socket:[{fields[9]}]")
    holders = set()
    for pid in workers:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    holders.add(pid)
            except OSError:
                continue
    return holders


@pytest.mark.slow  # four processes import JAX and load the victim: about a minute on 2 busy cores
def test_prada_sees_a_keys_whole_stream_over_four_workers_and_alarms_once(tmp_path, cache_dir, digits_splits):
    assert keys.main(["selfsigned", "--out", str(tmp_path / "tls")]) == 0
    store = tmp_path / "keys.json"
    attacker, benign, admin = (
        create_key(store, role, kdf=CHEAP_KDF) for role in ("probabilities", "probabilities", "admin")
    )
    port, log_file = free_port(), tmp_path / "server.log"
    command = [
        sys.executable, "-m", "experiments.serve", *TINY_VICTIM, f"cache_dir={cache_dir}",
        "defense=prada", "defense.delta=0.85", "serve.workers=4", f"serve.port={port}", "serve.quota=null",
        "serve.rate=null", f"serve.key_store={store}", f"serve.audit_db={tmp_path / 'audit.sqlite'}",
        f"serve.certfile={tmp_path / 'tls' / 'cert.pem'}", f"serve.keyfile={tmp_path / 'tls' / 'key.pem'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    with open(log_file, "wb") as output:
        server = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, "CI": "true"}, stdout=output, stderr=output
        )
    url, context = f"https://127.0.0.1:{port}", client_context(tmp_path / "tls" / "cert.pem")
    # JBDA-like: 20 natural seeds, then 15 small signed steps away from each; benign: natural test digits.
    seeds = digits_splits.pool[:20]
    steps = 0.05 * np.sign(np.random.default_rng(0).normal(size=(15, *seeds.shape)))
    grown = np.clip(seeds[None] + steps, 0, 1).reshape(-1, *seeds.shape[1:])
    attack = np.concatenate([seeds, grown]).astype(np.float32)  # the server reads float32
    natural = digits_splits.test.x[: len(attack)]
    served: dict[str, list[np.ndarray]] = {attacker.key_id: [], benign.key_id: []}
    serving: dict[str, list[int]] = {attacker.key_id: [], benign.key_id: []}
    try:
        deadline = time.monotonic() + 300
        while "with 4 workers" not in log_file.read_text():
            assert server.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, "the 4 workers did not start within 300 s"
            time.sleep(0.5)
        workers = worker_pids(server.pid)
        assert len(workers) == 4, workers
        for start in range(0, len(attack), 8):  # each request on a new connection: the kernel picks a worker
            for client, rows in ((attacker, attack), (benign, natural)):
                with httpx.Client(verify=context, timeout=60) as session:
                    answer = session.post(
                        f"{url}/v1/predict",
                        json={"inputs": rows[start : start + 8].tolist()},
                        headers={"X-API-Key": client.api_key},
                    )
                    assert answer.status_code == 200, answer.text
                    served[client.key_id].append(np.asarray(answer.json()["outputs"]))
                    (holder,) = established_by(port, workers)
                    serving[client.key_id].append(holder)
        with httpx.Client(verify=context, timeout=60) as session:
            alarms = session.get(f"{url}/admin/alarms", headers={"X-API-Key": admin.api_key}).json()["alarms"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    log = log_file.read_text()
    assert server.returncode == 0 and "Traceback" not in log, log[-3000:]
    assert len(set(serving[attacker.key_id])) >= 3, serving  # the stream was spread over the workers

    # The in-process detector on the same stream, classes from the answers served (PRADA logs, never changes).
    detector = prada(delta=0.85)
    state = detector.init()
    for client, rows in ((attacker, attack), (benign, natural)):
        for start, answers in zip(range(0, len(rows), 8), served[client.key_id], strict=True):
            context = QueryContext(rows[start : start + 8], jax.random.key(0), client=client.key_id)
            _, state = detector.apply(answers, state, context)
    expected = state.traces[attacker.key_id].alarm
    assert expected is not None and state.traces[benign.key_id].alarm is None
    (alarm,) = alarms  # once for the key, though its later requests went to several workers
    assert alarm["key_id"] == attacker.key_id and alarm["name"] == "detected"
    assert alarm["report"]["queries_to_detection"] == expected.queries
    after_alarm = serving[attacker.key_id][(expected.queries + 7) // 8 :]
    assert len(set(after_alarm)) >= 2, serving
