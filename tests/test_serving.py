"""The prediction server over HTTPS on loopback: credentials, roles, exact quotas under concurrency, the audit
log, fuzzed requests, alarms, and a knockoff attack whose result matches the in-process one.

Each test starts its own server in a thread on a free port of 127.0.0.1 with a self-signed certificate made
here, and stops it at the end; every request loop is bounded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import httpx
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from heistlab.api import InvalidQuery, PredictionAPI, QueryRefused
from heistlab.attacks.evasion import EvasionStage, fgsm, run_evasion
from heistlab.attacks.knockoff import knockoff
from heistlab.defenses import Defense, chain, rounding
from heistlab.defenses.prada import prada
from heistlab.experiment import measure
from heistlab.serving.app import create_app
from heistlab.serving.audit import AuditLog
from heistlab.serving.auth import Authenticator, Credential, KeyStore, create_key, revoke_key
from heistlab.serving.client import http_oracle, remote_api, write_credentials
from heistlab.serving.server import serve_in_thread
from heistlab.serving.service import ServingCore, build_core
from heistlab.serving.tls import client_context, self_signed_pair
from heistlab.serving.validation import input_schema

CHEAP_KDF = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1, "dklen": 32}
JSON = {"Content-Type": "application/json"}


class Deployment(NamedTuple):
    url: str
    ca_file: str
    core: ServingCore
    audit: AuditLog
    store: str
    key: Callable[[str], Credential]
    https: Callable[[], httpx.Client]
    stop: Callable[[], None]


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    return self_signed_pair(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def deploy(tmp_path, tls_pair, small_victim):
    """Starts servers for ``small_victim`` (stopped after the test); keys share one store per test."""
    running, clients = [], []
    store = tmp_path / "keys.json"

    def key(role: str) -> Credential:
        return create_key(store, role, kdf=CHEAP_KDF)

    def https() -> httpx.Client:
        clients.append(httpx.Client(verify=client_context(tls_pair.certfile), timeout=30))
        return clients[-1]

    def start(defense: Defense | None = None, audit_db=None, auth_clock=time.time, token_ttl_s=300, **limits):
        if not store.exists():
            key("admin")
        audit = AuditLog(audit_db or tmp_path / "audit.sqlite")
        core = build_core(small_victim, defense or rounding(2), audit=audit, **limits)
        authenticator = Authenticator(KeyStore(store), b"k" * 32, token_ttl_s, clock=auth_clock)
        schema = input_schema(small_victim.input_shape, max_batch=256)
        server = serve_in_thread(
            create_app(
                core, authenticator, audit, schema, rate=limits.get("rate"), burst=limits.get("burst")
            ),
            tls_pair.certfile,
            tls_pair.keyfile,
        )
        running.append(server)
        return Deployment(
            server.url, str(tls_pair.certfile), core, audit, str(store), key, https, server.stop
        )

    yield start
    for client in clients:
        client.close()
    for server in running:
        server.stop()


def token_for(client: httpx.Client, url: str, credential: Credential) -> str:
    form = {
        "grant_type": "client_credentials",
        "client_id": credential.key_id,
        "client_secret": credential.key,
    }
    response = client.post(f"{url}/oauth/token", data=form)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def predict(client, url, inputs, headers, **extra) -> httpx.Response:
    return client.post(
        f"{url}/v1/predict", json={"inputs": np.asarray(inputs).tolist(), **extra}, headers=headers
    )


def test_no_request_without_valid_credentials_is_served(deploy, digits_splits):
    server = deploy()
    client, good = server.https(), server.key("probabilities")
    other_server_token = token_for(client, server.url, good).rsplit(".", 1)[0] + ".c2lnbmVk"
    x = digits_splits.test.x[:2]
    attempts = [
        {},
        {"X-API-Key": "no-dot-here"},
        {"X-API-Key": f"{good.key_id}.wrong-secret"},
        {"X-API-Key": f"unknown.{good.key}"},
        {"Authorization": f"Basic {good.api_key}"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer hl1.e30.AAAA"},
        {"Authorization": f"Bearer {other_server_token}"},
    ]
    for headers in attempts:
        response = predict(client, server.url, x, headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert client.get(f"{server.url}/v1/info", headers=headers).status_code == 401
    assert server.core.served(good.key_id) == 0
    assert server.audit.count(outcome="refused") == 2 * len(attempts)
    assert server.audit.count(outcome="served") == 0
    assert predict(client, server.url, x, {"X-API-Key": good.api_key}).status_code == 200


def test_expired_and_revoked_credentials_are_refused(deploy, digits_splits):
    now = [1_000.0]
    server = deploy(auth_clock=lambda: now[0], token_ttl_s=60)
    client, admin = server.https(), server.key("admin")
    alice, bob = server.key("probabilities"), server.key("labels")
    x = digits_splits.test.x[:1]
    token = token_for(client, server.url, alice)
    bearer = {"Authorization": f"Bearer {token}"}
    assert predict(client, server.url, x, bearer).status_code == 200
    now[0] += 60.0
    expired = predict(client, server.url, x, bearer)
    assert expired.status_code == 401 and "expired" in expired.json()["message"]

    fresh = {"Authorization": f"Bearer {token_for(client, server.url, alice)}"}
    assert predict(client, server.url, x, fresh).status_code == 200
    forbidden = client.post(
        f"{server.url}/admin/keys/{alice.key_id}/revoke", headers={"X-API-Key": bob.api_key}
    )
    assert forbidden.status_code == 403
    revoked = client.post(
        f"{server.url}/admin/keys/{alice.key_id}/revoke", headers={"X-API-Key": admin.api_key}
    )
    assert revoked.status_code == 200 and revoked.json()["revoked"] is not None
    for headers in (fresh, {"X-API-Key": alice.api_key}):
        refused = predict(client, server.url, x, headers)
        assert refused.status_code == 401 and "revoked" in refused.json()["message"]
    form = {"grant_type": "client_credentials", "client_id": alice.key_id, "client_secret": alice.key}
    denied = client.post(f"{server.url}/oauth/token", data=form)
    assert denied.status_code == 401 and denied.json()["error"] == "invalid_client"

    assert predict(client, server.url, x, {"X-API-Key": bob.api_key}).status_code == 200
    revoke_key(server.store, bob.key_id)  # the operator's CLI edits the store file; the server notices
    assert predict(client, server.url, x, {"X-API-Key": bob.api_key}).status_code == 401
    missing = client.post(f"{server.url}/admin/keys/nope/revoke", headers={"X-API-Key": admin.api_key})
    assert missing.status_code == 404


@pytest.mark.slow
def test_roles_decide_what_a_client_receives_and_may_do(deploy, digits_splits, small_victim):
    server = deploy(top_k=2)
    client = server.https()
    x = digits_splits.test.x[:4]
    probs = rounding(2).apply(small_victim.predict_proba(x), (), None)[0]
    keys = {
        role: {"X-API-Key": server.key(role).api_key}
        for role in ("labels", "top_k", "probabilities", "admin")
    }

    labels = predict(client, server.url, x, keys["labels"]).json()
    assert labels["output"] == "labels" and labels["outputs"] == np.argmax(probs, axis=1).tolist()
    top = np.asarray(predict(client, server.url, x, keys["top_k"]).json()["outputs"])
    assert ((top > 0).sum(axis=1) <= 2).all() and np.allclose(top.max(axis=1), np.max(probs, axis=1))
    full = np.asarray(predict(client, server.url, x, keys["probabilities"]).json()["outputs"], np.float32)
    assert np.array_equal(full, np.asarray(probs))
    assert predict(client, server.url, x, keys["probabilities"], output="labels").json()["output"] == "labels"
    for role, asked in (("labels", "probabilities"), ("labels", "top_k"), ("top_k", "probabilities")):
        refused = predict(client, server.url, x, keys[role], output=asked)
        assert refused.status_code == 403 and asked in refused.json()["message"]
    assert (
        predict(client, server.url, x, keys["admin"]).status_code == 403
    )  # admins are served no predictions

    for path in ("/admin/audit", "/admin/alarms"):
        assert client.get(f"{server.url}{path}", headers=keys["probabilities"]).status_code == 403
        assert client.get(f"{server.url}{path}", headers=keys["admin"]).status_code == 200
    rows = client.get(f"{server.url}/admin/audit?limit=3", headers=keys["admin"]).json()["requests"]
    assert len(rows) == 3 and rows[0]["path"] == "/admin/alarms"
    info = client.get(f"{server.url}/v1/info", headers=keys["top_k"]).json()
    assert info["outputs"] == ["top_k", "labels"] and info["input_shape"] == [8, 8, 1] and info["top_k"] == 2


def test_32_concurrent_clients_on_one_key_get_exactly_the_quota(deploy, digits_splits):
    """32 threads hammer one key (each with its own HTTPS connection) until refused: exactly 96 rows."""
    quota, workers = 96, 32
    server = deploy(quota=quota)
    credential = server.key("probabilities")
    token = token_for(server.https(), server.url, credential)
    row = digits_splits.test.x[:1].tolist()
    statuses: list[list[int]] = [[] for _ in range(workers)]
    barrier = threading.Barrier(workers)

    def hammer(worker: int) -> None:
        headers = (
            {"X-API-Key": credential.api_key} if worker % 4 == 0 else {"Authorization": f"Bearer {token}"}
        )
        with httpx.Client(verify=client_context(server.ca_file), timeout=60) as client:
            barrier.wait(timeout=60)
            for _ in range(quota + 1):
                status = client.post(
                    f"{server.url}/v1/predict", json={"inputs": row}, headers=headers
                ).status_code
                statuses[worker].append(status)
                if status != 200:
                    break

    threads = [threading.Thread(target=hammer, args=(worker,)) for worker in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    sent = [status for worker in statuses for status in worker]
    assert sent.count(200) == quota and all(worker[-1] == 429 for worker in statuses)
    assert set(sent) == {200, 429} and server.core.served(credential.key_id) == quota
    assert server.audit.count(key_id=credential.key_id) == len(sent) + 1  # and the token request
    assert server.audit.served_rows()[credential.key_id] == quota
    assert server.audit.count(key_id=credential.key_id, outcome="refused") == sent.count(429)


def test_quota_refuses_whole_batches_and_stays_spent_after_a_restart(deploy, digits_splits, tmp_path):
    server = deploy(quota=10)
    credential = server.key("probabilities")
    write_credentials(tmp_path / "client.json", [credential])
    oracle = http_oracle(server.url, tmp_path / "client.json", server.ca_file)
    oracle.query(digits_splits.test.x[:8])
    with pytest.raises(QueryRefused) as refused:
        oracle.query(digits_splits.test.x[:4])  # 2 left: refused whole, nothing served
    assert refused.value.remaining == 2 and refused.value.retry_after == float("inf")
    assert oracle.remaining == 2
    response = predict(
        server.https(), server.url, digits_splits.test.x[:4], {"X-API-Key": credential.api_key}
    )
    assert response.status_code == 429 and response.headers["Retry-After"] == "86400"
    rows_before = server.audit.count()
    server.stop()

    restarted = deploy(quota=10)  # the same audit log and key store
    assert restarted.core.remaining(credential.key_id) == 2
    again = http_oracle(restarted.url, tmp_path / "client.json", restarted.ca_file)
    assert again.query(digits_splits.test.x[:2]).shape == (2, 10) and again.remaining == 0
    assert restarted.audit.count() > rows_before


def test_rate_limit_answers_429_with_retry_after_on_the_real_clock(deploy, digits_splits, tmp_path):
    now = [0.0]
    server = deploy(rate=8.0, burst=16, clock=lambda: now[0])
    credential = server.key("probabilities")
    write_credentials(tmp_path / "client.json", [credential])
    client, headers = server.https(), {"X-API-Key": credential.api_key}
    assert predict(client, server.url, digits_splits.test.x[:16], headers).status_code == 200
    limited = predict(client, server.url, digits_splits.test.x[:4], headers)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    assert limited.json()["retry_after"] == pytest.approx(0.5) and limited.json()["error"] == "rate_limited"
    oracle = http_oracle(server.url, tmp_path / "client.json", server.ca_file, max_wait_s=0)
    with pytest.raises(QueryRefused) as refused:
        oracle.query(digits_splits.test.x[:4])
    assert refused.value.retry_after == pytest.approx(0.5)

    waited = []
    patient = remote_api(server.url, tmp_path / "client.json", server.ca_file, max_wait_s=5)
    patient._sleep = lambda seconds: (waited.append(seconds), now.__setitem__(0, now[0] + seconds))
    assert patient.query(digits_splits.test.x[:4]).shape == (4, 10)
    assert waited == [pytest.approx(0.5)] and patient.simulated_seconds("attacker") == pytest.approx(0.5)
    assert (
        predict(client, server.url, digits_splits.test.x[:17], headers).status_code == 429
    )  # past the burst


ROWS = st.integers(1, 3)


def with_cell(rows: int, cell) -> dict:
    """A request body of ``rows`` well-shaped digits whose first cell is ``cell``."""
    inputs = np.full((rows, 8, 8, 1), 0.5).tolist()
    inputs[0][0][0][0] = cell
    return {"inputs": inputs}


def bad_bodies():
    """Requests that must all be refused: broken JSON, wrong structure, shapes, dtypes and values."""
    not_numbers = st.none() | st.booleans() | st.text(max_size=4)
    scalars = not_numbers | st.floats() | st.integers()
    junk = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
        max_leaves=8,
    )
    wrong_shape = (
        st.tuples(ROWS, st.integers(1, 9), st.integers(1, 9))
        .filter(lambda shape: shape[1:] != (8, 8))
        .map(lambda shape: {"inputs": np.full((*shape, 1), 0.5).tolist()})
    )
    bad_value = st.tuples(ROWS, st.sampled_from([np.nan, np.inf, -np.inf, -0.5, 1.5, 1e300])).map(
        lambda case: {"inputs": np.full((case[0], 8, 8, 1), case[1]).tolist()}
    )
    bad_cell = st.tuples(ROWS, not_numbers | st.lists(scalars, max_size=2)).map(lambda case: with_cell(*case))
    documents = st.one_of(
        (scalars | st.dictionaries(st.text(max_size=3), scalars, max_size=2)).map(lambda v: {"inputs": v}),
        scalars | st.lists(junk, max_size=3),
        st.fixed_dictionaries({"inputs": junk}),
        wrong_shape,
        bad_value,
        bad_cell,
        st.text(max_size=6)
        .filter(lambda output: output not in ("probabilities", "top_k", "labels"))
        .map(lambda output: {**with_cell(1, 0.5), "output": output}),
        st.fixed_dictionaries({"inputs": st.just([]), "extra": junk}),
    )
    encoded = documents.map(lambda document: (json.dumps(document).encode(), "application/json"))
    raw = st.tuples(st.binary(max_size=64), st.sampled_from(["application/json", "text/plain", ""]))
    return st.one_of(encoded, encoded, raw)


@pytest.mark.slow
def test_fuzzed_bad_requests_get_4xx_never_5xx_and_the_server_keeps_serving(deploy, digits_splits):
    server = deploy(quota=None)
    client = server.https()
    headers = {"X-API-Key": server.key("probabilities").api_key}
    seen = []

    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=bad_bodies(), authorization=st.sampled_from(["key", "none", "garbage"]))
    def send(case, authorization):
        body, content_type = case
        sent = {"key": headers, "none": {}, "garbage": {"Authorization": "Bearer x.y.z"}}[authorization]
        response = client.post(
            f"{server.url}/v1/predict", content=body, headers={**sent, "Content-Type": content_type}
        )
        seen.append(response.status_code)
        assert 400 <= response.status_code < 500, (body[:200], response.text)
        answer = response.json()
        assert set(answer) >= {"error", "message", "request_id"}
        assert "Traceback" not in response.text and 'File "' not in response.text

    send()
    assert len(seen) == 100 and {401, 422} <= set(seen)
    assert predict(client, server.url, digits_splits.test.x[:2], headers).status_code == 200
    assert server.audit.count(outcome="error") == 0


def test_internal_errors_answer_a_generic_500_with_a_request_id(deploy, tls_pair, small_victim, tmp_path):
    server = deploy()
    credential = server.key("probabilities")
    client = server.https()
    original = server.core.api.query
    server.core.api.query = lambda inputs, client: (_ for _ in ()).throw(
        RuntimeError("secret internal detail")
    )
    response = predict(client, server.url, np.zeros((1, 8, 8, 1)), {"X-API-Key": credential.api_key})
    server.core.api.query = original
    assert response.status_code == 500
    assert response.json()["error"] == "internal_error" and response.json()["request_id"]
    assert "secret internal detail" not in response.text and "Traceback" not in response.text
    assert server.audit.count(outcome="error") == 1
    assert server.core.served(credential.key_id) == 0  # a failed batch costs no quota
    assert (
        predict(client, server.url, np.zeros((1, 8, 8, 1)), {"X-API-Key": credential.api_key}).status_code
        == 200
    )


def test_prada_alarms_are_raised_online_per_key_and_visible_to_admins(deploy, digits_splits, small_victim):
    """PRADA (Juuti et al. 2019) watches each key: a JBDA-like stream (16 seeds of one class, each followed by
    three 0.01-steps) is flagged, a benign stream of shuffled test digits is not; only admins see alarms."""
    server = deploy(defense=chain(rounding(2), prada(check_every=10, min_distances=20)))
    client = server.https()
    admin, quiet, busy = (server.key(role) for role in ("admin", "labels", "labels"))
    rng = np.random.default_rng(0)
    seeds = digits_splits.pool[small_victim.predict_proba(digits_splits.pool).argmax(axis=1) == 3][:16]
    steps = [np.clip(seeds + 0.01 * np.sign(rng.normal(size=seeds.shape)), 0, 1) for _ in range(3)]
    synthetic = np.stack([seeds, *steps], axis=1).reshape(-1, *seeds.shape[1:])
    benign = digits_splits.test.x[rng.permutation(len(digits_splits.test.x))[:64]]
    for credential, stream in ((quiet, benign), (busy, synthetic)):
        for start in range(0, 64, 16):
            answer = predict(
                client, server.url, stream[start : start + 16], {"X-API-Key": credential.api_key}
            )
            assert answer.status_code == 200
    assert client.get(f"{server.url}/admin/alarms", headers={"X-API-Key": quiet.api_key}).status_code == 403
    alarms = client.get(f"{server.url}/admin/alarms", headers={"X-API-Key": admin.api_key}).json()["alarms"]
    assert [(alarm["key_id"], alarm["name"]) for alarm in alarms] == [(busy.key_id, "detected")]
    assert (
        alarms[0]["report"]["queries_to_detection"] <= 64 and alarms[0]["report"]["prada_min_w_attack"] < 0.85
    )


def test_token_endpoint_follows_the_client_credentials_grant(deploy):
    server = deploy()
    client, credential = server.https(), server.key("labels")
    url = f"{server.url}/oauth/token"
    basic = client.post(
        url, data={"grant_type": "client_credentials"}, auth=(credential.key_id, credential.key)
    )
    assert basic.status_code == 200 and basic.json()["token_type"] == "Bearer"
    assert basic.json()["expires_in"] == 300 and basic.headers["Cache-Control"] == "no-store"
    form = {"client_id": credential.key_id, "client_secret": credential.key}
    assert (
        client.post(url, data={**form, "grant_type": "password"}).json()["error"] == "unsupported_grant_type"
    )
    assert client.post(url, json={**form, "grant_type": "client_credentials"}).status_code == 400
    wrong = client.post(url, data={**form, "grant_type": "client_credentials", "client_secret": "x"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    schema = client.get(f"{server.url}/openapi.json").json()
    assert {"/oauth/token", "/v1/info", "/v1/predict", "/admin/alarms"} <= set(schema["paths"])
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])


def test_http_oracle_has_the_oracle_interface(deploy, digits_splits, tmp_path):
    server = deploy(quota=50)
    write_credentials(tmp_path / "client.json", [server.key("top_k")])
    oracle = http_oracle(server.url, tmp_path / "client.json", server.ca_file)
    assert oracle.clients == ("attacker",)
    assert (oracle.input_shape, oracle.num_classes, oracle.output, oracle.remaining) == (
        (8, 8, 1),
        10,
        "top_k",
        50,
    )
    assert oracle.query(digits_splits.test.x[:4]).shape == (4, 10) and oracle.remaining == 46
    with pytest.raises(InvalidQuery, match="shaped"):
        oracle.query(np.zeros((2, 64), np.float32))
    with pytest.raises(ValueError, match="may receive top_k, labels; api.output 'probabilities'"):
        http_oracle(server.url, tmp_path / "client.json", server.ca_file, output="probabilities")
    labels = http_oracle(server.url, tmp_path / "client.json", server.ca_file, output="labels")
    assert labels.query(digits_splits.test.x[:2]).dtype == np.int32


def test_knockoff_over_https_matches_the_in_process_result(
    deploy, digits_splits, small_victim, small_surrogate, tmp_path
):
    """Deterministic defense, same seed: same queries, same answers, so the same surrogate bit for bit; and
    what an experiment does with its API afterwards (``measure``, an FGSM evasion stage through the ``evader``
    oracle) gives the same metrics against the server as in-process."""
    budget, evaded, key = 192, 16, jax.random.fold_in(jax.random.key(3), 1)
    attack, evasion = knockoff(budget=budget, query_batch=64), fgsm(epsilon=0.3, count=evaded)
    cfg = OmegaConf.create({"seed": 3, "eval": {"uniform_samples": 64}})

    def experiment(api):
        oracle = api.oracle("attacker")
        stolen = attack.run(oracle, digits_splits.pool, small_surrogate, key)
        found = measure(
            cfg, digits_splits, small_victim, rounding(2), stolen, small_surrogate.model, api, oracle.clients
        )
        victim_labels = lambda x: small_victim.predict_proba(x).argmax(axis=-1)
        stage = EvasionStage(
            api, small_surrogate.model, stolen.params, digits_splits.test.x, digits_splits.test.y,
            victim_labels, jax.random.key(4),
        )  # fmt: skip
        return stolen, {**found, **run_evasion(evasion, stage)}

    local, local_metrics = experiment(
        PredictionAPI(small_victim, rounding(2), key=jax.random.key(3), budget=budget + evaded)
    )
    server = deploy(defense=rounding(2), seed=3, quota=budget + evaded)
    credential = server.key("probabilities")
    write_credentials(tmp_path / "client.json", [credential])
    remote, remote_metrics = experiment(remote_api(server.url, tmp_path / "client.json", server.ca_file))

    assert remote.queries == local.queries == budget
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(remote.params), jax.tree.leaves(local.params), strict=True)
    )
    assert remote_metrics == local_metrics
    assert remote_metrics["queries_served"] == budget and remote_metrics["evasion_queries"] == evaded
    assert server.audit.served_rows()[credential.key_id] == budget + evaded
