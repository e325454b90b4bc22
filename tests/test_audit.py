"""The audit command against real servers on loopback (heistlab issue 8): a deliberately weak deployment (one
route open without credentials, probabilities to every role, no rate limit or quota) is reported with those
weaknesses and fails the gate; a hardened one (labels only, quota, rate limit, PRADA) reports them absent and
passes. Budgets are small (knockoff 300 queries, 20 epochs, evasion on a handful of inputs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
from hydra import compose, initialize_config_dir

from heistlab.audit.battery import audit_command
from heistlab.audit.findings import Finding, exit_status
from heistlab.defenses import chain, identity, rounding
from heistlab.defenses.prada import prada
from heistlab.serving.app import create_app
from heistlab.serving.audit import AuditLog
from heistlab.serving.auth import Authenticator, KeyStore, create_key
from heistlab.serving.client import write_credentials
from heistlab.serving.server import serve_in_thread
from heistlab.serving.service import build_core
from heistlab.serving.tls import self_signed_pair
from heistlab.serving.validation import input_schema

REPO = Path(__file__).resolve().parent.parent
CHEAP_KDF = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1, "dklen": 32}
SMALL_BATTERY = [
    "surrogate.options.hidden=[32]",
    "surrogate.train.epochs=20",
    "surrogate.train.learning_rate=0.003",
    "audit.budget=3000",
    "audit.max_wait_s=10",
    "audit.extraction.eval_inputs=100",
    "audit.extraction.curve_points=2",
    "audit.extraction.attacks.knockoff.budget=300",
    "audit.extraction.attacks.knockoff.query_batch=64",
    "audit.extraction.attacks.jbda.budget=200",
    "audit.extraction.attacks.jbda.seed_size=50",
    "audit.extraction.attacks.jbda.rounds=2",
    "audit.extraction.attacks.equation_solving.budget=100",
    "audit.evasion.score.count=4",
    "audit.evasion.score.max_queries=30",
    "audit.evasion.decision.count=2",
    "audit.evasion.decision.max_queries=60",
    "audit.evasion.decision.initial_evaluations=10",
    "audit.evasion.decision.init_trials=10",
    "audit.evasion.transfer.count=20",
    "audit.probes.burst_requests=4",
    "audit.probes.burst_rows=16",
    "audit.probes.max_expiry_wait_s=2",
]


def composed_audit(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="audit", overrides=list(overrides))


class Audited(NamedTuple):
    status: int
    findings: dict
    record: dict
    out_dir: Path
    audit_log: AuditLog


def serve_and_audit(
    tmp: Path, victim, *, roles: dict, fail_on: str = "high", battery=(), **deployment
) -> Audited:
    """Serves ``victim`` as ``deployment`` describes, audits it with keys of ``roles``, stops the server."""
    tls = self_signed_pair(tmp / "tls")
    store = tmp / "keys.json"
    files = {}
    for name, role in roles.items():
        files[name] = tmp / f"{name}.json"
        count = 3 if name == "client" else 1  # one client key per extraction attack
        write_credentials(files[name], [create_key(store, role, kdf=CHEAP_KDF) for _ in range(count)])
    defense = deployment.pop("defense")
    open_routes = deployment.pop("insecure_open_routes", ())
    widen = deployment.pop("insecure_probabilities_to_every_role", False)
    audit_log = AuditLog(tmp / "audit.sqlite")
    core = build_core(victim, defense, audit=audit_log, **deployment)
    app = create_app(
        core,
        Authenticator(KeyStore(store), b"s" * 32, token_ttl_s=1),
        audit_log,
        input_schema(victim.input_shape, max_batch=256),
        rate=deployment.get("rate"),
        burst=deployment.get("burst"),
        insecure_open_routes=open_routes,
        insecure_probabilities_to_every_role=widen,
    )
    server = serve_in_thread(app, tls.certfile, tls.keyfile)
    try:
        cfg = composed_audit(
            f"target={server.url}",
            f"audit.ca_file={tls.certfile}",
            f"audit.fail_on={fail_on}",
            *(f"audit.credentials.{name}_key_file={path}" for name, path in files.items()),
            *SMALL_BATTERY,
            *battery,
        )
        status = audit_command(cfg, tmp / "report")
    finally:
        server.stop()
    record = json.loads((tmp / "report" / "findings.json").read_text())
    findings = {item["check"]: item for item in record["findings"]}
    return Audited(status, findings, record, tmp / "report", audit_log)


KEYS = {"weak": ("probabilities", "labels"), "hardened": ("labels", "labels")}


@pytest.fixture(scope="module")
def weak(tmp_path_factory, small_victim) -> Audited:
    """Open /v1/predict, probabilities to every role, no rate limit, no quota, no defense."""
    client, low_role = KEYS["weak"]
    return serve_and_audit(
        tmp_path_factory.mktemp("weak"),
        small_victim,
        roles={"client": client, "low_role": low_role, "admin": "admin", "revocable": "labels"},
        defense=identity(),
        quota=None,
        rate=None,
        insecure_open_routes=["/v1/predict"],
        insecure_probabilities_to_every_role=True,
        battery=["~audit.extraction.attacks.jbda"],  # JBDA is measured against the hardened target
    )


@pytest.fixture(scope="module")
def hardened(tmp_path_factory, small_victim) -> Audited:
    """Labels only, a quota, a rate limit, rounding and PRADA watching every key."""
    client, low_role = KEYS["hardened"]
    return serve_and_audit(
        tmp_path_factory.mktemp("hardened"),
        small_victim,
        roles={"client": client, "low_role": low_role, "admin": "admin", "revocable": "labels"},
        defense=chain(rounding(2), prada(check_every=10, min_distances=50)),
        quota=2000,  # the quota probe drains what is left of it, then crosses it: within audit.budget
        rate=1000.0,
        burst=64,
        battery=["audit.budget=4000"],
    )


WEAKNESSES = (
    "authentication.unauthenticated_access",
    "authorization.role_escalation",
    "throttling.rate_limit",
    "throttling.quota",
)


@pytest.mark.slow
def test_the_weak_deployment_is_reported_with_its_weaknesses_and_fails_the_gate(weak):
    findings = weak.findings
    for check in WEAKNESSES:
        assert findings[check]["present"], (check, findings[check]["happened"])
    open_route = findings["authentication.unauthenticated_access"]
    assert open_route["severity"] == "critical"
    assert open_route["figures"]["statuses"]["no credentials: POST /v1/predict"] == 200
    assert open_route["figures"]["statuses"]["no credentials: GET /admin/audit"] == 401
    assert open_route["figures"]["statuses"]["wrong secret: POST /v1/predict"] == 401
    escalation = findings["authorization.role_escalation"]
    assert escalation["severity"] == "high"
    assert escalation["figures"]["statuses"]["low-role key (role labels) asks probabilities"] == 200
    assert findings["throttling.rate_limit"]["figures"]["status_counts"] == {"200": 4}
    assert findings["throttling.quota"]["severity"] == "medium"
    # probabilities served: equation solving runs, and the score-based Square attack is the black box
    solved = findings["extraction.equation_solving"]
    assert solved["tested"] and solved["present"] and solved["figures"]["queries"] == 100
    assert findings["evasion.blackbox"]["title"].startswith("Evasion: square")
    assert weak.status == 1 == exit_status_of(weak, "high")
    assert exit_status_of(weak, "critical") == 1 and exit_status_of(weak, "never") == 0


def exit_status_of(audited: Audited, fail_on: str) -> int:
    fields = set(Finding._fields)
    found = [
        Finding(**{name: value for name, value in item.items() if name in fields})
        for item in audited.record["findings"]
    ]
    return exit_status(found, fail_on)


@pytest.mark.slow
def test_the_hardened_deployment_reports_the_weaknesses_absent_and_passes_the_gate(hardened):
    findings = hardened.findings
    held = (
        *WEAKNESSES,
        "authentication.forged_token",
        "authentication.expired_token",
        "authentication.revoked_replay",
        "authorization.admin_routes",
        "validation.malformed_inputs",
        "validation.oversized_inputs",
        "transport.headers",
    )
    for check in held:
        assert findings[check]["tested"] and not findings[check]["present"], (
            check,
            findings[check]["happened"],
        )
    assert set(findings["authentication.unauthenticated_access"]["figures"]["status_counts"]) == {"401"}
    assert findings["throttling.rate_limit"]["figures"]["status_counts"].get("429", 0) >= 1
    assert findings["authentication.expired_token"]["figures"]["status_after_expiry"] == 401
    assert findings["authentication.revoked_replay"]["figures"]["statuses"] == {
        "token replayed": 401, "API key reused": 401, "new token asked": 401
    }  # fmt: skip
    # labels only: no equation solving, and the decision-based HopSkipJump is the black box
    assert not findings["extraction.equation_solving"]["tested"]
    assert findings["evasion.blackbox"]["title"].startswith("Evasion: hopskipjump")
    assert all(item["severity"] in ("info", "low", "medium") for item in findings.values())
    assert hardened.status == 0
    assert sum(hardened.record["spent"].values()) <= hardened.record["budget"] == 4000
    quota = findings["throttling.quota"]["figures"]
    assert quota["rows_drained"] > 0 and quota["remaining_drained"] < 64  # crossed, not assumed
    assert (quota["status"], quota["remaining_after"]) == (429, quota["remaining_drained"])
    assert findings["transport.tls"]["tested"] and not findings["transport.tls"]["present"]
    flood = findings["authentication.failed_attempts"]
    assert flood["tested"] and flood["present"] == ("429" not in flood["figures"]["status_counts"])


@pytest.mark.slow
def test_extraction_is_measured_as_fidelity_per_queries_with_its_detection(weak, hardened):
    for audited in (weak, hardened):
        knockoff = audited.findings["extraction.knockoff"]["figures"]
        assert knockoff["queries"] == 300 and [point[0] for point in knockoff["fidelity_curve"]] == [150, 300]
        assert 0.5 < knockoff["fidelity"] <= 1.0
        assert knockoff["fidelity_per_1000_queries"][-1] == [0.3, knockoff["fidelity"]]
    assert weak.findings["extraction.knockoff"]["figures"]["output"] == "probabilities"
    assert hardened.findings["extraction.knockoff"]["figures"]["output"] == "labels"
    # Whether the knockoff's own stream outruns the 1,000 rows/s bucket depends on the machine's speed (on
    # busy cores it does not); the rate limit's refusals are asserted deterministically by its own probe.
    assert weak.findings["extraction.knockoff"]["figures"]["seconds_throttled"] == 0.0
    assert hardened.findings["extraction.knockoff"]["figures"]["seconds_throttled"] >= 0.0
    monitoring = hardened.findings["detection.monitoring"]
    assert monitoring["tested"] and monitoring["figures"]["detected"].get("jbda") is True
    assert weak.findings["detection.monitoring"]["present"]  # no detector: the admin key saw no alarm


@pytest.mark.slow
def test_the_report_shows_each_finding_its_figures_and_the_configuration(weak):
    markdown = (weak.out_dir / "report.md").read_text()
    html = (weak.out_dir / "report.html").read_text()
    assert "**Verdict: FAIL" in markdown
    assert "[CRITICAL] Routes answered without valid credentials" in markdown
    assert "- **Tried:**" in markdown and "- **Severity:** critical:" in markdown
    for figure in ("fidelity.png", "evasion.png", "refusals.png"):
        assert (weak.out_dir / figure).read_bytes()[:4] == b"\x89PNG" and f"]({figure})" in markdown
    assert html.count("data:image/png;base64,") >= 3 and "<script" not in html
    assert weak.record["configuration"]["served"]["client"]["role"] == "probabilities"
    assert weak.record["configuration"]["served"]["low_role"]["outputs"][:1] == ["labels"]
