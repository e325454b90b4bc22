"""Monitoring the prediction server: GET /metrics against a live server on loopback, the structured request
log, the refusal classes, and the alerting rules and dashboard shipped in monitoring/.

The live test starts its own server in a thread on a free port of 127.0.0.1 (as tests/test_serving.py does),
runs a scripted session and compares the scrape with the audit log and with counts worked out by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest
import yaml
from flax import serialization
from prometheus_client.parser import text_string_to_metric_families

from heistlab.defenses import chain, rounding
from heistlab.defenses.base import Request
from heistlab.defenses.budget import budget
from heistlab.defenses.prada import prada
from heistlab.defenses.rate_limit import rate_limit
from heistlab.serving.app import create_app
from heistlab.serving.audit import AuditEntry, AuditLog
from heistlab.serving.auth import Authenticator, KeyStore, create_key
from heistlab.serving.failed_auth import FailedAuthThrottle
from heistlab.serving.metrics import BuildInfo, build_info, request_outcome, victim_digest
from heistlab.serving.server import serve_in_thread
from heistlab.serving.service import build_core
from heistlab.serving.throttle import real_clock_verdict
from heistlab.serving.tls import client_context, self_signed_pair
from heistlab.serving.validation import input_schema

REPO = Path(__file__).resolve().parent.parent
CHEAP_KDF = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1, "dklen": 32}
QUOTA = 100


def test_refusals_are_told_apart_by_the_reasons_the_real_admission_defenses_give():
    quota = budget(per_client=10)
    refused_by_quota, _ = quota.admit(quota.init(), Request("a", 11, 0.0))
    limiter = rate_limit(1.0, 2)
    _, drained = limiter.admit(limiter.init(), Request("a", 2, 0.0))
    waiting = real_clock_verdict(limiter.admit(drained, Request("a", 2, 0.0))[0])
    too_big, _ = limiter.admit(limiter.init(), Request("a", 3, 0.0))
    throttled = FailedAuthThrottle(1, 0.1, 0.0).refusal("for key k", 5.0)
    assert not refused_by_quota.admitted and not waiting.admitted and not too_big.admitted
    assert request_outcome(429, "refused", refused_by_quota.reason) == "refused_quota"
    assert request_outcome(429, "refused", waiting.reason) == "refused_rate_limit"
    assert request_outcome(429, "refused", too_big.reason) == "refused_rate_limit"
    assert request_outcome(429, "refused", str(throttled)) == "auth_throttled"
    assert request_outcome(429, "refused", "prada alarm") == "refused_detector"
    assert request_outcome(200, "served", "") == "served"
    assert request_outcome(200, "ok", "") == "ok"
    assert [request_outcome(status, "refused", "x") for status in (401, 403, 404, 413, 422)] == [
        "unauthenticated",
        "forbidden",
        "not_found",
        "invalid",
        "invalid",
    ]
    assert request_outcome(500, "error", "internal error") == "error"


def test_rows_after_reads_an_encrypted_log_incrementally(tmp_path):
    log = AuditLog(tmp_path / "audit.sqlite", key=b"k" * 32)
    for index in range(5):
        entry = AuditEntry(
            f"r{index}", 1.0, "alice", "labels", "POST", "/v1/predict", None, index, "served", 200
        )
        log.record(entry)
    first = log.rows_after("requests", 0, limit=3)
    rest = log.rows_after("requests", first[-1]["id"])
    assert [row["request_id"] for row in first + rest] == [f"r{index}" for index in range(5)]
    assert rest[0]["key_id"] == "alice" and "payload" not in rest[0]
    with pytest.raises(ValueError, match="table must be one of requests, alarms"):
        log.rows_after("meta", 0)


def test_workers_sharing_one_audit_database_export_the_same_counts(tmp_path):
    """Two processes' logs on one file (as ``serve.workers`` > 1 opens it): each one's metrics count every
    row, whichever process wrote it, so a scrape answered by either worker gives the same totals."""
    from heistlab.serving.metrics import ServerMetrics, route_matcher

    logs = [AuditLog(tmp_path / "audit.sqlite") for _ in range(2)]
    routes = route_matcher(lambda: [("/v1/predict", re.compile("^/v1/predict$"))])
    workers = [ServerMetrics(log, routes, list, 100, dict, BuildInfo({})) for log in logs]
    for index in range(6):
        status, outcome = (200, "served") if index % 3 else (401, "refused")
        entry = AuditEntry(f"r{index}", 1.0, "k", "labels", "POST", "/v1/predict", None, 4, outcome, status)
        logs[index % 2].record(entry)
        if index == 3:
            assert scraped(workers[0].exposition().decode()) == scraped(workers[1].exposition().decode())
    first, second = (scraped(worker.exposition().decode())["heistlab_requests"] for worker in workers)
    assert first == second
    assert total(first, "heistlab_requests_total", outcome="served") == 4
    assert total(first, "heistlab_requests_total", outcome="unauthenticated", route="/v1/predict") == 2


def test_a_failing_request_log_never_fails_the_request(tmp_path, small_victim):
    from fastapi.testclient import TestClient

    class Broken(logging.Filter):
        def filter(self, record):
            raise RuntimeError("the log shipper is down")

    broken = logging.getLogger("heistlab.test.broken_request_log")
    broken.setLevel(logging.INFO)
    broken.addFilter(Broken())
    store = tmp_path / "keys.json"
    client_key = create_key(store, "labels", kdf=CHEAP_KDF)
    audit = AuditLog(tmp_path / "audit.sqlite")
    core = build_core(small_victim, rounding(2), audit=audit, quota=QUOTA)
    schema = input_schema(small_victim.input_shape, max_batch=256)
    authenticator = Authenticator(KeyStore(store), b"k" * 32, 300)
    app = create_app(core, authenticator, audit, schema, request_log=broken.name)
    body = {"inputs": np.zeros((2, *small_victim.input_shape)).tolist()}
    with TestClient(app) as client:
        answer = client.post("/v1/predict", json=body, headers={"X-API-Key": client_key.api_key})
    assert answer.status_code == 200 and len(answer.json()["outputs"]) == 2
    assert audit.count(outcome="served") == 1


def scraped(text: str) -> dict[str, list]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def total(samples, name: str, **labels) -> float:
    return sum(
        sample.value
        for sample in samples
        if sample.name == name and all(sample.labels.get(label) == value for label, value in labels.items())
    )


def test_scraped_metrics_equal_the_audit_log_after_a_scripted_session(
    tmp_path, small_victim, digits_splits, caplog
):
    """Benign clients, a JBDA-like attacker that PRADA (Juuti et al. 2019) catches and refuses, a client that
    spends its quota, failed logins and bad inputs: the scrape's counts equal the audit log's, per route,
    status and outcome, and the numbers worked out by hand; the request log has one line per audit row and
    no secret, token or input."""
    tls = self_signed_pair(tmp_path / "tls")
    store = tmp_path / "keys.json"
    admin, scraper, benign, attacker, spender = (
        create_key(store, role, kdf=CHEAP_KDF) for role in ("admin", "metrics", "labels", "labels", "labels")
    )
    audit = AuditLog(tmp_path / "audit.sqlite")
    defense = chain(rounding(2), prada(action="refuse", check_every=10, min_distances=20))
    core = build_core(small_victim, defense, audit=audit, quota=QUOTA)
    app = create_app(
        core,
        Authenticator(KeyStore(store), b"k" * 32, 300),
        audit,
        input_schema(small_victim.input_shape, max_batch=256),
        build=build_info({"heistlab": "test"}, victim_digest(small_victim)),
    )
    server = serve_in_thread(app, tls.certfile, tls.keyfile)
    client = httpx.Client(verify=client_context(tls.certfile), timeout=30)
    caplog.set_level(logging.INFO, logger="heistlab.serving.requests")
    try:
        url = server.url

        def predict(credential, inputs):
            body = {"inputs": np.asarray(inputs).tolist()}
            return client.post(f"{url}/v1/predict", json=body, headers={"X-API-Key": credential.api_key})

        rng = np.random.default_rng(0)
        test_x = digits_splits.test.x[rng.permutation(len(digits_splits.test.x))]
        pool = digits_splits.pool
        seeds = pool[small_victim.predict_proba(pool).argmax(axis=1) == 3][:16]
        steps = [np.clip(seeds + 0.01 * np.sign(rng.normal(size=seeds.shape)), 0, 1) for _ in range(3)]
        synthetic = np.stack([seeds, *steps], axis=1).reshape(-1, *seeds.shape[1:])
        benign_statuses = [predict(benign, test_x[i : i + 16]).status_code for i in range(0, 64, 16)]
        attacker_statuses = [predict(attacker, synthetic[i : i + 16]).status_code for i in range(0, 64, 16)]
        attacker_statuses += [predict(attacker, synthetic[:16]).status_code for _ in range(2)]
        spender_statuses = [predict(spender, test_x[i : i + 32]).status_code for i in range(0, 128, 32)]
        token = client.post(
            f"{url}/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": benign.key_id,
                "client_secret": benign.key,
            },
        ).json()["access_token"]
        with_token = client.get(f"{url}/v1/info", headers={"Authorization": f"Bearer {token}"})
        wrong_secret = f"{benign.key_id}.{'0' * len(benign.key)}"
        failed_logins = [
            client.get(f"{url}/v1/info", headers={"X-API-Key": wrong_secret}).status_code for _ in range(3)
        ]
        failed_logins.append(
            client.post(
                f"{url}/oauth/token",
                data={"grant_type": "client_credentials", "client_id": benign.key_id, "client_secret": "x"},
            ).status_code
        )
        invalid = predict(benign, np.zeros((2, 5))).status_code
        as_predictor = client.get(f"{url}/metrics", headers={"X-API-Key": benign.api_key})
        anonymous = client.get(f"{url}/metrics")
        malformed = client.get(f"{url}/metrics?format=json", headers={"X-API-Key": scraper.api_key})
        by_admin = client.get(f"{url}/metrics", headers={"X-API-Key": admin.api_key})
        rows_before_scrape = audit.requests(limit=1000)
        scrape = client.get(f"{url}/metrics", headers={"X-API-Key": scraper.api_key})
    finally:
        client.close()
        server.stop()

    assert benign_statuses == [200] * 4 and with_token.status_code == 200
    # PRADA tests every 10 queries once 20 distances remain: the attacker is alarmed within its 64 queries
    # and every later batch is refused; 3 * 32 rows fit the quota of 100, the fourth batch does not.
    assert attacker_statuses[:2] == [200, 200] and attacker_statuses[-2:] == [429, 429]
    detector_refusals = attacker_statuses.count(429)
    assert spender_statuses == [200, 200, 200, 429]
    assert failed_logins == [401] * 4 and invalid == 422
    assert as_predictor.status_code == 403 and anonymous.status_code == 401 and malformed.status_code == 400
    assert by_admin.status_code == 200 and scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")

    families = scraped(scrape.text)
    requests = families["heistlab_requests"]
    assert total(requests, "heistlab_requests_total") == len(rows_before_scrape)
    for status in {row["status"] for row in rows_before_scrape}:
        logged = sum(row["status"] == status for row in rows_before_scrape)
        assert total(requests, "heistlab_requests_total", status=str(status)) == logged, status
    logged_served = sum(row["outcome"] == "served" for row in rows_before_scrape)
    assert total(requests, "heistlab_requests_total", outcome="served") == logged_served
    expected = {
        "served": 4 + attacker_statuses.count(200) + 3,
        "refused_detector": detector_refusals,
        "refused_quota": 1,
        "unauthenticated": 4 + 1,  # the failed logins and the scrape without credentials
        "forbidden": 1,
        "invalid": 2,  # the mis-shaped inputs and the malformed scrape
        "refused_rate_limit": 0,
    }
    for outcome, count in expected.items():
        assert total(requests, "heistlab_requests_total", outcome=outcome) == count, outcome
    assert total(requests, "heistlab_requests_total", route="/metrics", status="200", role="admin") == 1
    served_rows = sum(row["rows"] for row in rows_before_scrape if row["outcome"] == "served")
    assert (
        total(families["heistlab_request_rows"], "heistlab_request_rows_total", outcome="served")
        == served_rows
    )
    batches = families["heistlab_request_rows_per_request"]
    assert total(batches, "heistlab_request_rows_per_request_count", outcome="refused_quota") == 1
    assert total(batches, "heistlab_request_rows_per_request_bucket", outcome="refused_quota", le="16") == 0
    assert total(batches, "heistlab_request_rows_per_request_bucket", outcome="refused_quota", le="32") == 1
    durations = families["heistlab_request_duration_seconds"]
    assert total(durations, "heistlab_request_duration_seconds_count") == len(rows_before_scrape)

    ratios = {s.labels["key_id"]: s.value for s in families["heistlab_key_quota_used_ratio"]}
    assert ratios[spender.key_id] == pytest.approx(96 / QUOTA)
    assert ratios[benign.key_id] == pytest.approx(64 / QUOTA)
    assert set(ratios) == {admin.key_id, scraper.key_id, benign.key_id, attacker.key_id, spender.key_id}
    alarms = [(s.labels["key_id"], s.labels["alarm"], s.value) for s in families["heistlab_key_alarms"]]
    assert alarms == [(attacker.key_id, "detected", 1.0)]
    assert audit.alarms() and len(audit.alarms()) == 1
    reports = {
        (s.labels["key_id"], s.labels["statistic"]): s.value for s in families["heistlab_defense_report"]
    }
    assert reports[(attacker.key_id, "detected")] == 1.0
    assert reports[(attacker.key_id, "prada_min_w_attack")] < reports[(attacker.key_id, "prada_delta")]
    assert reports[(benign.key_id, "detected")] == 0.0
    assert total(families["heistlab_key_series_omitted"], "heistlab_key_series_omitted") == 0
    (info,) = families["heistlab_build_info"]
    digest = hashlib.sha256(serialization.to_bytes(small_victim.params)).hexdigest()
    assert info.labels["victim_sha256"] == digest and info.labels["heistlab"] == "test"

    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name.endswith("requests")]
    assert [line["request_id"] for line in lines[: len(rows_before_scrape)]] == [
        row["request_id"] for row in reversed(rows_before_scrape)
    ]
    assert as_predictor.headers["X-Request-ID"] in {line["request_id"] for line in lines}
    log_text = "\n".join(record.getMessage() for record in caplog.records)
    for credential in (admin, scraper, benign, attacker, spender):
        assert credential.key not in log_text
    assert token not in log_text and "0" * len(benign.key) not in log_text
    assert json.dumps(np.asarray(test_x[0]).tolist())[:40] not in log_text


def test_per_key_series_are_capped_and_the_rest_counted(tmp_path, small_victim):
    tls = self_signed_pair(tmp_path / "tls")
    store = tmp_path / "keys.json"
    scraper = create_key(store, "metrics", kdf=CHEAP_KDF)
    for _ in range(4):
        create_key(store, "labels", kdf=CHEAP_KDF)
    audit = AuditLog(tmp_path / "audit.sqlite")
    core = build_core(small_victim, rounding(2), audit=audit, quota=QUOTA)
    schema = input_schema(small_victim.input_shape, max_batch=256)
    app = create_app(core, Authenticator(KeyStore(store), b"k" * 32, 300), audit, schema, max_key_series=2)
    server = serve_in_thread(app, tls.certfile, tls.keyfile)
    try:
        with httpx.Client(verify=client_context(tls.certfile), timeout=30) as client:
            text = client.get(f"{server.url}/metrics", headers={"X-API-Key": scraper.api_key}).text
    finally:
        server.stop()
    families = scraped(text)
    assert len(families["heistlab_key_quota_used_ratio"]) == 2
    assert total(families["heistlab_key_series_omitted"], "heistlab_key_series_omitted") == 3


# -- the alerting rules and the dashboard ------------------------------------------------------------------

EXPORTED = {
    "heistlab_requests_total",
    "heistlab_request_rows_total",
    "heistlab_request_rows_per_request_bucket",
    "heistlab_request_rows_per_request_count",
    "heistlab_request_rows_per_request_sum",
    "heistlab_request_duration_seconds_bucket",
    "heistlab_request_duration_seconds_count",
    "heistlab_request_duration_seconds_sum",
    "heistlab_request_duration_seconds_created",
    "heistlab_alarms_total",
    "heistlab_key_alarms_total",
    "heistlab_key_quota_used_ratio",
    "heistlab_defense_report",
    "heistlab_key_series_omitted",
    "heistlab_build_info",
}
METRIC_NAME = re.compile(r"\bheistlab_[a-z_]+\b")


def exported_by_a_server(tmp_path, small_victim) -> set[str]:
    """The sample names a live app exports once every family has a sample (asked in-process)."""
    from fastapi.testclient import TestClient

    store = tmp_path / "keys.json"
    scraper, client_key = (create_key(store, role, kdf=CHEAP_KDF) for role in ("metrics", "labels"))
    audit = AuditLog(tmp_path / "audit.sqlite")
    audit.record_alarm(client_key.key_id, "detected", True, {})
    defense = chain(rounding(2), prada(check_every=10, min_distances=20))
    core = build_core(small_victim, defense, audit=audit, quota=QUOTA)
    schema = input_schema(small_victim.input_shape, max_batch=256)
    app = create_app(core, Authenticator(KeyStore(store), b"k" * 32, 300), audit, schema)
    with TestClient(app) as client:
        client.post(
            "/v1/predict",
            json={"inputs": np.zeros((1, *small_victim.input_shape)).tolist()},
            headers={"X-API-Key": client_key.api_key},
        )
        text = client.get("/metrics", headers={"X-API-Key": scraper.api_key}).text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_shipped_rules_and_dashboard_name_only_metrics_the_server_exports(tmp_path, small_victim):
    exported = exported_by_a_server(tmp_path, small_victim)
    assert exported == EXPORTED
    rules = yaml.safe_load((REPO / "monitoring" / "alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert {"HeistlabExtractionAlarm", "HeistlabKeyNearQuota", "HeistlabAuthFailureBurst"} <= set(alerts)
    assert "HeistlabInvalidInputSpike" in alerts
    for name, rule in alerts.items():
        used = set(METRIC_NAME.findall(rule["expr"]))
        assert used and used <= EXPORTED, (name, used - EXPORTED)
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
    dashboard = json.loads((REPO / "monitoring" / "grafana-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels) >= 6
    for panel in panels:
        expressions = [target["expr"] for target in panel["targets"]]
        used = set().union(*(METRIC_NAME.findall(expr) for expr in expressions))
        assert used and used <= EXPORTED, (panel["title"], used - EXPORTED)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) is not installed")
def test_the_rules_pass_promtool_and_their_unit_tests():
    """promtool's rule check, and monitoring/alerts_test.yml: each alert fires on the series it is meant
    for (a new PRADA alarm, a key at 95% of its quota, 50 failed logins, half the traffic invalid) and
    not otherwise (the alarm alert resolves after 30 minutes, the spike must last 2)."""
    for command in ("check", "test"):
        target = "alerts.yml" if command == "check" else "alerts_test.yml"
        checked = subprocess.run(
            ["promtool", command, "rules", target],
            cwd=REPO / "monitoring",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


# -- the experiment side: the defense's statistics over time ------------------------------------------------


def test_a_monitored_oracle_records_when_prada_noticed_a_jbda_like_stream(small_victim, digits_splits):
    """The same JBDA-like stream as the live test, in-process: the timeline holds the queries served at
    each reading and PRADA's statistics, W falling below the threshold by the time ``detected`` turns 1."""
    from heistlab.api import PredictionAPI
    from heistlab.experiment import monitored_oracle

    defense = prada(check_every=10, min_distances=20)
    api = PredictionAPI(small_victim, defense, key=jax.random.key(0), budget=64, output="labels")
    timeline: list[dict] = []
    oracle = monitored_oracle(api.oracle("attacker"), api, small_victim, 64, timeline)
    rng = np.random.default_rng(0)
    pool = digits_splits.pool
    seeds = pool[small_victim.predict_proba(pool).argmax(axis=1) == 3][:16]
    steps = [np.clip(seeds + 0.01 * np.sign(rng.normal(size=seeds.shape)), 0, 1) for _ in range(3)]
    synthetic = np.stack([seeds, *steps], axis=1).reshape(-1, *seeds.shape[1:])
    for start in range(0, 64, 16):
        oracle.query(synthetic[start : start + 16])
    assert [reading["queries"] for reading in timeline] == [16, 32, 48, 64]
    assert timeline[0]["detected"] == 0.0 and timeline[-1]["detected"] == 1.0
    assert timeline[-1]["prada_min_w_attack"] < timeline[-1]["prada_delta"]
    assert oracle.remaining == 0 and oracle.clients == ("attacker",)


@pytest.mark.slow
def test_the_jsonl_log_and_results_carry_the_detector_over_time(tmp_path, cache_dir):
    from heistlab.experiment import run_experiment
    from heistlab.loggers import JsonlLogger
    from tests.test_configs import composed

    cfg = composed(
        "attack=jbda",
        "attack.budget=300",
        "attack.rounds=2",
        "attack.seed_size=100",
        "defense=prada",
        "defense.delta=0.9",
        "victim.train.epochs=2",
        "eval.uniform_samples=64",
        f"cache_dir={cache_dir}",
    )
    run_experiment(cfg, tmp_path, JsonlLogger(tmp_path))
    record = json.loads((tmp_path / "results.json").read_text())
    queries = [reading["queries"] for reading in record["monitor"]]
    assert queries == sorted(queries) and queries[-1] == record["metrics"]["queries_served"]
    assert all(reading["prada_delta"] == 0.9 for reading in record["monitor"])
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    logged = [event for event in events if "monitor/queries" in event.get("metrics", {})]
    assert [event["step"] for event in logged] == queries
    assert all("monitor/detected" in event["metrics"] for event in logged)


@pytest.mark.slow
def test_wandb_takes_monitor_readings_after_rounds_with_higher_steps(tmp_path, monkeypatch):
    """The run defines monitor/* against monitor/queries and takes readings logged after rounds with higher
    step numbers (whether wandb would have dropped them at step=queries is only printed by its service
    process, not observable here)."""
    from heistlab.loggers import WandbLogger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(tmp_path, project="heistlab-test")
    logger.log_metrics({"round/queries": 16}, step=999)
    logger.log_metrics({"fidelity_test": 0.9})
    for queries, detected in ((250, 0.0), (500, 1.0)):
        logger.log_metrics({"monitor/queries": queries, "monitor/detected": detected}, step=queries)
    assert logger.run.summary["monitor/detected"] == 1.0 and logger.run.summary["fidelity_test"] == 0.9
    logger.finish("complete")
