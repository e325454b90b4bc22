"""Abuse probes against a served target: what an unauthorised or misbehaving client can get away with.

Each probe sends a handful of requests with the credentials the audit was given (key files, never secrets in
the config) and returns ``Finding``s: the requests tried, the statuses that came back, and a severity when
the server answered where it should have refused.

- ``unauthenticated``: every route without credentials, with a wrong secret and with a malformed token;
- ``tokens``: forged bearer tokens (claims changed, signature replaced) and an expired one (waited out when
  the token's lifetime is at most ``max_expiry_wait_s``);
- ``revocation``: a disposable key (``revocable_key_file``) revoked through the admin key, then its token
  replayed, its API key reused and a new token asked for;
- ``roles``: a key asking for more than its role allows (probabilities from a labels key), client keys on the
  admin routes, the admin key asking for predictions;
- ``validation``: malformed bodies (broken JSON, wrong content type, shapes, NaN, out-of-range values,
  strings, unknown fields, an integer literal past Python's 4,300-digit limit) and oversized ones (over
  ``max_body_bytes``, declared or chunked; over ``max_batch`` rows);
- ``rate_limit``: a burst of requests past the published burst; ``quota``: the key's quota drained (what
  ``/v1/info`` says is left, in the largest batches admitted), then one batch past it; a quota the audit's
  budget cannot cross is reported not tested;
- ``transport``: security headers on an answer (TLS itself is verified on every request); ``tls``: the TLS
  versions the server accepts (1.0 to 1.3) and, at TLS 1.2, each cipher suite this machine's OpenSSL knows,
  offered alone;
- ``failed_auth_flood``: a few dozen wrong secrets for the client's key id, back to back: does the server
  answer 429 with Retry-After (throttling failed attempts), and is the genuine key still served afterwards.

Every input row sent is charged to the audit's ledger.
"""

from __future__ import annotations

import base64
import json
import math
import socket
import ssl
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import NamedTuple

import httpx
import numpy as np

from heistlab.audit.findings import Finding, Verdict, untested
from heistlab.audit.ledger import QueryLedger
from heistlab.serving.auth import ROLES, Credential

OUTPUTS = ("probabilities", "top_k", "labels")
PROBE_KEY_ID = "heistlab-audit-probe"
LEAK_MARKERS = ("Traceback", 'File "', "Exception:")
SECURITY_HEADERS = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class ProbeSettings(NamedTuple):
    """burst_requests x burst_rows: the least a rate-limit burst sends (more when a burst is published).
    max_burst_rows: the most it sends. max_expiry_wait_s: the longest token lifetime waited out.
    long_token_s: a longer lifetime is reported. oversized_bytes: the body sent when no limit is published.
    max_quota_wait_s: the longest the quota probe waits out rate-limit refusals while it drains the quota.
    auth_flood_attempts: wrong secrets sent by the failed-authentication flood.
    """

    burst_requests: int = 8
    burst_rows: int = 32
    max_burst_rows: int = 2048
    max_expiry_wait_s: float = 10.0
    long_token_s: float = 3600.0
    oversized_bytes: int = 8 * 2**20
    max_quota_wait_s: float = 30.0
    auth_flood_attempts: int = 40


def check_settings(settings: ProbeSettings) -> ProbeSettings:
    names = ("burst_requests", "burst_rows", "max_burst_rows", "oversized_bytes", "auth_flood_attempts")
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"audit.probes.{name} must be an integer >= 1, got {value!r}")
    for name in ("max_expiry_wait_s", "long_token_s", "max_quota_wait_s"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"audit.probes.{name} must be a number >= 0, got {value!r}")
    return settings


class Keys(NamedTuple):
    """The auditor's credentials: a normal client key, and optionally a low-role, an admin and a disposable
    key (revoked by the revocation probe). ``clients``: every key of the client key file (the extraction
    attacks are spread over them, one key per attack, so that each detection is the attack's own)."""

    client: Credential
    low_role: Credential | None = None
    admin: Credential | None = None
    revocable: Credential | None = None
    clients: tuple[Credential, ...] = ()


class Probing(NamedTuple):
    http: httpx.Client
    keys: Keys
    info: dict
    sample: np.ndarray
    ledger: QueryLedger
    settings: ProbeSettings
    sleep: Callable[[float], None] = time.sleep


def key_header(credential: Credential) -> dict[str, str]:
    return {"X-API-Key": credential.api_key}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def rows_body(rows: np.ndarray, output: str | None = None) -> bytes:
    document = {"inputs": np.asarray(rows, np.float32).tolist()}
    if output is not None:
        document["output"] = output
    return json.dumps(document).encode()


def predict(probing: Probing, headers: dict, rows: int = 1, output: str | None = None, member="probes"):
    """``POST /v1/predict`` with ``rows`` copies of the sample, charged to ``member``."""
    probing.ledger.charge(member, rows)
    body = rows_body(np.repeat(probing.sample[None], rows, axis=0), output)
    return probing.http.post(
        "/v1/predict", content=body, headers={**headers, "Content-Type": "application/json"}
    )


def fetch_token(probing: Probing, credential: Credential) -> httpx.Response:
    form = {
        "grant_type": "client_credentials",
        "client_id": credential.key_id,
        "client_secret": credential.key,
    }
    return probing.http.post("/oauth/token", data=form)


def answered(status: int, error: str | None = None) -> bool:
    """The request got past authentication or authorisation (anything but 401/403, or a 429 whose error is
    ``too_many_failures``: the server's throttle on failed secret checks; 404 on a revoke of an unknown key
    means the route ran)."""
    return status not in (401, 403) and not (status == 429 and error == THROTTLED_FAILURES)


THROTTLED_FAILURES = "too_many_failures"


def error_code(response) -> str | None:
    """The ``error`` field of a JSON error body, if the response has one."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


def tally(statuses) -> dict[str, int]:
    return {str(status): count for status, count in sorted(Counter(statuses).items())}


# -- authentication ------------------------------------------------------------------------------------------


def routes() -> tuple[tuple[str, str, str], ...]:
    """(method, path, how bad it is to answer it without credentials)."""
    return (
        ("GET", "/v1/info", "medium"),
        ("POST", "/v1/predict", "critical"),
        ("GET", "/admin/audit", "critical"),
        ("GET", "/admin/alarms", "critical"),
        ("POST", f"/admin/keys/{PROBE_KEY_ID}/revoke", "critical"),
    )


def unauthenticated(probing: Probing) -> Finding:
    """Every route without credentials, with a wrong secret and with a malformed bearer token: all 401."""
    variants = {
        "no credentials": {},
        "wrong secret": {"X-API-Key": f"{probing.keys.client.key_id}.not-the-secret"},
        "malformed token": {"Authorization": "Bearer hl1.e30.AAAA"},
    }
    statuses, open_routes, severities = {}, [], []
    for variant, headers in variants.items():
        for method, path, severity in routes():
            if path == "/v1/predict":
                response = predict(probing, headers)
            else:
                response = probing.http.request(method, path, headers=headers)
            statuses[f"{variant}: {method} {path}"] = response.status_code
            if answered(response.status_code, error_code(response)):
                open_routes.append(f"{method} {path} ({variant}: {response.status_code})")
                severities.append(severity)
    listed = ", ".join(f"{method} {path}" for method, path, _ in routes())
    tried = (
        f"{len(statuses)} requests: {listed}, each with no credentials, a wrong secret and a malformed token"
    )
    figures = {"statuses": statuses, "status_counts": tally(statuses.values())}
    verdict = Verdict(
        "authentication.unauthenticated_access", "Routes without valid credentials", tried, figures
    )
    if not open_routes:
        return verdict.held("every request was refused with 401")
    severity = max(severities, key=("info", "low", "medium", "high", "critical").index)
    reason = (
        "anyone who can reach the server is served predictions or administration without a key"
        if severity == "critical"
        else "the model's interface is disclosed without a key"
    )
    happened = "answered without valid credentials: " + "; ".join(open_routes)
    title = "Routes answered without valid credentials"
    return verdict.weakness(severity, reason, happened, title, {**figures, "open_routes": open_routes})


def forged(token: str) -> dict[str, str]:
    """Tokens an attacker could make from a genuine one without the signing secret."""
    parts = token.split(".")
    variants = {"signature replaced": ".".join([*parts[:-1], base64.urlsafe_b64encode(b"\0" * 32).decode()])}
    variants["signature removed"] = ".".join([*parts[:-1], ""])
    if len(parts) == 3:
        try:
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
            claims["exp"] = float(claims.get("exp", time.time())) + 10 * 365 * 86400
            body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
            variants["expiry extended, signature kept"] = ".".join([parts[0], body, parts[2]])
        except (ValueError, TypeError):
            pass
    return variants


def tokens(probing: Probing) -> list[Finding]:
    """Forged tokens and an expired token must be refused (401)."""
    issued = fetch_token(probing, probing.keys.client)
    if issued.status_code != 200:
        needs = f"the client key could not get a token (POST /oauth/token answered {issued.status_code})"
        return [
            untested("authentication.forged_token", "Forged bearer tokens", needs),
            untested("authentication.expired_token", "Expired bearer tokens", needs),
        ]
    token, lifetime = issued.json()["access_token"], float(issued.json().get("expires_in", math.inf))
    responses = {name: predict(probing, bearer(value)) for name, value in forged(token).items()}
    statuses = {name: response.status_code for name, response in responses.items()}
    accepted = [name for name, got in responses.items() if answered(got.status_code, error_code(got))]
    tried = f"{len(statuses)} forged tokens made from a genuine one: {', '.join(statuses)}"
    verdict = Verdict("authentication.forged_token", "Forged bearer tokens", tried, {"statuses": statuses})
    if accepted:
        forged_finding = verdict.weakness(
            "critical",
            "a client can mint its own credentials (any expiry, any key) without the signing secret",
            f"accepted: {', '.join(accepted)}",
            "Forged bearer tokens accepted",
        )
    else:
        forged_finding = verdict.held("every forged token was refused with 401")
    return [forged_finding, expired_token(probing, token, lifetime)]


def expired_token(probing: Probing, token: str, lifetime: float) -> Finding:
    settings = probing.settings
    figures = {"token_lifetime_s": lifetime}
    read = "asked for a token and read its lifetime"
    verdict = Verdict("authentication.expired_token", "Expired bearer tokens", read, figures)
    if lifetime > settings.max_expiry_wait_s:
        if lifetime > settings.long_token_s:
            return verdict.weakness(
                "low",
                f"a stolen token stays usable {lifetime:.0f} s (over {settings.long_token_s:.0f} s)",
                f"tokens live {lifetime:.0f} s; expiry was not waited out",
                "Long-lived bearer tokens",
            )
        return verdict.untested(
            f"tokens live {lifetime:.0f} s, longer than audit.probes.max_expiry_wait_s "
            f"({settings.max_expiry_wait_s:g} s); raise it to wait the expiry out"
        )
    probing.sleep(lifetime + 0.25)
    status = predict(probing, bearer(token)).status_code
    figures["status_after_expiry"] = status
    verdict = verdict._replace(tried=f"waited out the token's lifetime ({lifetime:g} s), then sent it again")
    if answered(status):
        return verdict.weakness(
            "high",
            "tokens never expire, so a leaked token is a permanent credential",
            f"the expired token was answered with {status}",
            "Expired bearer tokens accepted",
        )
    return verdict.held(f"refused with {status}")


def revocation(probing: Probing) -> Finding:
    """A revoked key's token, API key and token requests must all be refused."""
    check, title = "authentication.revoked_replay", "Revoked credentials replayed"
    keys = probing.keys
    if keys.revocable is None or keys.admin is None:
        return untested(
            check,
            title,
            "name a disposable key (audit.credentials.revocable_key_file), which the audit revokes, and an "
            "admin key (audit.credentials.admin_key_file)",
        )
    issued = fetch_token(probing, keys.revocable)
    if issued.status_code != 200:
        return untested(
            check, title, f"the disposable key got no token ({issued.status_code}); is it revoked?"
        )
    token = issued.json()["access_token"]
    before = predict(probing, bearer(token)).status_code
    revoked = probing.http.post(f"/admin/keys/{keys.revocable.key_id}/revoke", headers=key_header(keys.admin))
    if revoked.status_code != 200:
        return untested(
            check, title, f"the admin key could not revoke the disposable key ({revoked.status_code})"
        )
    statuses = {
        "token replayed": predict(probing, bearer(token)).status_code,
        "API key reused": predict(probing, key_header(keys.revocable)).status_code,
        "new token asked": fetch_token(probing, keys.revocable).status_code,
    }
    figures = {"status_before_revocation": before, "statuses": statuses}
    tried = (
        f"used the disposable key {keys.revocable.key_id} ({before}), revoked it through the admin key, then "
        "replayed its token, reused its API key and asked for a new token"
    )
    accepted = [name for name, status in statuses.items() if status < 400]
    verdict = Verdict(check, title, tried, figures)
    if accepted:
        happened = f"still answered after revocation: {', '.join(accepted)}"
        return verdict.weakness("high", "revoking a leaked key does not stop it", happened)
    return verdict.held("all refused after revocation")


# -- authorisation -------------------------------------------------------------------------------------------


def role_of(probing: Probing, credential: Credential) -> dict | None:
    response = probing.http.get("/v1/info", headers=key_header(credential))
    return response.json() if response.status_code == 200 else None


def roles(probing: Probing) -> list[Finding]:
    """Keys asking for outputs beyond their role; client keys on admin routes; the admin key predicting."""
    keys = probing.keys
    statuses, escalations, severities = {}, [], []
    for label, credential in (("client", keys.client), ("low-role", keys.low_role)):
        info = None if credential is None else role_of(probing, credential)
        if info is None or info.get("role") not in ROLES:
            continue
        declared = ROLES[info["role"]].outputs
        for output in OUTPUTS:
            if output in declared:
                continue
            status = predict(probing, key_header(credential), output=output).status_code
            statuses[f"{label} key (role {info['role']}) asks {output}"] = status
            if status < 400:
                escalations.append(f"the {info['role']} key received {output}")
                severities.append("high" if output == "probabilities" else "medium")
    tried = "each key asked for every output its role does not include"
    verdict = Verdict("authorization.role_escalation", "Outputs beyond a key's role", tried)
    if not statuses:
        escalation = verdict.untested(
            "a key whose role excludes some output (audit.credentials.low_role_key_file, e.g. a labels key)"
        )
    elif escalations:
        escalation = verdict._replace(figures={"statuses": statuses}).weakness(
            "high" if "high" in severities else "medium",
            "probabilities reach roles meant to see labels: they make extraction cheaper (soft labels, "
            "equation solving) and score-based evasion possible",
            "; ".join(escalations),
            "Keys receive more than their role allows",
        )
    else:
        escalation = verdict._replace(figures={"statuses": statuses}).held(
            "every request beyond the role was refused with 403"
        )
    return [escalation, admin_routes(probing)]


def admin_routes(probing: Probing) -> Finding:
    keys = probing.keys
    statuses, breaches = {}, []
    severity = "info"
    for label, credential in (("client", keys.client), ("low-role", keys.low_role)):
        if credential is None:
            continue
        for method, path, _ in routes()[2:]:
            status = probing.http.request(method, path, headers=key_header(credential)).status_code
            statuses[f"{label} key: {method} {path}"] = status
            if answered(status):
                breaches.append(f"the {label} key reached {method} {path} ({status})")
                severity = "critical"
    if keys.admin is not None:
        status = predict(probing, key_header(keys.admin)).status_code
        statuses["admin key: POST /v1/predict"] = status
        if status < 400:
            breaches.append("the admin key is served predictions")
            severity = severity if severity == "critical" else "low"
    tried = "client keys on the admin routes; the admin key asking for predictions"
    verdict = Verdict(
        "authorization.admin_routes", "Administration and least privilege", tried, {"statuses": statuses}
    )
    if not breaches:
        return verdict.held(
            "client keys were refused the admin routes (403) and the admin key was served no predictions"
        )
    reason = (
        "client keys can read the audit log or revoke keys"
        if severity == "critical"
        else "the operator's key doubles as a client key (no least privilege)"
    )
    return verdict.weakness(
        severity, reason, "; ".join(breaches), "Administration reachable beyond the admin role"
    )


# -- validation ----------------------------------------------------------------------------------------------


def malformed_bodies(sample: np.ndarray, input_range) -> dict[str, tuple[bytes, str, int]]:
    """(body, content type, rows it carries) per malformed request."""
    row = np.asarray(sample, np.float32)
    valid = rows_body(row[None])
    flat = json.dumps(row.tolist())
    high = float(input_range[1]) if input_range else 1.0
    out_of_range = np.full_like(row, high + 1.0)
    return {
        "broken JSON": (b'{"inputs": [[', "application/json", 0),
        "not JSON (text/plain)": (valid, "text/plain", 1),
        "wrong shape": (json.dumps({"inputs": [[0.5, 0.5, 0.5]]}).encode(), "application/json", 1),
        "NaN value": (
            b'{"inputs": [' + flat.replace("[", "[NaN, ", 1).encode() + b"]}",
            "application/json",
            1,
        ),
        "out of range": (rows_body(out_of_range[None]), "application/json", 1),
        "strings": (json.dumps({"inputs": [flat.replace("0", '"0"')]}).encode(), "application/json", 1),
        "empty batch": (b'{"inputs": []}', "application/json", 0),
        "unknown field": (valid[:-1] + b', "extra": 1}', "application/json", 1),
        "unknown output": (valid[:-1] + b', "output": "logits"}', "application/json", 1),
        "null inputs": (b'{"inputs": null}', "application/json", 0),
        "deeply nested": (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 0),
        "huge integer literal": (b'{"inputs": [[' + b"1" * 5000 + b"]]}", "application/json", 1),
    }


def leaks(response: httpx.Response) -> bool:
    return any(marker in response.text for marker in LEAK_MARKERS)


def validation(probing: Probing) -> list[Finding]:
    """Malformed and oversized requests must get a 4xx with a JSON error, never a 5xx or a traceback."""
    headers = key_header(probing.keys.client)
    statuses, leaked = {}, []
    for name, (body, content_type, rows) in malformed_bodies(
        probing.sample, probing.info.get("input_range")
    ).items():
        probing.ledger.charge("probes", rows)
        response = probing.http.post(
            "/v1/predict", content=body, headers={**headers, "Content-Type": content_type}
        )
        statuses[name] = response.status_code
        if leaks(response):
            leaked.append(name)
    still_serving = predict(probing, headers).status_code
    malformed = validation_finding(
        "validation.malformed_inputs",
        "Malformed inputs",
        f"{len(statuses)} malformed requests: {', '.join(statuses)}",
        statuses,
        leaked,
        still_serving,
    )
    return [malformed, oversized(probing, headers)]


def validation_finding(check, title, tried, statuses, leaked, still_serving) -> Finding:
    served = [name for name, status in statuses.items() if status < 400]
    failed = [name for name, status in statuses.items() if status >= 500]
    figures = {
        "statuses": statuses,
        "status_counts": tally(statuses.values()),
        "valid_request_after": still_serving,
    }
    verdict = Verdict(check, title, tried, figures)
    if leaked:
        return verdict.weakness(
            "high",
            "error answers disclose the server's internals (tracebacks, file names)",
            f"internals in the answers to: {', '.join(leaked)}",
        )
    if served or failed or still_serving >= 500:
        problems = [f"served: {', '.join(served)}"] if served else []
        problems += [f"server errors: {', '.join(failed)}"] if failed else []
        problems += [f"a valid request afterwards got {still_serving}"] if still_serving >= 500 else []
        return verdict.weakness(
            "medium",
            "invalid or oversized input reaches the model or breaks a request: wrong answers, and an "
            "availability risk",
            "; ".join(problems),
        )
    return verdict.held("every request was refused with a 4xx and a JSON error")


def padded_body(size: int) -> bytes:
    """A JSON body of exactly ``size`` bytes (a list padded with spaces)."""
    head, tail = b'{"inputs": [', b"]}"
    return head + b" " * max(0, size - len(head) - len(tail)) + tail


def chunks(body: bytes, size: int = 65536) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def oversized(probing: Probing, headers: dict) -> Finding:
    limit = probing.info.get("max_body_bytes")
    size = (limit + 1) if isinstance(limit, int) else probing.settings.oversized_bytes
    body = padded_body(size)
    json_headers = {**headers, "Content-Type": "application/json"}
    statuses = {
        f"body of {size} bytes": probing.http.post(
            "/v1/predict", content=body, headers=json_headers
        ).status_code,
        f"chunked body of {size} bytes": probing.http.post(
            "/v1/predict", content=chunks(body), headers=json_headers
        ).status_code,
    }
    max_batch = probing.info.get("max_batch")
    if isinstance(max_batch, int) and max_batch + 1 <= probing.ledger.left:
        statuses[f"batch of {max_batch + 1} rows"] = predict(probing, headers, rows=max_batch + 1).status_code
    still_serving = predict(probing, headers).status_code
    tried = (
        f"bodies past the size limit ({limit if limit is not None else 'none published'} bytes) and batches "
    )
    tried += f"past max_batch ({max_batch})"
    return validation_finding(
        "validation.oversized_inputs", "Oversized inputs", tried, statuses, [], still_serving
    )


# -- throttling ----------------------------------------------------------------------------------------------


def rate_limit(probing: Probing, token: str | None = None) -> Finding:
    """A burst of requests past the published burst must meet 429s with Retry-After.

    With a published burst, requests of that many rows (the bucket drains at once, and refills less than a
    request's worth between two); otherwise ``burst_requests`` requests of ``burst_rows`` rows.
    """
    settings, info = probing.settings, probing.info
    largest = info.get("max_batch") or math.inf
    published = info.get("burst") if info.get("rate") is not None else None
    if isinstance(published, int) and published >= 1:
        rows = int(min(published, largest))
        wanted = published + 2 * rows
    else:
        rows = int(min(settings.burst_rows, largest))
        wanted = settings.burst_requests * rows
    wanted = min(wanted, settings.max_burst_rows, probing.ledger.left)
    requests = wanted // rows
    if requests < 2:
        return untested(
            "throttling.rate_limit", "Rate limit", "the audit's budget has too little left for a burst"
        )
    headers = bearer(token) if token else key_header(probing.keys.client)
    statuses, codes, retry_after = [], [], []
    started = time.perf_counter()
    for _ in range(requests):
        response = predict(probing, headers, rows=rows, member="probes")
        statuses.append(response.status_code)
        if response.status_code == 429:
            codes.append(response.json().get("error"))
            retry_after.append(response.headers.get("Retry-After"))
    elapsed = time.perf_counter() - started
    served_rows = rows * statuses.count(200)
    figures = {
        "requests": requests,
        "rows_per_request": rows,
        "status_counts": tally(statuses),
        "rows_served": served_rows,
        "rows_per_second": served_rows / elapsed if elapsed > 0 else None,
        "published_rate": info.get("rate"),
        "published_burst": info.get("burst"),
    }
    tried = f"{requests} back-to-back requests of {rows} rows ({requests * rows} rows) with the client key"
    limited = [code for code in codes if code == "rate_limited"]
    verdict = Verdict("throttling.rate_limit", "Rate limit", tried, figures)
    if limited:
        happened = f"{len(limited)} of {requests} answered 429 rate_limited"
        if not all(retry_after):
            return verdict.weakness(
                "low",
                "clients cannot tell when to retry, so well-behaved ones hammer the server",
                happened + ", some without Retry-After",
                "Rate limit without Retry-After",
            )
        return verdict.held(happened + " with Retry-After")
    rate = info.get("rate")
    if rate is not None and not codes and (figures["rows_per_second"] or 0) < rate:
        return verdict.untested(
            f"the burst reached {figures['rows_per_second'] or 0:.0f} rows/s, below the published rate of "
            f"{rate:g} rows/s, so the limit was not exercised (raise audit.probes.max_burst_rows)"
        )
    return verdict.weakness(
        "medium",
        "one key is served as fast as the server answers, so extraction is bounded by nothing but the quota",
        f"all {statuses.count(200)} of {requests} served ({figures['rows_per_second'] or 0:.0f} rows/s)"
        if not codes
        else f"refused only by the quota ({', '.join(map(str, codes))}), never rate limited",
        "No rate limit",
    )


def client_info(probing: Probing) -> dict:
    return probing.http.get("/v1/info", headers=key_header(probing.keys.client)).json()


def quota(probing: Probing) -> Finding:
    """The key's quota: published, drained to less than one batch, then a batch one row past what is left
    refused whole. Not tested when crossing it would take more rows than the audit has left."""
    info = client_info(probing)
    declared, remaining = info.get("quota"), info.get("remaining")
    figures = {"quota": declared, "remaining_before": remaining}
    verdict = Verdict(
        "throttling.quota", "Per-key quota", "read the client key's quota from GET /v1/info", figures
    )
    if declared is None or remaining is None:
        return verdict.weakness(
            "medium",
            "one key may be served without end: nothing bounds how much of the model it extracts",
            "no quota is published for the key (quota: null)",
            "No per-key quota",
        )
    if remaining + 1 > probing.ledger.left:
        return verdict.untested(
            f"crossing the quota takes {remaining + 1} rows ({remaining} left of {declared}), the audit has "
            f"{probing.ledger.left} left; raise audit.budget (or audit with a key that has less left)"
        )
    batch = admitted_batch(info)
    drained, statuses = drain(probing, remaining, batch, info.get("rate"))
    figures.update(rows_drained=drained, drain_status_counts=tally(statuses))
    left = client_info(probing).get("remaining")
    if not isinstance(left, int) or left >= batch or left + 1 > probing.ledger.left:
        return verdict.untested(
            f"draining the quota in batches of {batch} left {left} rows, not less than one batch, within "
            f"audit.probes.max_quota_wait_s ({probing.settings.max_quota_wait_s:g} s of waiting) and the "
            f"audit's budget ({probing.ledger.left} rows left)"
        )
    over = left + 1
    response = predict(probing, key_header(probing.keys.client), rows=over)
    after = client_info(probing).get("remaining")
    error = response.json().get("error") if response.status_code >= 400 else None
    figures.update(remaining_drained=left, status=response.status_code, error=error, remaining_after=after)
    verdict = verdict._replace(
        tried=f"drained the key's quota of {declared} from {remaining} to {left} rows left ({drained} rows "
        f"served), then sent one batch of {over} rows, one past what was left"
    )
    if response.status_code < 400 or after != left:
        return verdict.weakness(
            "high",
            "a batch past the quota was served, in whole or in part",
            f"answered {response.status_code}; remaining went from {left} to {after}",
            "Quota not enforced",
        )
    return verdict.held(f"refused whole ({response.status_code} {error})")


def admitted_batch(info: dict) -> int:
    """The largest batch the target says it admits: max_batch, and the rate-limit burst when it has one."""
    sizes = [info.get("max_batch")]
    if info.get("rate") is not None:
        sizes.append(info.get("burst"))
    sizes = [size for size in sizes if isinstance(size, int) and size >= 1]
    return min(sizes) if sizes else 1


def drain(probing: Probing, remaining: int, batch: int, rate: float | None) -> tuple[int, list[int]]:
    """Spends the client key's quota in batches of ``batch`` until less than one batch is left: paced at the
    published ``rate`` (rows/s), rate-limit refusals waited out, ``max_quota_wait_s`` of waiting in all, and
    never so many rows that the batch past the quota would no longer fit the audit's budget. Returns the rows
    served and the statuses."""
    served, statuses, waited = 0, [], 0.0
    pace = batch / rate if rate else 0.0
    while remaining - served >= batch and probing.ledger.left >= remaining - served + 1:
        response = predict(probing, key_header(probing.keys.client), rows=batch)
        statuses.append(response.status_code)
        if response.status_code == 200:
            served += batch
            wait = pace
        elif response.status_code == 429 and response.json().get("error") == "rate_limited":
            wait = float(response.json().get("retry_after") or 1.0)
        else:
            break
        if waited + wait > probing.settings.max_quota_wait_s:
            break
        probing.sleep(wait)
        waited += wait
    return served, statuses


def transport(probing: Probing) -> Finding:
    response = probing.http.get("/healthz")
    missing = [
        name
        for name, value in SECURITY_HEADERS.items()
        if name not in response.headers or (value is not None and value not in response.headers[name])
    ]
    tried = (
        "connected over TLS, verifying the certificate against audit.ca_file, and read an answer's headers"
    )
    figures = {"headers": {name: response.headers.get(name) for name in SECURITY_HEADERS}}
    verdict = Verdict("transport.headers", "TLS and security headers", tried, figures)
    if missing:
        return verdict.weakness(
            "low",
            "answers may be cached by intermediaries or downgraded to plain HTTP by a browser client",
            f"missing: {', '.join(missing)}",
            "Security headers missing",
        )
    return verdict.held("certificate verified; headers set")


TLS_VERSIONS = {
    "TLSv1.0": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
WEAK_VERSIONS = ("TLSv1.0", "TLSv1.1")


def scanning_context(version: ssl.TLSVersion, ciphers: str = "ALL:@SECLEVEL=0") -> ssl.SSLContext:
    """A client that speaks only ``version`` and offers ``ciphers``; it verifies nothing, as it only asks
    what the server accepts (the other probes verify the certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():  # offering deprecated versions is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    context.set_ciphers(ciphers)
    return context


def handshake(host: str, port: int, context: ssl.SSLContext, timeout_s: float = 5.0) -> str | None:
    """The cipher suite the server agreed on with ``context``, or None when it refused the handshake."""
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            return tls.cipher()[0]
    except (ssl.SSLError, OSError):
        return None


def tls12_candidates() -> list[dict]:
    """The TLS 1.2 (and older) cipher suites this machine's OpenSSL can offer, with their properties."""
    offered = scanning_context(ssl.TLSVersion.TLSv1_2).get_ciphers()
    return [suite for suite in offered if suite["protocol"] != "TLSv1.3"]


def tls(probing: Probing) -> Finding:
    """The protocol versions the server accepts, and each TLS 1.2 suite it accepts when offered alone: no
    version below 1.2, and at 1.2 only AEAD suites with forward secrecy (ECDHE or DHE)."""
    check, title = "transport.tls", "TLS versions and cipher suites"
    url = probing.http.base_url
    host, port = url.host, url.port or 443
    versions = {}
    for name, version in TLS_VERSIONS.items():
        try:
            versions[name] = handshake(host, port, scanning_context(version)) is not None
        except (ValueError, ssl.SSLError):  # this machine's OpenSSL cannot speak it
            versions[name] = None
    candidates = tls12_candidates() if versions.get("TLSv1.2") else []
    accepted = [
        suite
        for suite in candidates
        if handshake(host, port, scanning_context(ssl.TLSVersion.TLSv1_2, suite["name"])) == suite["name"]
    ]
    weak_suites = [
        suite["name"] for suite in accepted if not suite["aead"] or suite["kea"] not in ("kx-ecdhe", "kx-dhe")
    ]
    figures = {
        "versions_accepted": versions,
        "tls12_suites_tried": len(candidates),
        "tls12_suites_accepted": [suite["name"] for suite in accepted],
        "openssl": ssl.OPENSSL_VERSION,
    }
    tried = (
        f"handshakes at each of {', '.join(TLS_VERSIONS)}, then each of {len(candidates)} TLS 1.2 cipher "
        "suites offered alone"
    )
    old = [name for name in WEAK_VERSIONS if versions.get(name)]
    untestable = [name for name in WEAK_VERSIONS if versions.get(name) is None]
    verdict = Verdict(check, title, tried, figures)
    if old:
        return verdict.weakness(
            "medium",
            "TLS 1.0 and 1.1 are deprecated (RFC 8996): CBC-mode and SHA-1 weaknesses, no AEAD",
            f"accepted: {', '.join(old)}",
            "Obsolete TLS versions accepted",
        )
    if weak_suites:
        return verdict.weakness(
            "low",
            "CBC suites invite padding-oracle and timing attacks; static RSA key exchange has no forward "
            "secrecy",
            f"accepted at TLS 1.2: {', '.join(weak_suites)}",
            "Non-AEAD or non-forward-secret TLS 1.2 suites accepted",
        )
    if not versions.get("TLSv1.2") and not versions.get("TLSv1.3"):
        return verdict.untested("no handshake succeeded at TLS 1.2 or 1.3")
    happened = f"accepted {', '.join(name for name, ok in versions.items() if ok)}"
    happened += f"; at TLS 1.2 only AEAD suites with forward secrecy ({len(accepted)} of {len(candidates)})"
    if untestable:
        happened += f"; {', '.join(untestable)} not tried (this machine's OpenSSL cannot offer them)"
    return verdict.held(happened)


def failed_auth_flood(probing: Probing) -> Finding:
    """``auth_flood_attempts`` wrong secrets for the client's key id, back to back: a server that throttles
    failed authentication answers some with 429 and Retry-After. Then the genuine key asks ``/v1/info``."""
    check, title = "authentication.failed_attempts", "Throttling of failed authentication"
    attempts = probing.settings.auth_flood_attempts
    headers = {"X-API-Key": f"{probing.keys.client.key_id}.wrong-secret-from-the-audit"}
    statuses, retry_after, seconds = [], [], []
    for _ in range(attempts):
        started = time.perf_counter()
        response = probing.http.get("/v1/info", headers=headers)
        seconds.append(time.perf_counter() - started)
        statuses.append(response.status_code)
        if response.status_code == 429:
            retry_after.append(response.headers.get("Retry-After"))
    genuine = probing.http.get("/v1/info", headers=key_header(probing.keys.client)).status_code
    figures = {
        "attempts": attempts,
        "status_counts": tally(statuses),
        "first_429_at": statuses.index(429) + 1 if 429 in statuses else None,
        "median_ms_per_attempt": round(1000 * float(np.median(seconds)), 1),
        "genuine_key_status_after": genuine,
    }
    tried = f"{attempts} requests with a wrong secret for the client's key id, back to back"
    served = [status for status in statuses if status < 400]
    verdict = Verdict(check, title, tried, figures)
    if served:
        return verdict.weakness(
            "critical",
            "a request with a wrong secret got past authentication",
            f"{len(served)} of {attempts} answered {sorted(set(served))}",
            "A wrong secret was served",
        )
    if not retry_after:
        return verdict.weakness(
            "low",
            "nothing limits guessing or the server-side cost of each failed attempt (an availability risk "
            "when verifying a secret is expensive)",
            f"all {attempts} answered {', '.join(tally(statuses))}; none 429",
            "Failed authentication is not throttled",
        )
    if not all(retry_after):
        return verdict.weakness(
            "low",
            "clients cannot tell when to retry",
            f"{len(retry_after)} of {attempts} answered 429, some without Retry-After",
            "Failed-authentication throttling without Retry-After",
        )
    happened = (
        f"429 with Retry-After from attempt {figures['first_429_at']} on ({len(retry_after)} of {attempts})"
    )
    happened += f"; the genuine key then got {genuine}"
    return verdict.held(happened)


def alarms(probing: Probing) -> list[dict] | None:
    """The server's alarms (admin key); None when there is no admin key or it is refused."""
    if probing.keys.admin is None:
        return None
    response = probing.http.get(
        "/admin/alarms", params={"limit": 1000}, headers=key_header(probing.keys.admin)
    )
    return response.json().get("alarms", []) if response.status_code == 200 else None
