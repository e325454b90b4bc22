"""The audit's parts on their own: where it may send traffic, severities and the exit gate, the query ledger,
the severity rules, and the probes a server's quota must pass."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from heistlab.api import Oracle, QueryRefused
from heistlab.audit import probes
from heistlab.audit.extraction import Exposure, Thresholds, check_thresholds, curve_points, rate_extraction
from heistlab.audit.findings import Verdict, exit_status, failing, finding, held, ordered, untested, worst
from heistlab.audit.ledger import QueryLedger, Transcript, budgeted_oracle
from heistlab.audit.target import TargetRefused, TargetViolation, check_target, parse_target, request_guard


def resolving_to(*addresses):
    return lambda host, port: list(addresses)


def test_only_loopback_targets_are_audited_unless_remote_is_allowed():
    assert check_target("https://127.0.0.1:8443").url == "https://127.0.0.1:8443"
    assert check_target("https://127.3.2.1").port == 443
    assert check_target("https://[::1]:9000").url == "https://[::1]:9000"
    assert check_target("https://localhost:8443").host == "localhost"  # resolved by the system: loopback
    named = check_target("https://gateway.example:8443", resolver=resolving_to("127.0.0.1", "::1"))
    assert named.port == 8443
    for target, addresses in (
        ("https://10.0.0.7:8443", ("10.0.0.7",)),
        ("https://gateway.example", ("127.0.0.1", "93.184.216.34")),  # one outside loopback is enough
        ("https://gateway.example", ()),
    ):
        with pytest.raises(TargetRefused, match="audit.allow_remote=true"):
            check_target(target, resolver=resolving_to(*addresses))
    with pytest.raises(TargetRefused, match="does not resolve"):
        check_target("https://no-such-host.invalid")
    remote = check_target("https://10.0.0.7:8443", allow_remote=True, resolver=pytest.fail)
    assert remote.host == "10.0.0.7"
    assert check_target("inprocess").kind == "inprocess"
    for bad in ("http://127.0.0.1:8443", "https://127.0.0.1/v1", "https://u:p@127.0.0.1", "ftp://x", ""):
        with pytest.raises(ValueError, match="target must be"):
            parse_target(bad)
    with pytest.raises(ValueError, match="allow_remote must be true or false"):
        check_target("https://127.0.0.1", allow_remote="yes")


def test_the_request_guard_keeps_every_request_on_the_target():
    sent = []
    transport = httpx.MockTransport(lambda request: sent.append(request.url) or httpx.Response(200))
    guard = request_guard(parse_target("https://127.0.0.1:8443"))
    with httpx.Client(transport=transport, event_hooks={"request": [guard]}) as client:
        assert client.get("https://127.0.0.1:8443/healthz").status_code == 200
        for elsewhere in ("https://127.0.0.1:8444/", "http://127.0.0.1:8443/", "https://127.0.0.2:8443/"):
            with pytest.raises(TargetViolation, match="refusing to send"):
                client.get(elsewhere)
    assert [str(url) for url in sent] == ["https://127.0.0.1:8443/healthz"]


def test_findings_gate_on_the_chosen_severity():
    medium = finding("a.medium", "m", present=True, severity="medium", reason="r", tried="t", happened="h")
    high = finding("a.high", "h", present=True, severity="high", reason="r", tried="t", happened="h")
    absent = held("a.held", "held", "t", "h")
    skipped = untested("a.skipped", "skipped", "a key")
    found = [absent, medium, skipped, high]
    assert [item.check for item in ordered(found)] == ["a.high", "a.medium", "a.held", "a.skipped"]
    assert worst(found) == "high" and worst([absent, skipped]) is None
    levels = ("info", "medium", "high", "critical", "never")
    assert [exit_status(found, level) for level in levels] == [1, 1, 1, 0, 0]
    assert exit_status([absent, skipped, medium], "high") == 0 and failing(found, "medium") == [medium, high]
    assert skipped.happened == "not tested: a key" and not skipped.tested and absent.tested
    with pytest.raises(ValueError, match="fail_on must be one of info, low, medium, high, critical, never"):
        exit_status(found, "severe")
    with pytest.raises(ValueError, match="not present must be info"):
        finding("a.b", "t", present=False, severity="high", reason="r", tried="t", happened="h")
    with pytest.raises(ValueError, match="severity must be one of"):
        finding("a.b", "t", present=True, severity="urgent", reason="r", tried="t", happened="h")


def test_a_verdict_carries_its_check_tried_and_figures_into_each_outcome():
    figures = {"statuses": {"a": 401}}
    verdict = Verdict("a.b", "Title", "tried it", figures)
    assert verdict.weakness("high", "why", "it happened") == finding(
        "a.b", "Title", present=True, severity="high", reason="why", tried="tried it", happened="it happened",
        figures=figures,
    )  # fmt: skip
    renamed = verdict.weakness("low", "why", "h", title="Found", figures={"n": 1})
    assert (renamed.title, renamed.figures, renamed.present) == ("Found", {"n": 1}, True)
    assert verdict.held("it held") == held("a.b", "Title", "tried it", "it held", figures)
    assert verdict.untested("a key") == untested("a.b", "Title", "a key", figures)
    with pytest.raises(ValueError, match="severity must be one of"):
        verdict.weakness("urgent", "why", "h")


def counting_oracle(output="probabilities", remaining=None):
    calls = []

    def query(inputs):
        calls.append(len(inputs))
        return np.full((len(inputs), 3), 1 / 3, np.float32)

    return Oracle(query, lambda: remaining, (2,), 3, output), calls


def test_the_ledger_bounds_the_audits_traffic_and_splits_batches():
    ledger = QueryLedger(100)
    oracle, calls = counting_oracle(remaining=70)
    transcript = Transcript()
    charged = budgeted_oracle(oracle, ledger, "knockoff", max_rows=16, transcript=transcript)
    assert charged.remaining == 70  # the target's limit is the smaller one
    assert charged.query(np.zeros((40, 2), np.float32)).shape == (40, 3)
    assert calls == [16, 16, 8] and len(transcript) == 40 and ledger.spent == {"knockoff": 40}
    other, _ = counting_oracle()
    probing = budgeted_oracle(other, ledger, "probes")
    assert probing.remaining == 60
    with pytest.raises(QueryRefused) as refused:
        probing.query(np.zeros((61, 2), np.float32))  # refused whole, before anything is sent
    assert refused.value.remaining == 60 and ledger.left == 60
    probing.query(np.zeros((60, 2), np.float32))
    assert ledger.left == 0 and ledger.spent == {"knockoff": 40, "probes": 60}
    with pytest.raises(ValueError, match="audit.budget must be an integer >= 1"):
        QueryLedger(0)


def test_severity_rules_for_a_stolen_copy():
    thresholds = check_thresholds(Thresholds())
    scores = Exposure("probabilities", True, "a quota")
    labels_limited = Exposure("labels", True, "a quota of 100 rows per key")
    labels_unlimited = Exposure("labels", False, "no quota or rate limit")
    assert rate_extraction(0.95, 300, scores, thresholds)[0] == "high"
    assert rate_extraction(0.95, 300, labels_unlimited, thresholds)[0] == "high"
    severity, reason = rate_extraction(0.95, 300, labels_limited, thresholds)
    assert severity == "medium" and "labels only under a quota of 100 rows per key" in reason
    assert rate_extraction(0.8, 300, scores, thresholds)[0] == "medium"
    assert rate_extraction(0.5, 300, scores, thresholds)[0] == "low"
    assert curve_points(300, 4) == [75, 150, 225, 300] and curve_points(3, 8) == [1, 2, 3]
    with pytest.raises(ValueError, match="fidelity_medium must not exceed"):
        check_thresholds(Thresholds(fidelity_high=0.5, fidelity_medium=0.6))


def test_malformed_bodies_cover_what_the_server_must_refuse():
    bodies = probes.malformed_bodies(np.full((2, 2, 1), 0.5, np.float32), (0.0, 1.0))
    assert {"broken JSON", "NaN value", "out of range", "wrong shape", "deeply nested"} <= set(bodies)
    assert b"NaN" in bodies["NaN value"][0] and b"2.0" in bodies["out of range"][0]
    assert len(probes.padded_body(5000)) == 5000 and sum(map(len, probes.chunks(b"x" * 70000))) == 70000
    forged = probes.forged("hl1.eyJleHAiOiAxLjB9.c2ln")
    assert set(forged) == {"signature replaced", "signature removed", "expiry extended, signature kept"}
    assert forged["expiry extended, signature kept"].endswith(".c2ln")


def test_a_throttled_failed_secret_is_not_taken_for_an_answered_request():
    from heistlab.audit.probes import answered

    assert not answered(429, "too_many_failures")  # the failed-auth throttle: refused before authentication
    assert answered(429, "quota_exceeded") and answered(200)  # admission runs after authentication
    assert not answered(401) and not answered(403)
