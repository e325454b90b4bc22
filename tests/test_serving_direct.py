"""``POST /v1/predict`` served past FastAPI's router (``DirectRoutes``) answers exactly as the router does:
the same statuses, headers, bodies and audit rows for served, refused, invalid and failing requests; and the
transport that merges an answer's writes sends the same bytes in the same order.

Two apps over one key store, each with its own audit log and quota, get the same requests in the same order
(in process, through Starlette's test client).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from heistlab.defenses import rounding
from heistlab.serving.app import create_app
from heistlab.serving.audit import AuditLog
from heistlab.serving.auth import Authenticator, KeyStore, create_key
from heistlab.serving.server import MergedWrites
from heistlab.serving.service import build_core
from heistlab.serving.validation import input_schema

CHEAP_KDF = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1, "dklen": 32}
QUOTA = 12
VARYING_HEADERS = ("x-request-id",)


def answer_seen(response) -> tuple:
    """A response as compared: status, headers (less the request id) and body (less the request id)."""
    headers = [(name, value) for name, value in response.headers.items() if name not in VARYING_HEADERS]
    try:
        body = response.json()
        if isinstance(body, dict):
            body.pop("request_id", None)
    except json.JSONDecodeError:
        body = response.content
    return response.status_code, headers, body


def audit_seen(audit: AuditLog) -> list[dict]:
    return [
        {name: value for name, value in row.items() if name not in ("request_id", "time")}
        for row in audit.requests(limit=1000)
    ]


@pytest.fixture
def twin_apps(tmp_path, small_victim):
    """Two apps over one key store: POST /v1/predict served directly, and through FastAPI's router."""
    store = tmp_path / "keys.json"
    keys = {role: create_key(store, role, kdf=CHEAP_KDF) for role in ("labels", "probabilities")}
    apps = []
    for direct in (True, False):
        audit = AuditLog(tmp_path / f"audit-{direct}.sqlite")
        # a clock that stands still: the token bucket never refills, so each Retry-After is the same
        core = build_core(
            small_victim, rounding(2), audit=audit, quota=QUOTA, rate=1.0, burst=10, clock=lambda: 0.0
        )
        authenticator = Authenticator(KeyStore(store), b"k" * 32, 300)
        schema = input_schema(small_victim.input_shape, max_batch=8, max_body_bytes=64 * 1024)
        app = create_app(core, authenticator, audit, schema, direct_predict=direct)
        apps.append((app, core, audit))
    return apps, keys


def test_direct_predictions_answer_and_audit_exactly_as_the_router(twin_apps, small_victim, digits_splits):
    apps, keys = twin_apps
    x = digits_splits.test.x[:8]
    labels, probabilities = keys["labels"].api_key, keys["probabilities"].api_key
    as_json = {"Content-Type": "application/json"}
    requests = [
        ("post", "/v1/predict", {"json": {"inputs": x[:2].tolist()}, "headers": {"X-API-Key": labels}}),
        ("post", "/v1/predict", {"json": {"inputs": x[:1].tolist(), "output": "top_k"},
                                 "headers": {"X-API-Key": probabilities}}),
        ("post", "/v1/predict", {"json": {"inputs": x[:1].tolist(), "output": "probabilities"},
                                 "headers": {"X-API-Key": labels}}),  # 403
        ("post", "/v1/predict", {"json": {"inputs": x[:1].tolist()}}),  # 401: no credentials
        ("post", "/v1/predict", {"json": {"inputs": x[:1].tolist()},
                                 "headers": {"Authorization": "Bearer not.a.token"}}),
        ("post", "/v1/predict", {"json": {"inputs": x[:1].tolist()},
                                 "headers": {"X-API-Key": f"{keys['labels'].key_id}.wrong"}}),
        ("post", "/v1/predict", {"content": b"{", "headers": {"X-API-Key": labels, **as_json}}),  # 400
        ("post", "/v1/predict", {"content": b"inputs=1", "headers": {"X-API-Key": labels}}),  # 415
        ("post", "/v1/predict", {"json": {"inputs": [[1.0, 2.0]]}, "headers": {"X-API-Key": labels}}),
        ("post", "/v1/predict", {"json": {"inputs": (x[:1] * 9).tolist()}, "headers": {"X-API-Key": labels}}),
        ("post", "/v1/predict", {"json": {"inputs": x[:1].tolist(), "extra": 1},
                                 "headers": {"X-API-Key": labels}}),  # 422
        ("post", "/v1/predict", {"content": b"[" + b"0," * 40_000 + b"0]",
                                 "headers": {"X-API-Key": labels, **as_json}}),  # 413
        ("post", "/v1/predict", {"json": {"inputs": x[:8].tolist()}, "headers": {"X-API-Key": labels}}),
        ("post", "/v1/predict", {"json": {"inputs": x[:4].tolist()}, "headers": {"X-API-Key": labels}}),
        ("post", "/v1/predict", {"json": {"inputs": x[:6].tolist()}, "headers": {"X-API-Key": labels}}),
        ("post", "/v1/predict/", {"json": {"inputs": x[:1].tolist()}, "headers": {"X-API-Key": labels}}),
        ("get", "/v1/predict", {"headers": {"X-API-Key": labels}}),  # 405, through the router in both
        ("post", "/v1/predict?output=labels", {"json": {"inputs": x[:1].tolist()},
                                               "headers": {"X-API-Key": probabilities}}),
    ]  # fmt: skip
    seen = []
    for app, _, _ in apps:
        with TestClient(app, follow_redirects=False) as client:
            seen.append([answer_seen(getattr(client, method)(path, **kw)) for method, path, kw in requests])
    direct, routed = seen
    assert direct == routed
    statuses = [status for status, _, _ in direct]
    assert {200, 400, 401, 403, 405, 413, 415, 422, 429} <= set(statuses), statuses
    assert audit_seen(apps[0][2]) == audit_seen(apps[1][2])
    assert apps[0][1].served(keys["labels"].key_id) == apps[1][1].served(keys["labels"].key_id)


def test_a_failing_direct_prediction_is_answered_500_and_audited_as_by_the_router(twin_apps, digits_splits):
    apps, keys = twin_apps
    body = {"inputs": digits_splits.test.x[:1].tolist()}
    seen = []
    for app, core, audit in apps:

        def broken(inputs, client):
            raise RuntimeError("the victim fell over")

        core.api.query = broken
        with TestClient(app, raise_server_exceptions=False) as client:
            response = client.post("/v1/predict", json=body, headers={"X-API-Key": keys["labels"].api_key})
        seen.append((answer_seen(response), audit_seen(audit)))
    assert seen[0] == seen[1]
    (status, _, answer), rows = seen[0]
    assert status == 500 and answer == {"error": "internal_error", "message": "internal server error"}
    assert rows[0]["status"] == 500 and rows[0]["outcome"] == "error"


class Recorder:
    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return default


def test_merged_writes_send_the_same_bytes_in_order_one_write_per_turn():
    async def exchange():
        loop = asyncio.get_running_loop()
        recorder = Recorder()
        merged = MergedWrites(recorder, loop)
        merged.write(b"HTTP/1.1 200 OK\r\n\r\n")
        merged.write(b"")
        merged.write(b"body")
        assert recorder.writes == []  # held until the loop's turn ends
        await asyncio.sleep(0)
        merged.writelines([b"a", b"b"])
        await asyncio.sleep(0)
        merged.write(b"last")
        merged.close()  # sends what is held, then closes
        merged.write(b"after close")
        await asyncio.sleep(0)
        return recorder, merged

    recorder, merged = asyncio.run(exchange())
    assert recorder.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"ab", b"last"]
    assert recorder.closed and merged.is_closing() and merged.get_extra_info("peername", 7) == 7


def test_aborting_merged_writes_drops_what_is_held():
    class Aborted(Recorder):
        def abort(self):
            self.closed = True

    async def exchange():
        recorder = Aborted()
        merged = MergedWrites(recorder, asyncio.get_running_loop())
        merged.write(b"held")
        merged.abort()
        await asyncio.sleep(0)
        return recorder

    recorder = asyncio.run(exchange())
    assert recorder.writes == [] and recorder.closed
