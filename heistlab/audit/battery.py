"""``run_audit(cfg)``: the whole battery against one target under one query budget; ``audit_command`` adds the
report and the exit status (what ``python -m experiments.audit`` runs).

Against a served target (``target=https://...``, loopback unless ``audit.allow_remote=true``) the audit
speaks HTTPS only to that target, with the key files named under ``audit.credentials``:

1. abuse probes that need no model: transport and TLS, credentials, tokens, revocation, roles, validation;
2. the target's served top-1 on ``audit.extraction.eval_inputs`` held-out test inputs (fidelity's reference);
3. the extraction battery, then evasion (Square or HopSkipJump through the API, FGSM transfer from the best
   stolen copy), each member its own client of the client key;
4. the throttling probes (a burst past the rate limit, the quota drained and crossed), as they drain the key;
   then a flood of failed authentication, last, as a server may throttle the audit's address after it;
5. the admin key's view of alarms: which attacks the deployment detected, and after how many queries.

An Open Inference Protocol server (``target=oip`` with ``api=oip``: MLServer, KServe, Triton...) is audited
through ``heistlab.serving.oip_client`` with the same guard: the extraction battery and evasion run as above;
the abuse probes and the alarms, which need heistlab's own routes, are reported as not tested.

An in-process target (``target=inprocess``) is the config's own victim, defense and API
(``heistlab.experiment``: build_splits, build_defense, load_victim, build_api): the same battery runs
without traffic, and the probes, which need a server, are reported as not tested.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import jax
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from heistlab.attacks.base import Attack, Surrogate
from heistlab.attacks.evasion.base import Evasion
from heistlab.audit import probes
from heistlab.audit.evasion import evasion_member
from heistlab.audit.extraction import (
    Evaluation,
    Exposure,
    Thresholds,
    check_thresholds,
    extraction_member,
)
from heistlab.audit.findings import (
    Finding,
    Verdict,
    check_fail_on,
    exit_status,
    failing,
    ordered,
    untested,
)
from heistlab.audit.ledger import QueryLedger, budgeted_oracle, top1_labels
from heistlab.audit.target import INPROCESS, OIP, Target, check_target, request_guard

log = logging.getLogger("heistlab.audit")


class AuditResult(NamedTuple):
    """What an audit found: its findings (worst first), the rows spent per member out of ``budget``, the
    configuration audited, and the gate it is judged by (``fail_on``)."""

    target: str
    findings: tuple[Finding, ...]
    budget: int
    spent: dict[str, int]
    configuration: dict
    seconds: float
    fail_on: str


class Battery(NamedTuple):
    """The battery's members, built from ``audit.extraction`` and ``audit.evasion``."""

    extraction: dict[str, Attack]
    score: Evasion | None
    decision: Evasion | None
    transfer: Evasion | None


def build_battery(spec: DictConfig) -> Battery:
    """Instantiates the configured members (a null member is left out); factories validate their arguments."""
    attacks = {
        name: instantiate(member) for name, member in (spec.extraction.attacks or {}).items() if member
    }
    evasion = spec.evasion
    pick = lambda name: instantiate(evasion[name]) if evasion.get(name) else None
    return Battery(attacks, pick("score"), pick("decision"), pick("transfer"))


def limits_in_words(quota, rate, burst) -> str:
    parts = []
    if quota is not None:
        parts.append(f"a quota of {quota} rows per key")
    if rate is not None:
        parts.append(f"a rate limit of {rate:g} rows/s (burst {burst})")
    return " and ".join(parts) or "no quota or rate limit"


def exposure_from_info(info: dict) -> Exposure:
    quota, rate = info.get("quota"), info.get("rate")
    return Exposure(
        info["output"], quota is not None or rate is not None, limits_in_words(quota, rate, info.get("burst"))
    )


def largest_batch(info: dict) -> int | None:
    """The largest batch the target admits: its max_batch, and its rate-limit burst when it has one."""
    sizes = [info.get("max_batch")]
    if info.get("rate") is not None:
        sizes.append(info.get("burst"))
    sizes = [size for size in sizes if isinstance(size, int) and size >= 1]
    return min(sizes) if sizes else None


def detection_finding(verdicts: dict[str, dict | None]) -> Finding:
    """Whether the deployment's monitoring raised an alarm for the attacks (None: not observable)."""
    check, title = "detection.monitoring", "Detection of extraction"
    observed = {name: verdict for name, verdict in verdicts.items() if verdict is not None}
    if not observed:
        return untested(
            check, title, "the alarms are read with an admin key (audit.credentials.admin_key_file)"
        )
    detected = {name: verdict for name, verdict in observed.items() if verdict.get("detected")}
    figures = {
        "queries_to_detection": {
            name: verdict.get("queries_to_detection") for name, verdict in detected.items()
        },
        "detected": {name: bool(verdict.get("detected")) for name, verdict in observed.items()},
    }
    tried = f"read the deployment's alarms after each extraction attack ({', '.join(observed)})"
    if detected:
        listed = ", ".join(
            f"{name} after {verdict.get('queries_to_detection')} queries"
            for name, verdict in detected.items()
        )
        return Verdict(check, title, tried, figures).held(f"alarms raised: {listed}")
    return Verdict(check, title, tried, figures).weakness(
        "low",
        "no alarm was raised: the operator would not know the model is being stolen",
        "no alarm for any extraction attack",
        "Extraction went undetected",
    )


def run_battery(
    battery: Battery,
    apis: list,
    ledger: QueryLedger,
    splits,
    surrogate: Surrogate,
    exposure: Exposure,
    spec: DictConfig,
    key: jax.Array,
    max_rows: int | None,
    detection,
) -> list[Finding]:
    """Extraction, then evasion, through ``apis`` (extraction attack ``i`` through ``apis[i % n]``, the rest
    through the first); every row charged to ``ledger``. ``detection(client, api)`` reads the alarms."""
    api = apis[0]
    thresholds = check_thresholds(Thresholds(**spec.severity))
    reference = top1_labels(budgeted_oracle(api.oracle("audit-reference"), ledger, "reference", max_rows))
    count = min(spec.extraction.eval_inputs, len(splits.test.x))
    evaluation = Evaluation(splits.test.x[:count], reference(splits.test.x[:count]))
    findings, stolen, verdicts = [], [], {}
    for index, (name, attack) in enumerate(battery.extraction.items()):
        log.info("audit: extraction %s", name)
        member_api = apis[index % len(apis)]
        found, copy = extraction_member(
            name,
            attack,
            member_api,
            ledger,
            splits.pool,
            surrogate,
            jax.random.fold_in(key, index),
            evaluation,
            exposure,
            thresholds,
            points=spec.extraction.curve_points,
            max_rows=max_rows,
            detection=lambda client, member_api=member_api: detection(client, member_api),
        )
        findings.append(found)
        if copy is not None:
            stolen.append(copy)
            fields = ("detected", "queries_to_detection")
            verdicts[name] = (
                {field: found.figures.get(field) for field in fields} if "detected" in found.figures else None
            )
    findings.append(detection_finding(verdicts))
    best = max(stolen, key=lambda copy: copy.fidelity, default=None)
    black_box = battery.score if exposure.scores else battery.decision
    members = [("blackbox", black_box), ("transfer", battery.transfer)]
    for index, (name, evasion) in enumerate(members):
        if evasion is None:
            continue
        log.info("audit: evasion %s (%s)", name, evasion.name)
        findings.append(
            evasion_member(
                name,
                evasion,
                api,
                ledger,
                splits.test.x,
                splits.test.y,
                reference,
                jax.random.fold_in(key, 1000 + index),
                exposure,
                thresholds,
                stolen=best,
                max_rows=max_rows,
            )
        )
    if battery.score is not None and battery.decision is not None:
        skipped = battery.decision if exposure.scores else battery.score
        log.info("audit: %s not run (the key is served %s)", skipped.name, exposure.output)
    return findings


def surrogate_from(cfg: DictConfig, num_classes: int) -> Surrogate:
    from heistlab.compose import build_model_from, train_config_from

    return Surrogate(build_model_from(cfg.surrogate, num_classes), train_config_from(cfg.surrogate.train))


def read_keys(credentials: DictConfig) -> probes.Keys:
    """The auditor's keys from the key files ``audit.credentials`` names: every credential of the client key
    file, the first of each other file."""
    from heistlab.serving.client import read_credentials

    if not credentials.get("client_key_file"):
        raise ValueError(
            "audit.credentials.client_key_file must name a client key file (python -m experiments.keys "
            "create --role probabilities --out FILE): a served target is audited with its clients' keys"
        )
    read = lambda name: (
        read_credentials(Path(str(credentials[name])).expanduser()) if credentials.get(name) else (None,)
    )
    clients = read("client_key_file")
    return probes.Keys(
        clients[0],
        read("low_role_key_file")[0],
        read("admin_key_file")[0],
        read("revocable_key_file")[0],
        clients,
    )


def audit_served(cfg: DictConfig, target: Target, battery: Battery, ledger: QueryLedger) -> tuple[list, dict]:
    from heistlab.compose import build_splits
    from heistlab.serving.client import RemoteAPI
    from heistlab.serving.tls import client_context

    spec = cfg.audit
    keys = read_keys(spec.credentials)
    settings = probes.check_settings(probes.ProbeSettings(**spec.probes))
    guard = request_guard(target)
    ca_file = None if spec.ca_file is None else Path(str(spec.ca_file)).expanduser()
    http = httpx.Client(
        base_url=target.url,
        verify=client_context(ca_file),
        timeout=spec.timeout_s,
        trust_env=False,
        follow_redirects=False,
        headers={"User-Agent": "heistlab-audit"},
        event_hooks={"request": [guard]},
    )
    apis = []
    try:
        for credential in keys.clients:
            apis.append(
                RemoteAPI(
                    target.url,
                    [credential],
                    ca_file,
                    timeout_s=spec.timeout_s,
                    max_wait_s=spec.max_wait_s,
                    trust_env=False,
                )
            )
            apis[-1].http.event_hooks = {"request": [guard], "response": []}
        info = apis[0].info("attacker")
        splits = build_splits(cfg)
        if (
            tuple(info["input_shape"]) != tuple(splits.input_shape)
            or info["num_classes"] != splits.num_classes
        ):
            raise ValueError(
                f"the target serves inputs shaped {tuple(info['input_shape'])}, {info['num_classes']} "
                f"classes; the audit's data ({cfg.data.name}) has {tuple(splits.input_shape)}, "
                f"{splits.num_classes}: choose the data the target was trained on (data=...)"
            )
        probing = probes.Probing(http, keys, info, np.asarray(splits.test.x[0], np.float32), ledger, settings)
        findings = [probes.transport(probing), probes.tls(probing), probes.unauthenticated(probing)]
        findings += probes.tokens(probing)
        findings += [probes.revocation(probing), *probes.roles(probing), *probes.validation(probing)]
        exposure = exposure_from_info(info)
        seen = {(alarm["key_id"], alarm["name"], alarm["time"]) for alarm in probes.alarms(probing) or ()}

        def detection(client: str, api) -> dict | None:
            current = probes.alarms(probing)
            if current is None:
                return None
            mine = [alarm for alarm in current if alarm["key_id"] == api.keys[0]]
            new = [alarm for alarm in mine if (alarm["key_id"], alarm["name"], alarm["time"]) not in seen]
            seen.update((alarm["key_id"], alarm["name"], alarm["time"]) for alarm in new)
            if not new:
                return {"detected": False, "key_flagged_before": bool(mine)}
            return {"detected": True, "queries_to_detection": new[-1]["report"].get("queries_to_detection")}

        findings += run_battery(
            battery,
            apis,
            ledger,
            splits,
            surrogate_from(cfg, splits.num_classes),
            exposure,
            spec,
            jax.random.key(cfg.seed),
            largest_batch(info),
            detection,
        )
        findings += [probes.rate_limit(probing), probes.quota(probing)]
        served = {"client": info}
        for role, credential in (("low_role", keys.low_role), ("admin", keys.admin)):
            if credential is not None:
                response = http.get("/v1/info", headers=probes.key_header(credential))
                served[role] = (
                    response.json() if response.status_code == 200 else {"status": response.status_code}
                )
        # Last: a server that throttles failed authentication per address may refuse the audit for a while.
        findings.append(probes.failed_auth_flood(probing))
        configuration = {"target": target.url, "served": served, "data": cfg.data.name}
    finally:
        for api in apis:
            api.close()
        http.close()
    return findings, configuration


def unprobed_battery(cfg, battery, api, ledger, splits, exposure, max_rows, detection, needs) -> list:
    """The battery through ``api`` alone, after the abuse probes' finding: not tested, probing ``needs``."""
    findings = [untested("abuse.probes", "Abuse probes", needs)]
    surrogate = surrogate_from(cfg, splits.num_classes)
    key = jax.random.key(cfg.seed)
    return findings + run_battery(
        battery, [api], ledger, splits, surrogate, exposure, cfg.audit, key, max_rows, detection
    )


def audit_inprocess(cfg: DictConfig, battery: Battery, ledger: QueryLedger) -> tuple[list, dict]:
    from heistlab.compose import build_api, build_defense, build_splits, defender_data, load_victim
    from heistlab.serving.service import online_evidence

    if cfg.api.get("kind", "inprocess") != "inprocess":
        raise ValueError(
            "target=inprocess audits the in-process API (api=inprocess); a server is audited by URL"
        )
    splits = build_splits(cfg)
    defense = build_defense(cfg.defense, defender_data(cfg, splits))
    victim, _ = load_victim(cfg, splits, defense)
    api = build_api(cfg, victim, defense)
    limited = api.budget is not None or defense.admit is not None
    limits = "an API budget or an admission defense" if limited else "no API budget or admission defense"
    exposure = Exposure(api.output, limited, limits)
    victim_labels = lambda x: victim.predict_proba(x).argmax(axis=-1)

    def detection(client: str, api) -> dict | None:
        try:
            report = api.report(online_evidence(client, victim_labels))
        except Exception as error:  # a report that needs more than a live detector has (a stolen model)
            log.info("audit: the defense report cannot be read for %s (%s)", client, error)
            return None
        return {
            "detected": bool(report.get("detected")),
            "queries_to_detection": report.get("queries_to_detection"),
        }

    findings = unprobed_battery(
        cfg,
        battery,
        api,
        ledger,
        splits,
        exposure,
        cfg.api.get("max_batch"),
        detection,
        "a served target (target=https://...): an in-process API has no credentials, routes or transport",
    )
    keep = ("data", "victim", "defense", "api")
    configuration = {"target": INPROCESS, "seed": cfg.seed}
    configuration.update({name: OmegaConf.to_container(cfg[name], resolve=True) for name in keep})
    return findings, configuration


def audit_oip(cfg: DictConfig, target: Target, battery: Battery, ledger: QueryLedger) -> tuple[list, dict]:
    """The battery through an OIP client held on ``target`` by the request guard; no probes, no alarms."""
    from heistlab.compose import build_splits
    from heistlab.serving.oip_client import api_from_config

    splits = build_splits(cfg)
    api_spec = OmegaConf.merge(
        cfg.api, {"timeout_s": cfg.audit.timeout_s, "max_wait_s": cfg.audit.max_wait_s}
    )
    guard = [request_guard(target)]  # from the first request on, readiness and metadata included
    api = api_from_config(
        api_spec, splits.input_shape, splits.num_classes, budget=None, request_hooks=guard, trust_env=False
    )
    try:
        published = "no quota or rate limit published (the Open Inference Protocol has no way to publish one)"
        findings = unprobed_battery(
            cfg,
            battery,
            api,
            ledger,
            splits,
            Exposure(api.output, False, published),
            api.max_batch,
            lambda client, api: None,
            "heistlab's own routes (credentials, tokens, roles, quotas): an OIP server is audited for "
            "extraction and evasion only",
        )
    finally:
        api.close()
    configuration = {
        "target": target.url,
        "served": {"metadata": api.metadata, "output": api.output},
        "data": cfg.data.name,
        "api": OmegaConf.to_container(cfg.api, resolve=True),
    }
    return findings, configuration


def run_audit(cfg: DictConfig) -> AuditResult:
    """Audits ``cfg.target`` with the battery and probes of ``cfg.audit``; nothing is written here."""
    started = time.perf_counter()
    spec = cfg.audit
    fail_on = check_fail_on(spec.fail_on)
    oip_url = cfg.api.get("url") if cfg.api.get("kind") == OIP else None
    target = check_target(str(cfg.target), spec.allow_remote, oip_url=oip_url)
    ledger = QueryLedger(spec.budget)
    battery = build_battery(spec)
    if target.kind == INPROCESS:
        findings, configuration = audit_inprocess(cfg, battery, ledger)
    elif target.kind == OIP:
        findings, configuration = audit_oip(cfg, target, battery, ledger)
    else:
        findings, configuration = audit_served(cfg, target, battery, ledger)
    configuration["audit"] = OmegaConf.to_container(spec, resolve=True)
    return AuditResult(
        target.url or INPROCESS,
        tuple(ordered(findings)),
        ledger.total,
        dict(ledger.spent),
        configuration,
        time.perf_counter() - started,
        fail_on,
    )


def audit_command(cfg: DictConfig, out_dir: Path) -> int:
    """Runs the audit, writes its report to ``out_dir`` and returns the exit status (``audit.fail_on``)."""
    from heistlab.audit.report import write_report

    result = run_audit(cfg)
    paths = write_report(result, Path(out_dir))
    status = exit_status(result.findings, result.fail_on)
    for item in result.findings:
        if item.present:
            print(f"[{item.severity.upper():>8}] {item.check}: {item.title}. {item.happened}")
    gate = failing(result.findings, result.fail_on)
    verdict = (
        f"FAIL: {len(gate)} findings at or above {result.fail_on}"
        if gate
        else f"PASS (fail_on={result.fail_on})"
    )
    print(f"audit of {result.target}: {verdict}; {sum(result.spent.values())} of {result.budget} rows spent")
    print(f"report: {paths['markdown']} and {paths['html']}")
    return status
