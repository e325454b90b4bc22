"""The audit's HTTP probes and their verdicts: the quota drained and crossed (or reported not tested when the
budget cannot cross it), TLS versions and suites, the failed-authentication flood, and the huge-integer body.

Verdicts are checked against a live server on loopback where it shows them, and against a scripted
``httpx.MockTransport`` (or a bare TLS listener) for the weaknesses the server no longer has.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from heistlab.audit import probes
from heistlab.audit.ledger import QueryLedger
from heistlab.defenses import rounding
from heistlab.serving.app import create_app
from heistlab.serving.audit import AuditLog
from heistlab.serving.auth import Authenticator, Credential, KeyStore, create_key
from heistlab.serving.server import serve_in_thread
from heistlab.serving.service import build_core
from heistlab.serving.tls import client_context, self_signed_pair
from heistlab.serving.validation import input_schema

CHEAP_KDF = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1, "dklen": 32}
SAMPLE = np.full((8, 8, 1), 0.5, np.float32)
FAST = probes.ProbeSettings(max_quota_wait_s=5.0, auth_flood_attempts=12)


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    return self_signed_pair(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def serve(tmp_path, tls_pair, small_victim):
    """Starts a server with ``limits`` and a probabilities key; yields (Probing factory, core)."""
    running, clients = [], []

    def start(ledger_rows: int, max_batch: int = 256, **limits):
        store = tmp_path / f"keys{len(running)}.json"
        client = create_key(store, "probabilities", CHEAP_KDF)
        audit = AuditLog(tmp_path / f"audit{len(running)}.sqlite")
        core = build_core(small_victim, rounding(2), audit=audit, **limits)
        schema = input_schema(small_victim.input_shape, max_batch=max_batch)
        app = create_app(
            core, Authenticator(KeyStore(store), b"s" * 32), audit, schema, rate=limits.get("rate"),
            burst=limits.get("burst"),
        )  # fmt: skip
        running.append(serve_in_thread(app, tls_pair.certfile, tls_pair.keyfile))
        clients.append(httpx.Client(base_url=running[-1].url, verify=client_context(tls_pair.certfile)))
        info = clients[-1].get("/v1/info", headers=probes.key_header(client)).json()
        ledger = QueryLedger(ledger_rows)
        return probes.Probing(clients[-1], probes.Keys(client), info, SAMPLE, ledger, FAST), core

    yield start
    for client in clients:
        client.close()
    for server in running:
        server.stop()


def test_the_quota_probe_drains_a_quota_larger_than_a_batch_and_crosses_it(serve):
    probing, core = serve(ledger_rows=100, max_batch=8, quota=30)
    found = probes.quota(probing)
    assert found.tested and not found.present, found.happened
    assert found.figures["rows_drained"] == 24 and found.figures["remaining_drained"] == 6
    assert (found.figures["status"], found.figures["error"]) == (429, "refused")
    assert found.figures["remaining_after"] == 6
    assert probing.ledger.spent == {"probes": 24 + 7}
    assert core.served(probing.keys.client.key_id) == 24


def test_the_quota_probe_paces_a_rate_limited_drain_and_still_crosses(serve):
    probing, _ = serve(ledger_rows=100, max_batch=8, quota=40, rate=200.0, burst=8)
    found = probes.quota(probing)
    assert found.tested and not found.present, found.happened
    assert found.figures["rows_drained"] == 40 - found.figures["remaining_drained"]
    assert found.figures["remaining_drained"] < 8 and found.figures["status"] == 429


def test_a_quota_the_budget_cannot_cross_is_reported_not_tested_never_held(serve):
    probing, core = serve(ledger_rows=20, max_batch=8, quota=30)
    found = probes.quota(probing)
    assert not found.tested and found.reason == "not tested"
    assert "takes 31 rows" in found.happened and "20 left" in found.happened
    assert probing.ledger.spent == {} and core.served(probing.keys.client.key_id) == 0


def scripted(handler: Callable[[httpx.Request], httpx.Response]) -> probes.Probing:
    http = httpx.Client(base_url="https://127.0.0.1:9", transport=httpx.MockTransport(handler))
    info = {"input_range": [0.0, 1.0], "max_body_bytes": 4096, "max_batch": 8}
    return probes.Probing(
        http, probes.Keys(Credential("abc", "secret")), info, SAMPLE, QueryLedger(1000), FAST, lambda _: None
    )


def test_the_failed_auth_flood_holds_when_the_server_answers_429_with_retry_after():
    seen = []

    def throttling(request: httpx.Request) -> httpx.Response:
        if request.headers.get("X-API-Key") == "abc.secret":
            return httpx.Response(200, json={})
        seen.append(1)
        if len(seen) > 5:
            return httpx.Response(429, json={"error": "throttled"}, headers={"Retry-After": "30"})
        return httpx.Response(401, json={"error": "unauthenticated"})

    found = probes.failed_auth_flood(scripted(throttling))
    assert found.tested and not found.present
    assert found.figures["first_429_at"] == 6 and found.figures["status_counts"] == {"401": 5, "429": 7}
    assert found.figures["genuine_key_status_after"] == 200


def test_the_failed_auth_flood_reports_a_server_that_never_throttles(serve):
    probing, _ = serve(ledger_rows=10)
    found = probes.failed_auth_flood(probing)
    statuses = found.figures["status_counts"]
    assert sum(statuses.values()) == 12 and set(statuses) <= {"401", "429"}
    # Against this server: present exactly when no attempt met a 429 (either way is reported, never silent).
    assert found.present == ("429" not in statuses) and found.tested
    if found.present:
        assert found.severity == "low" and found.title == "Failed authentication is not throttled"
    without_retry_after = probes.failed_auth_flood(
        scripted(lambda request: httpx.Response(429, json={"error": "throttled"}))
    )
    assert without_retry_after.present and without_retry_after.severity == "low"
    assert "without Retry-After" in without_retry_after.title
    accepting = probes.failed_auth_flood(scripted(lambda request: httpx.Response(200, json={})))
    assert accepting.present and accepting.severity == "critical"


def test_a_huge_integer_body_answered_500_is_a_validation_finding_and_a_400_holds(serve):
    def breaks_on_huge_integers(request: httpx.Request) -> httpx.Response:
        if b"1" * 5000 in request.content:
            return httpx.Response(500, json={"error": "internal_error"})
        return httpx.Response(422, json={"error": "invalid_input"})

    found = probes.validation(scripted(breaks_on_huge_integers))[0]
    assert found.present and found.severity == "medium"
    assert found.figures["statuses"]["huge integer literal"] == 500
    assert "server errors: huge integer literal" in found.happened
    probing, _ = serve(ledger_rows=100)
    live = probes.validation(probing)[0]
    assert not live.present and live.figures["statuses"]["huge integer literal"] == 400


def test_the_tls_probe_holds_against_the_server(serve):
    probing, _ = serve(ledger_rows=10)
    found = probes.tls(probing)
    assert found.tested and not found.present, found.happened
    versions = found.figures["versions_accepted"]
    assert versions["TLSv1.2"] and versions["TLSv1.3"] and not versions["TLSv1.1"]
    accepted = found.figures["tls12_suites_accepted"]
    assert accepted and all("GCM" in name or "CHACHA20" in name for name in accepted)
    assert found.figures["tls12_suites_tried"] > 50


@pytest.fixture
def cbc_listener(tls_pair):
    """A bare TLS listener on loopback that accepts TLS 1.2 with uvicorn's old default cipher string."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_pair.certfile, tls_pair.keyfile)
    context.set_ciphers("TLSv1")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                with contextlib.suppress(ssl.SSLError, OSError):
                    context.wrap_socket(connection, server_side=True).close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    listener.close()


def test_the_tls_probe_reports_cbc_suites_offered_at_tls12(cbc_listener):
    http = httpx.Client(base_url=f"https://127.0.0.1:{cbc_listener}")
    probing = probes.Probing(http, probes.Keys(Credential("a", "b")), {}, SAMPLE, QueryLedger(1), FAST)
    found = probes.tls(probing)
    assert found.present and found.severity == "low", found.happened
    assert "ECDHE-ECDSA-AES128-SHA" in found.happened and "ECDHE-ECDSA-AES256-SHA" in found.happened
