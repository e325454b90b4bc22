"""Failed authentications against a live server on loopback: wrong secrets meet 401, then 429 with
Retry-After past the allowance (held before it is answered), every throttled attempt is audited with its
reason, and the valid client keeps being served throughout.

Each test starts its own server in a thread on a free port of 127.0.0.1 and stops it at the end.
"""

from __future__ import annotations

import time

import httpx
import pytest

from heistlab.defenses import rounding
from heistlab.serving.app import create_app
from heistlab.serving.audit import AuditLog
from heistlab.serving.auth import Authenticator, KeyStore, create_key
from heistlab.serving.failed_auth import FailedAuthThrottle
from heistlab.serving.server import serve_in_thread
from heistlab.serving.service import build_core
from heistlab.serving.tls import client_context, self_signed_pair
from heistlab.serving.validation import input_schema

BURST, HOLD_S = 3, 0.3


@pytest.fixture
def server(tmp_path, small_victim):
    """A served ``small_victim`` whose throttle allows 3 failures, refilling one per 100 s."""
    pair = self_signed_pair(tmp_path / "tls")
    store = tmp_path / "keys.json"
    create_key(store, "admin")
    audit = AuditLog(tmp_path / "audit.sqlite")
    throttle = FailedAuthThrottle(burst=BURST, rate=0.01, hold_s=HOLD_S)
    authenticator = Authenticator(KeyStore(store), b"k" * 32, 300, throttle=throttle)
    core = build_core(small_victim, rounding(2), audit=audit)
    app = create_app(core, authenticator, audit, input_schema(small_victim.input_shape, max_batch=16))
    running = serve_in_thread(app, pair.certfile, pair.keyfile)
    client = httpx.Client(base_url=running.url, verify=client_context(pair.certfile), timeout=30)
    yield client, store, audit
    client.close()
    running.stop()


def predict(client: httpx.Client, x, api_key: str) -> httpx.Response:
    return client.post("/v1/predict", json={"inputs": x.tolist()}, headers={"X-API-Key": api_key})


def token(client: httpx.Client, key_id: str, secret: str) -> httpx.Response:
    form = {"grant_type": "client_credentials", "client_id": key_id, "client_secret": secret}
    return client.post("/oauth/token", data=form)


def test_wrong_secrets_get_401_then_429_and_the_valid_client_keeps_being_served(server, digits_splits):
    client, store, audit = server
    good = create_key(store, "probabilities")
    x = digits_splits.test.x[:2]
    wrong = f"{good.key_id}.not-the-secret"
    assert [predict(client, x, wrong).status_code for _ in range(BURST)] == [401] * BURST
    assert predict(client, x, good.api_key).status_code == 200
    started = time.monotonic()
    throttled = [predict(client, x, wrong), token(client, good.key_id, "not-the-secret")]
    assert time.monotonic() - started >= 2 * HOLD_S  # each throttled answer was held first
    for response in throttled:
        assert response.status_code == 429, response.text
        assert int(response.headers["Retry-After"]) >= 1
        body = response.json()
        assert body["error"] == "too_many_failures" and f"for key {good.key_id}" in body["message"]
        assert set(body) == {"error", "message", "request_id", "retry_after"}
    assert predict(client, x, good.api_key).status_code == 200  # the right secret is still served
    assert token(client, good.key_id, good.key).status_code == 200
    rows = audit.requests(limit=50)
    reasons = [row["reason"] for row in rows if row["status"] == 429]
    assert len(reasons) == 2 and all(reason.startswith("throttled: more than 3 failed") for reason in reasons)
    assert sum(row["status"] == 401 for row in rows) == BURST
    assert sum(row["status"] == 200 and row["outcome"] == "served" for row in rows) == 2


@pytest.mark.slow
def test_unknown_key_ids_are_throttled_by_source_address(server, digits_splits):
    client, store, audit = server
    good = create_key(store, "labels")
    x = digits_splits.test.x[:1]
    statuses = [predict(client, x, f"guess{attempt}.secret").status_code for attempt in range(BURST + 2)]
    assert statuses == [401] * BURST + [429] * 2
    refused = predict(client, x, "another.guess")
    assert refused.status_code == 429 and "from 127.0.0.1" in refused.json()["message"]
    assert predict(client, x, good.api_key).status_code == 200  # same address, right secret: served
    assert audit.count(outcome="served") == 1
