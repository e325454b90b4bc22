"""HTTP-level hardening of the prediction server, each finding reproduced against a live server on loopback:
a huge JSON integer literal (400, not 500), a header block the HTTP parser refuses (audited), TLS 1.2 cipher
suites (AEAD only), bearer-token signature spellings (canonical only), the OpenAPI schema against behaviour
(schemathesis), and bodies parsed off the event loop.

One server per module, started in a thread on a free port of 127.0.0.1, stopped at the end.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import time
import warnings
from typing import NamedTuple

import httpx
import numpy as np
import pytest
import uvicorn

from heistlab.defenses import rounding
from heistlab.serving.app import create_app, unparsed_request_auditor
from heistlab.serving.audit import AuditLog
from heistlab.serving.auth import Authenticator, Credential, KeyStore, create_key
from heistlab.serving.server import MAX_HEADER_BYTES, HttpToolsProtocol, serve_in_thread
from heistlab.serving.service import ServingCore, build_core
from heistlab.serving.tls import client_context, self_signed_pair
from heistlab.serving.validation import (
    BadRequest,
    BodyParser,
    InputSchema,
    input_schema,
    parse_predict_body,
)

CHEAP_KDF = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1, "dklen": 32}
JSON = "application/json"
JSON = "application/json"
HUGE_INTEGER = b'{"inputs": [[' + b"1" * 5000 + b"]]}"


class Live(NamedTuple):
    url: str
    host: str
    port: int
    ca_file: str
    client: Credential
    admin: Credential
    audit: AuditLog
    core: ServingCore
    http: httpx.Client


@pytest.fixture(scope="module")
def live(tmp_path_factory, small_victim):
    folder = tmp_path_factory.mktemp("hardening")
    tls = self_signed_pair(folder / "tls")
    store = folder / "keys.json"
    client, admin = create_key(store, "probabilities", CHEAP_KDF), create_key(store, "admin", CHEAP_KDF)
    audit = AuditLog(folder / "audit.sqlite")
    core = build_core(small_victim, rounding(2), audit=audit, quota=100_000)
    authenticator = Authenticator(KeyStore(store), b"t" * 32, 300)
    app = create_app(core, authenticator, audit, input_schema(small_victim.input_shape, max_batch=64))
    server = serve_in_thread(app, tls.certfile, tls.keyfile, on_rejected=unparsed_request_auditor(audit))
    host, port = server.url.removeprefix("https://").rsplit(":", 1)
    http = httpx.Client(base_url=server.url, verify=client_context(tls.certfile), timeout=30)
    try:
        yield Live(server.url, host, int(port), str(tls.certfile), client, admin, audit, core, http)
    finally:
        http.close()
        server.stop()


def key(credential: Credential) -> dict[str, str]:
    return {"X-API-Key": credential.api_key}


def valid_body(rows: int = 1) -> bytes:
    return ('{"inputs": ' + str(np.full((rows, 8, 8, 1), 0.5).tolist()) + "}").encode()


def test_a_json_integer_past_the_digit_limit_is_a_400_never_a_500(live):
    served_before = live.core.served(live.client.key_id)
    response = live.http.post(
        "/v1/predict", content=HUGE_INTEGER, headers={**key(live.client), "Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "invalid_json" and "4300 digits" in body["message"]
    assert "Traceback" not in response.text and "set_int_max_str_digits" not in response.text
    row = live.audit.requests(limit=1, key_id=live.client.key_id)[0]
    assert (row["status"], row["outcome"], row["request_id"]) == (400, "refused", body["request_id"])
    assert live.core.served(live.client.key_id) == served_before
    ok = live.http.post(
        "/v1/predict", content=valid_body(), headers={**key(live.client), "Content-Type": "application/json"}
    )
    assert ok.status_code == 200


def raw_exchange(live: Live, request: bytes, timeout_s: float = 10.0) -> bytes:
    """Sends ``request`` over one TLS connection and returns what came back before the server closed it."""
    context = ssl.create_default_context(cafile=live.ca_file)
    received = b""
    with (
        socket.create_connection((live.host, live.port), timeout=timeout_s) as raw,
        context.wrap_socket(raw, server_hostname=live.host) as tls,
    ):
        try:
            tls.sendall(request)
            while chunk := tls.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            pass  # the server may close while the rest of the request is still on its way
    return received


def test_a_header_block_the_http_parser_refuses_is_answered_400_and_audited(live):
    before = live.audit.count(outcome="refused")
    header = b"X-API-Key: " + b"a" * 70_000 + b"\r\n"
    request = b"GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header + b"\r\n"
    answer = raw_exchange(live, request)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:100]
    deadline = time.monotonic() + 5
    while live.audit.count(outcome="refused") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.audit.count(outcome="refused") == before + 1
    row = live.audit.requests(limit=1)[0]
    assert (row["status"], row["method"], row["path"], row["key_id"]) == (400, "", "", None)
    assert "refused by the HTTP parser from 127.0.0.1" in row["reason"]
    assert str(MAX_HEADER_BYTES) in row["reason"]
    just_under = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Pad: "
    just_under += b"a" * (MAX_HEADER_BYTES - 200) + b"\r\n\r\n"
    assert raw_exchange(live, just_under).startswith(b"HTTP/1.1 200")


def tls12_context(ciphers: str) -> ssl.SSLContext:
    """A client that speaks only TLS 1.2 and offers only ``ciphers`` (and trusts nothing: no verification)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    return context


def handshake(live: Live, context: ssl.SSLContext) -> str | None:
    """The suite agreed on, or None when the handshake fails."""
    with socket.create_connection((live.host, live.port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=live.host) as tls:
                return tls.cipher()[0]
        except (ssl.SSLError, ConnectionResetError):
            return None


@pytest.mark.parametrize(
    "suite", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA", "ECDHE-ECDSA-AES128-SHA256"]
)
def test_tls12_refuses_a_client_that_offers_only_a_cbc_suite(live, suite):
    assert handshake(live, tls12_context(suite)) is None


@pytest.mark.parametrize(
    "suite",
    ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"],
)
def test_tls12_agrees_on_an_aead_suite(live, suite):
    assert handshake(live, tls12_context(suite)) == suite


def test_tls13_is_served_and_older_versions_are_not(live):
    modern = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    modern.check_hostname, modern.verify_mode = False, ssl.CERT_NONE
    modern.minimum_version = ssl.TLSVersion.TLSv1_3
    assert handshake(live, modern) in ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():  # offering them is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version, old.maximum_version = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1
    assert handshake(live, old) is None


def spellings(signature: str) -> dict[str, str]:
    """Other spellings of the same signature bytes that lenient base64 decoders accept."""
    standard = signature.replace("-", "+").replace("_", "/")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    return {
        "padded": signature + "=",
        "junk appended": signature + "!!",
        "standard alphabet": standard,
        "unused low bits set": signature[:-1] + alphabet[last | 0b0011],
        "whitespace inside": signature[:10] + " " + signature[10:],
    }


def test_a_bearer_signature_is_accepted_only_in_its_canonical_spelling(live):
    form = {
        "grant_type": "client_credentials",
        "client_id": live.client.key_id,
        "client_secret": live.client.key,
    }
    for _ in range(40):  # until a signature holds '-' or '_', so that the standard-alphabet spelling differs
        token = live.http.post("/oauth/token", data=form).json()["access_token"]
        if set("-_") & set(token.rsplit(".", 1)[1]):
            break
    head, signature = token.rsplit(".", 1)
    signature_bytes = base64.urlsafe_b64decode(signature + "=")
    assert base64.urlsafe_b64encode(signature_bytes).decode().rstrip("=") == signature
    assert live.http.get("/v1/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    for name, spelled in spellings(signature).items():
        assert spelled != signature, name
        if name not in ("junk appended", "whitespace inside"):  # the same bytes to a lenient decoder
            assert (
                base64.urlsafe_b64decode(spelled.replace("+", "-").replace("/", "_") + "==")
                == signature_bytes
            )
        response = live.http.get("/v1/info", headers={"Authorization": f"Bearer {head}.{spelled}"})
        assert response.status_code == 401, (name, response.text)
        assert response.json()["error"] == "unauthenticated"


def test_the_openapi_schema_states_what_the_server_enforces(live):
    document = live.http.get("/openapi.json").json()
    predict_body = document["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]
    inputs = predict_body["schema"]["properties"]["inputs"]
    assert (inputs["minItems"], inputs["maxItems"]) == (1, 64)
    row = inputs["items"]
    assert (row["minItems"], row["maxItems"], row["items"]["items"]["items"]["maximum"]) == (8, 8, 1.0)
    assert predict_body["schema"]["additionalProperties"] is False
    headers = {**key(live.client), "Content-Type": "application/json"}
    empty = live.http.post("/v1/predict", content=b'{"inputs": []}', headers=headers)
    assert empty.status_code == 422 and "422" in document["paths"]["/v1/predict"]["post"]["responses"]
    token_form = document["paths"]["/oauth/token"]["post"]["requestBody"]["content"]
    assert set(token_form["application/x-www-form-urlencoded"]["schema"]["required"]) == {
        "grant_type", "client_id", "client_secret"
    }  # fmt: skip
    no_secret = live.http.post("/oauth/token", data={"grant_type": "client_credentials", "client_id": "x"})
    assert no_secret.status_code == 400
    revoke = document["paths"]["/admin/keys/{key_id}/revoke"]["post"]["responses"]
    assert "404" in revoke
    # The prediction routes authenticate in their handlers and state the same credentials as /v1/info.
    info, paths = document["paths"]["/v1/info"]["get"], document["paths"]
    assert info["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}]
    for operation in (paths["/v1/predict"]["post"], paths["/v2/models/{name}/infer"]["post"]):
        assert operation["security"] == info["security"]
    assert set(document["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    unknown = live.http.post("/admin/keys/no-such-key/revoke", headers=key(live.admin))
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"


def outcome(parse) -> tuple:
    try:
        parsed = parse()
    except BadRequest as error:
        return ("refused", error.status, error.code, error.message)
    return ("parsed", parsed.inputs.dtype.name, parsed.inputs.tolist(), parsed.output)


def test_the_body_parser_gives_the_same_answer_in_a_thread_and_in_a_worker_process():
    import anyio

    schema = InputSchema((8, 8, 1), max_batch=64)
    bodies = {
        "valid": valid_body(3),
        "huge integer": HUGE_INTEGER,
        "too many rows": valid_body(65),
        "broken": b'{"inputs": [[',
    }
    in_thread, in_process = BodyParser(in_thread_bytes=2**30), BodyParser(in_thread_bytes=0)
    try:
        for name, body in bodies.items():
            expected = outcome(lambda body=body: parse_predict_body(body, JSON, schema))
            for parser in (in_thread, in_process):
                parsed = outcome(lambda body=body, parser=parser: anyio.run(parser.parse, body, JSON, schema))
                assert parsed == expected, name
        assert outcome(lambda: parse_predict_body(HUGE_INTEGER, "application/json", schema))[1] == 400
        assert in_process._pool is not None and in_thread._pool is None
    finally:
        in_process.close()


@pytest.fixture(scope="module")
def asgi_app(tmp_path_factory, small_victim):
    """The app alone (schemathesis calls it in-process through ASGI), with a client and an admin key."""
    folder = tmp_path_factory.mktemp("schema")
    store = folder / "keys.json"
    client, admin = create_key(store, "probabilities", CHEAP_KDF), create_key(store, "admin", CHEAP_KDF)
    audit = AuditLog(folder / "audit.sqlite")
    core = build_core(small_victim, rounding(2), audit=audit, quota=1_000_000)
    authenticator = Authenticator(KeyStore(store), b"t" * 32, 300)
    app = create_app(core, authenticator, audit, input_schema(small_victim.input_shape, max_batch=4))
    return app, client, admin, audit


def fuzz(operation, mode, headers: dict, statuses: list, examples: int, excluded=()):
    """Runs ``examples`` schemathesis cases of ``operation`` (schema-valid or schema-invalid, as ``mode``
    says) with every default check on but ``excluded``."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        response = case.call_and_validate(headers=headers, excluded_checks=list(excluded))
        statuses.append(response.status_code)

    check()


@pytest.mark.slow
def test_schemathesis_finds_no_disagreement_between_the_schema_and_the_server(asgi_app):
    """Every documented operation, schema-valid and schema-invalid requests, with schemathesis's checks on
    (no 5xx, documented status codes, response schemas and content types, schema-valid requests not refused
    with 400/422, schema-invalid ones not served), as a client key and as the admin key."""
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

    app, client, admin, audit = asgi_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 11
    statuses: list[int] = []
    negative = schemathesis.GenerationMode.NEGATIVE
    with_invalid_requests = set()
    for operation in operations:
        for credential in (client, admin):
            for mode in (schemathesis.GenerationMode.POSITIVE, negative):
                # Schema-invalid requests may carry an empty Authorization header next to the valid X-API-Key
                # sent here, which the server serves (an empty header counts as absent): ignored_auth would
                # call that unenforced auth. It runs on the schema-valid requests.
                excluded = [ignored_auth] if mode == negative else []
                if operation.label == "POST /v2/models/{name}/infer":
                    # JSON schema cannot say that an OIP tensor's data must fill its shape, nor that the
                    # model's name is the one served: schema-valid bodies are refused 422 or 404 here.
                    excluded.append(positive_data_acceptance)
                try:
                    fuzz(operation, mode, {"X-API-Key": credential.api_key}, statuses, 10, excluded)
                except Unsatisfiable:  # nothing in the request can be invalid (GET /healthz)
                    assert mode == negative
                else:
                    with_invalid_requests.add(operation.label) if mode == negative else None
    assert len(with_invalid_requests) >= 5, with_invalid_requests
    assert all(status < 500 for status in statuses) and len(statuses) >= 11 * 2 * 2
    assert any(400 <= status < 500 for status in statuses) and 200 in statuses
    assert audit.count() >= len(statuses)


class RecordingTransport(asyncio.Transport):
    """What the protocol writes, and whether it closed the connection (no socket involved)."""

    def __init__(self):
        super().__init__()
        self.written, self.closed = b"", False

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8443)}.get(name, default)

    def write(self, data):
        self.written += data

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


async def _nothing(scope, receive, send):
    return None


def received_in_reads(parser: str, *reads: bytes) -> tuple[RecordingTransport, list[str]]:
    """Hands ``reads`` to the server's HTTP protocol (``parser``: h11 or httptools) one read each, as a
    busy server's socket can group bytes."""
    from uvicorn.server import ServerState

    from heistlab.serving.server import http_protocol

    async def exchange():
        config = uvicorn.Config(_nothing, lifespan="off", h11_max_incomplete_event_size=MAX_HEADER_BYTES)
        config.load()
        reported: list[str] = []
        protocol_class = http_protocol(reported.append, parser)
        protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        for read in reads:
            if transport.closed:  # a closed connection reads nothing more
                break
            protocol.data_received(read)
            await asyncio.sleep(0)
        return transport, reported

    return asyncio.run(exchange())


PARSERS = ["h11", pytest.param("httptools", marks=pytest.mark.skipif(
    HttpToolsProtocol is None, reason="httptools is not installed"))]  # fmt: skip


@pytest.mark.parametrize("parser", PARSERS)
def test_a_header_block_over_the_bound_is_refused_even_when_it_arrives_in_one_read(parser):
    """h11 bounds only incomplete heads, llhttp none; a whole 70 KB head in one read is still refused, and
    reported."""
    head = b"GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + b"a" * 70_000 + b"\r\n\r\n"
    transport, reported = received_in_reads(parser, head)
    assert transport.written.startswith(b"HTTP/1.1 400") and transport.closed
    assert len(reported) == 1 and str(MAX_HEADER_BYTES) in reported[0]
    body = b"x" * 100_000  # a large body after a small head, in the same read, is not a large head
    request = b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n" + body
    transport, reported = received_in_reads(parser, request)
    assert not transport.written.startswith(b"HTTP/1.1 400") and reported == []


@pytest.mark.parametrize("parser", PARSERS)
def test_a_header_block_over_the_bound_is_refused_when_it_trickles_in(parser):
    """A head sent a few bytes at a time, never ending, is refused once it passes the bound."""
    start = b"GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: "
    trickle = [start] + [b"a" * 1000] * (MAX_HEADER_BYTES // 1000 + 2)
    transport, reported = received_in_reads(parser, *trickle)
    assert transport.written.startswith(b"HTTP/1.1 400") and transport.closed
    assert len(reported) == 1 and str(MAX_HEADER_BYTES) in reported[0]


@pytest.mark.parametrize("parser", PARSERS)
def test_malformed_request_lines_are_refused_and_reported(parser):
    transport, reported = received_in_reads(parser, b"NOT A REQUEST\r\n\r\n")
    assert transport.written.startswith(b"HTTP/1.1 400") and transport.closed
    assert len(reported) == 1 and "refused by the HTTP parser" in reported[0]


def test_the_server_parses_with_httptools_and_runs_uvloop_when_installed():
    from heistlab.serving.server import HAS_UVLOOP, event_loop, http_protocol

    chosen = http_protocol(None)
    expected = "ReportingH11Protocol" if HttpToolsProtocol is None else "ReportingHttpToolsProtocol"
    assert chosen.__name__ == expected
    assert event_loop() == ("uvloop" if HAS_UVLOOP else "asyncio")
    with pytest.raises(ValueError, match="httptools, h11 or None"):
        http_protocol(None, "picohttp")


def test_without_httptools_and_uvloop_the_server_falls_back_to_h11_and_asyncio(monkeypatch):
    from heistlab.serving import server

    monkeypatch.setattr(server, "HttpToolsProtocol", None)
    monkeypatch.setattr(server, "HAS_UVLOOP", False)
    assert server.http_protocol(None).__name__ == "ReportingH11Protocol"
    assert server.event_loop() == "asyncio"
    with pytest.raises(ImportError, match="pip install httptools, or choose h11"):
        server.http_protocol(None, "httptools")
