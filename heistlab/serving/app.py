"""The prediction server's FastAPI app: authentication, roles, validation, throttling, audit, monitoring.

Endpoints (the schema is published at ``/openapi.json``):

- ``POST /oauth/token``: OAuth 2.0 client credentials (form body or HTTP Basic) -> a short-lived bearer token.
- ``GET /v1/info``: what this key may ask and receive: input shape and range, classes, outputs, quota left.
- ``POST /v1/predict``: ``{"inputs": [...], "output": ...}`` -> ``{"outputs": [...], "remaining": ...}``;
  behind ``defense=proof_of_work``, first answered 428 with a hashcash puzzle (``heistlab.serving.puzzle``).
- ``GET /admin/audit``, ``GET /admin/alarms``, ``POST /admin/keys/{key_id}/revoke``: admin role only.
- ``GET /healthz``: liveness, no credentials, no model.
- The Open Inference Protocol (KServe V2 REST, ``heistlab.serving.oip``) for any OIP client, with the same
  keys, roles, quotas, defenses and audit rows as ``/v1/predict``: ``POST /v2/models/{model_name}/infer``
  (one input tensor; the output asked for by name: probabilities, top_k or labels), ``GET
  /v2/models/{model_name}`` (metadata), and ``GET /v2/health/ready`` and ``/v2/health/live`` (no credentials).
- ``GET /metrics``: Prometheus metrics (``heistlab.serving.metrics``): roles ``metrics`` and ``admin`` only.

Status codes: 400 malformed, 401 no valid credentials (missing, wrong, revoked, expired), 403 beyond the
role, 404/405 no such route, 413 body too large, 415 not JSON, 422 invalid inputs, 429 refused by admission
(quota spent, rate limited, or a detector's refusal; with ``Retry-After``) or too many failed secret checks
for the key id or from the address (``heistlab.serving.failed_auth``; answered after a hold, with
``Retry-After``), 500 a generic message and a request id (the traceback goes to the server log only).
428: a prediction without a valid proof-of-work solution (missing, wrong, reused, expired); body: a puzzle.
Every request, whatever its fate, is one row in the audit log, including one that the HTTP parser refuses
before it reaches the app (a header block over 16 KiB, a malformed request line: 400, path and method left
empty) when the server is started with ``on_rejected=unparsed_request_auditor(audit)``.

Deliberately weak deployments, for exercising audits (``python -m experiments.audit``) and nothing else, are
off by default and logged as warnings when on: ``insecure_open_routes`` serves the named prediction routes
to requests without credentials, as the client ``anonymous`` with role ``insecure_open_role``;
``insecure_probabilities_to_every_role`` lets every role that is served predictions ask for probabilities.
"""

import asyncio
import base64
import binascii
import functools
import inspect
import logging
import math
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NamedTuple
from urllib.parse import parse_qs, unquote_plus

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.datastructures import URL, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from heistlab.api import InvalidQuery, QueryRefused
from heistlab.serving import oip
from heistlab.serving.audit import AuditEntry, AuditLog, outcome_for
from heistlab.serving.auth import (
    ROLES,
    Authenticator,
    Credential,
    Forbidden,
    Principal,
    Role,
    Unauthenticated,
    allowed_output,
    role_named,
)
from heistlab.serving.batching import Coalescer
from heistlab.serving.failed_auth import FailedAuthThrottle, Throttled
from heistlab.serving.metrics import (
    DEFAULT_MAX_KEY_SERIES,
    BuildInfo,
    ServerMetrics,
    app_routes,
    route_matcher,
)
from heistlab.serving.puzzle import PuzzleBook, PuzzleRequired, request_digest
from heistlab.serving.service import Call, ServingCore
from heistlab.serving.throttle import retry_after_header
from heistlab.serving.validation import (
    BadRequest,
    BodyParser,
    ErrorBody,
    InputSchema,
    PredictAnswer,
    ServiceInfo,
    TokenAnswer,
    body_digest,
    check_body_size,
    inputs_digest,
    parse_predict_body,
    predict_body_schema,
    shared_body_parser,
)

log = logging.getLogger("heistlab.serving")
# A body this small (a batch-1 request is about 1.3 KB) is digested and parsed on the event loop: tens of
# microseconds, less than the hop to a worker thread that larger bodies take.
INLINE_BODY_BYTES = 4096
MAX_TOKEN_BODY_BYTES = 8192
TOKEN_PARAMETERS = ("grant_type", "client_id", "client_secret")
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Strict-Transport-Security": "max-age=31536000",
}
ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 413, 415, 422, 429, 500)}
TOKEN_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 413, 500)}
# FastAPI's own OpenTelemetry (recent FastAPI) is off: it looks the process-wide providers up on every
# request, and heistlab sets none up, so it recorded nothing. The server's monitoring is its audit log,
# /metrics and the JSON request log.
WITHOUT_NATIVE_TELEMETRY = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)
# Routes an insecure deployment may open to anonymous clients (never /oauth/token or the admin routes).
OPENABLE_ROUTES = ("/v1/info", "/v1/predict")
ANONYMOUS = "anonymous"
# The OpenAPI security requirement of a route with ``documented_security``: a bearer token or an API key.
SECURITY_REQUIREMENTS = [{"HTTPBearer": []}, {"APIKeyHeader": []}]


class ServerSettings(NamedTuple):
    host: str
    port: int
    certfile: Path
    keyfile: Path
    log_level: str = "info"
    access_log: bool = False
    on_rejected: Callable[[str], None] | None = None


def error_response(
    status: int, code: str, message: str, request_id: str, headers: dict | None = None, **extra: Any
) -> JSONResponse:
    body = {"error": code, "message": message, "request_id": request_id, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


def _note(request: Request) -> dict:
    """The audit notes of this request (filled in by the handlers, written by the middleware)."""
    return request.state.audit


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "") or "unknown"


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is declared or found to pass ``limit`` bytes."""
    check_body_size(request.headers.get("content-length"), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def client_credentials(form: dict[str, list[str]], authorization: str | None) -> Credential:
    """The OAuth client's id and secret, from HTTP Basic (RFC 6749 section 2.3.1) or the form body."""
    in_form = "client_id" in form or "client_secret" in form
    if authorization:
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic" or in_form:
            raise BadRequest(400, "invalid_request", "send client credentials once: HTTP Basic or the form")
        try:
            client_id, colon, secret = (
                base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            raise BadRequest(400, "invalid_request", "malformed HTTP Basic credentials") from None
        if not colon:
            raise BadRequest(400, "invalid_request", "malformed HTTP Basic credentials")
        return Credential(unquote_plus(client_id), unquote_plus(secret))
    client_id, secret = form.get("client_id", [""])[0], form.get("client_secret", [""])[0]
    if not client_id or not secret:
        raise BadRequest(400, "invalid_request", "client_id and client_secret are required")
    return Credential(client_id, secret)


def parse_token_form(body: bytes, content_type: str | None) -> dict[str, list[str]]:
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise BadRequest(
            400, "invalid_request", "the token request must be application/x-www-form-urlencoded"
        )
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest(400, "invalid_request", "malformed form body") from None
    # RFC 6749 section 3.1: unrecognised parameters are ignored, and none may be sent more than once.
    repeated = sorted(name for name in TOKEN_PARAMETERS if len(form.get(name, ())) > 1)
    if repeated:
        raise BadRequest(400, "invalid_request", f"parameters must appear once: {repeated}")
    return form


def unparsed_request_auditor(audit: AuditLog) -> Callable[[str], None]:
    """Records a request the HTTP parser refused before the app saw it (``serve_in_thread``'s and
    ``uvicorn_config``'s ``on_rejected``): a refused row, status 400, no method or path, and ``reason``."""

    def record(reason: str) -> None:
        audit.record(
            AuditEntry(
                request_id=secrets.token_hex(8),
                time=time.time(),
                key_id=None,
                role=None,
                method="",
                path="",
                input_digest=None,
                rows=0,
                outcome=outcome_for(400, False),
                status=400,
                reason=reason[:500],
            )
        )

    return record


class RequestIds:
    """Request ids as ``secrets.token_hex(8)`` makes them (16 hex digits from the OS's CSPRNG), with the
    random bytes drawn ``block`` ids at a time: one system call per block rather than one per request."""

    def __init__(self, block: int = 256):
        self._block, self._pool, self._used = block, b"", 0
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            if self._used == len(self._pool):
                self._pool, self._used = secrets.token_bytes(8 * self._block), 0
            pool, start = self._pool, self._used
            self._used += 8
        return pool[start : start + 8].hex()


class DirectRoutes:
    """Serves the routes registered here past FastAPI's router and middleware: the handler gets the
    ``Request`` and returns a ``Response``, and an exception it raises is answered by the handler the app
    registered for it, found as Starlette's ``ExceptionMiddleware`` finds it (by status code for an HTTP
    exception, then along the exception's classes; ``Exception`` itself is left to ``AuditEveryRequest``).

    For a handler that declares no parameters but the request and returns a response, this is all that
    FastAPI's route does (its body limit is off: the handlers bound their bodies themselves), at a fraction
    of the per-request cost. The route stays registered with FastAPI too, for its schema and its other
    methods (405).

    exception_handlers: the app's ``exception_handlers`` (read when a request fails, so handlers added later
    count).
    """

    def __init__(self, exception_handlers: dict):
        self._handlers: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {}
        self._exception_handlers = exception_handlers

    def add(self, method: str, path: str, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self._handlers[method, path] = handler

    def app_for(self, scope) -> Callable | None:
        """The ASGI app serving this request directly, or None when the router must route it."""
        if scope.get("root_path"):
            return None
        handler = self._handlers.get((scope["method"], scope["path"]))
        return None if handler is None else functools.partial(self._serve, handler)

    async def _serve(self, handler, scope, receive, send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except Exception as error:
            answer = self.exception_handler_for(error)
            if answer is None:
                raise
            if inspect.iscoroutinefunction(answer):
                response = await answer(request, error)
            else:
                response = await run_in_threadpool(answer, request, error)
            error.__traceback__ = None  # as Starlette does: a reused exception keeps no stale frames
        if response is not None:
            await response(scope, receive, send)

    def exception_handler_for(self, error: Exception) -> Callable | None:
        handlers = self._exception_handlers
        if isinstance(error, StarletteHTTPException) and error.status_code != 500:
            handler = handlers.get(error.status_code)
            if handler is not None:
                return handler
        for kind in type(error).__mro__:
            if kind is not Exception and kind in handlers:
                return handlers[kind]
        return None


class AuditEveryRequest:
    """ASGI middleware that gives every HTTP request an id and one audit row, committed before its answer.

    The handlers fill in the request's audit notes (``request.state.audit``); the row is written when the
    answer's status is known, and the answer (with ``SECURITY_HEADERS`` and ``X-Request-ID``) is sent only
    once ``record`` has committed it. A handler's unexpected exception is answered 500 with a generic
    message and the request id, and recorded as such.

    record: commits one ``AuditEntry`` (awaitable; the server groups concurrent rows into one commit).
    monitor: observes each audited request (``ServerMetrics.after_request``).
    direct_routes: handlers by (method, path) served by ``DirectRoutes`` instead of the wrapped app (None:
    every request goes to the app).
    """

    def __init__(
        self,
        app,
        record: Callable[[AuditEntry], Awaitable[None]],
        monitor: ServerMetrics,
        direct_routes: DirectRoutes | None = None,
    ):
        self.app, self.record, self.monitor = app, record, monitor
        self.direct_routes = direct_routes
        self.request_ids = RequestIds()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self.request_ids.next()
        note = {"key_id": None, "role": None, "digest": None, "rows": 0, "served": False}
        state = scope.setdefault("state", {})
        state["request_id"], state["audit"] = request_id, note
        started, clock = time.time(), time.perf_counter()
        answered = False

        async def audited_send(message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                entry = self._entry(scope, request_id, started, note, message["status"])
                await self.record(entry)
                self.monitor.after_request(entry, time.perf_counter() - clock)
                headers = MutableHeaders(scope=message)
                headers.update(SECURITY_HEADERS)
                headers["X-Request-ID"] = request_id
            await send(message)

        direct = self.direct_routes
        served_by = (direct.app_for(scope) if direct is not None else None) or self.app
        try:
            await served_by(scope, receive, audited_send)
        except Exception:
            if answered:
                raise
            log.exception("request %s (%s %s) failed", request_id, scope["method"], URL(scope=scope).path)
            note["reason"] = "internal error"
            failure = error_response(500, "internal_error", "internal server error", request_id)
            await failure(scope, receive, audited_send)

    @staticmethod
    def _entry(scope, request_id: str, started: float, note: dict, status: int) -> AuditEntry:
        return AuditEntry(
            request_id=request_id,
            time=started,
            key_id=note["key_id"],
            role=note["role"],
            method=scope["method"],
            path=URL(scope=scope).path[:200],
            input_digest=note["digest"],
            rows=note["rows"],
            outcome=outcome_for(status, note["served"]),
            status=status,
            reason=str(note.get("reason", ""))[:500],
        )


def check_insecure_options(open_routes, open_role: str) -> tuple[tuple[str, ...], Role]:
    """Validates the insecure options, naming the bad value and what is accepted."""
    routes = tuple(open_routes or ())
    unknown = [route for route in routes if route not in OPENABLE_ROUTES]
    if unknown:
        raise ValueError(
            f"serve.insecure_open_routes may only name {', '.join(OPENABLE_ROUTES)}; got {unknown!r}"
        )
    role = role_named(open_role)
    if not role.outputs:
        raise ValueError(
            f"serve.insecure_open_role must be a role that is served predictions, got {open_role!r}"
        )
    return routes, role


def widened(role: Role) -> Role:
    """``role`` allowed every output, its own default first (``insecure_probabilities_to_every_role``)."""
    if not role.outputs:
        return role
    rest = tuple(output for output in ROLES["probabilities"].outputs if output not in role.outputs)
    return role._replace(outputs=(*role.outputs, *rest))


def create_app(
    core: ServingCore,
    authenticator: Authenticator,
    audit: AuditLog,
    schema: InputSchema,
    *,
    rate: float | None = None,
    burst: int | None = None,
    insecure_open_routes=(),
    insecure_open_role: str = "probabilities",
    insecure_probabilities_to_every_role: bool = False,
    body_parser: BodyParser | None = None,
    model_name: str = "heistlab",
    puzzles: PuzzleBook | None = None,
    max_key_series: int = DEFAULT_MAX_KEY_SERIES,
    request_log: str | None = "heistlab.serving.requests",
    build: BuildInfo | None = None,
    direct_predict: bool = True,
) -> FastAPI:
    """The server for ``core``: every request authenticated, checked, throttled and audited.

    rate, burst: the token bucket ``core`` enforces, published in ``/v1/info``.
    insecure_open_routes, insecure_open_role, insecure_probabilities_to_every_role: a deliberately weak
    deployment for testing audits (see the module docstring); off by default.
    body_parser: parses prediction bodies off the event loop (default: one shared by the process's apps).
    model_name: the model's name on the ``/v2`` (Open Inference Protocol) routes.
    puzzles: when set, every prediction must carry a solved proof-of-work puzzle (428 with one otherwise).
    max_key_series, request_log, build: ``GET /metrics``'s per-key cap, the logger that gets one JSON line
    per request (None: none) and the build info (``heistlab.serving.metrics``).
    direct_predict: serve ``POST /v1/predict`` through ``DirectRoutes`` (the same handler, exception handlers
    and answers, past FastAPI's router); False: through the router, as every other route.
    """
    body_parser = body_parser or shared_body_parser()
    predictions = Coalescer(core.serve_in_turn)  # concurrent predictions served in batches, in arrival order
    open_routes, open_role = check_insecure_options(insecure_open_routes, insecure_open_role)
    if open_routes:
        log.warning(
            "INSECURE: %s served without credentials (as %r, role %s)",
            ", ".join(open_routes),
            ANONYMOUS,
            open_role.name,
        )
    if insecure_probabilities_to_every_role:
        log.warning("INSECURE: every role may ask for probabilities")
    app = FastAPI(
        title="heistlab prediction API",
        version="1",
        description=__doc__,
        docs_url=None,
        redoc_url=None,
        **WITHOUT_NATIVE_TELEMETRY,
    )
    bearer_scheme = HTTPBearer(auto_error=False, description="A token from POST /oauth/token")
    key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="'<key id>.<secret>'")
    monitor = ServerMetrics(
        audit,
        route_matcher(app_routes(app)),
        lambda: authenticator.store.records().keys(),
        core.quota,
        core.statistics,
        build or BuildInfo({}),
        max_key_series=max_key_series,
        max_batch=schema.max_batch,
        request_log=logging.getLogger(request_log) if request_log else None,
    )

    direct_routes = DirectRoutes(app.exception_handlers)
    app.add_middleware(
        AuditEveryRequest,
        record=Coalescer(audit.record_in_turn).submit,
        monitor=monitor,
        direct_routes=direct_routes,
    )

    def refused(request: Request, status: int, code: str, message: str, **kwargs) -> JSONResponse:
        _note(request)["reason"] = message
        return error_response(status, code, message, _request_id(request), **kwargs)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest):
        return refused(request, error.status, error.code, error.message)

    @app.exception_handler(Unauthenticated)
    async def unauthenticated(request: Request, error: Unauthenticated):
        headers = {"WWW-Authenticate": 'Bearer realm="heistlab"'}
        return refused(request, 401, "unauthenticated", str(error), headers=headers)

    @app.exception_handler(Throttled)
    async def too_many_failures(request: Request, error: Throttled):
        await asyncio.sleep(error.hold_s)  # no thread held: a client retrying at once is slowed, not served
        return refused(
            request,
            429,
            "too_many_failures",
            str(error),
            headers={"Retry-After": retry_after_header(error.retry_after)},
            retry_after=error.retry_after,
        )

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, error: Forbidden):
        return refused(request, 403, "forbidden", str(error))

    @app.exception_handler(QueryRefused)
    async def throttled(request: Request, error: QueryRefused):
        never = error.retry_after == float("inf")
        return refused(
            request,
            429,
            "refused" if never else "rate_limited",
            error.reason,
            headers={"Retry-After": retry_after_header(error.retry_after)},
            remaining=error.remaining,
            retry_after=None if never else error.retry_after,
        )

    @app.exception_handler(PuzzleRequired)
    async def puzzle_required(request: Request, error: PuzzleRequired):
        return refused(request, 428, "proof_of_work_required", error.reason, puzzle=error.puzzle)

    @app.exception_handler(InvalidQuery)
    async def invalid_query(request: Request, error: InvalidQuery):
        return refused(request, 422, "invalid_input", str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, error: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem.get('loc', ()))}: {problem.get('msg', 'invalid')}"
            for problem in error.errors()[:5]
        )
        return refused(request, 422, "invalid_request", problems or "invalid request parameters")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        message = error.detail if isinstance(error.detail, str) else "request refused"
        return refused(request, error.status_code, code, message, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.error("request %s failed", _request_id(request), exc_info=error)
        return refused(request, 500, "internal_error", "internal server error")

    async def authenticated(request: Request) -> Principal:
        authorization, api_key = request.headers.get("authorization"), request.headers.get("x-api-key")
        source = request.client.host if request.client else None
        if not authorization and not api_key and request.url.path in open_routes:
            principal = Principal(ANONYMOUS, open_role)
        elif authorization or not api_key:  # a bearer token is one HMAC: checked right here
            principal = authenticator.authenticate_headers(authorization, api_key)
        else:  # a key made before keys were SHA-256 may cost one scrypt (then remembered): off the loop
            principal = await run_in_threadpool(authenticator.authenticate_headers, None, api_key, source)
        if insecure_probabilities_to_every_role:
            principal = principal._replace(role=widened(principal.role))
        note = _note(request)
        note["key_id"], note["role"] = principal.key_id, principal.role.name
        return principal

    async def administrator(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if not principal.role.admin:
            raise Forbidden(f"role {principal.role.name!r} may not administer; an admin key is needed")
        return principal

    async def scraper(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if not principal.role.scrapes_metrics:
            raise Forbidden(
                f"role {principal.role.name!r} may not scrape metrics; a metrics or admin key is needed"
            )
        return principal

    # Documents both credentials in the schema. The prediction routes, the hot path, authenticate in their
    # handler and state the same requirement through SECURITY_REQUIREMENTS, without these dependencies.
    documented_security = [Depends(bearer_scheme), Depends(key_scheme)]

    @app.get("/healthz", summary="Liveness (no credentials, no model)")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post(
        "/oauth/token",
        summary="OAuth 2.0 client-credentials grant (RFC 6749 section 4.4)",
        description=(
            "The form carries grant_type, client_id and client_secret. A client may instead send its id and "
            "secret with HTTP Basic (RFC 6749 section 2.3.1) and only grant_type in the form; sending both, "
            "or neither, is refused with 400."
        ),
        response_model=TokenAnswer,
        responses=TOKEN_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "required": ["grant_type", "client_id", "client_secret"],
                            "properties": {
                                "grant_type": {"type": "string", "enum": ["client_credentials"]},
                                "client_id": {"type": "string", "minLength": 1, "description": "the key id"},
                                "client_secret": {
                                    "type": "string",
                                    "minLength": 1,
                                    "description": "the key's secret",
                                },
                            },
                        }
                    }
                },
            }
        },
    )
    async def token(request: Request):
        body = await read_limited_body(request, MAX_TOKEN_BODY_BYTES)
        form = parse_token_form(body, request.headers.get("content-type"))
        grant = form.get("grant_type", [""])[0]
        if grant != "client_credentials":
            raise BadRequest(
                400, "unsupported_grant_type", f"grant_type must be client_credentials, got {grant!r}"
            )
        credential = client_credentials(form, request.headers.get("authorization"))
        try:
            source = request.client.host if request.client else None
            principal = await run_in_threadpool(authenticator.authenticate_secret, credential, source)
        except Unauthenticated as error:
            return refused(
                request,
                401,
                "invalid_client",
                str(error),
                headers={"WWW-Authenticate": 'Basic realm="heistlab"'},
                error_description=str(error),
            )
        note = _note(request)
        note["key_id"], note["role"] = principal.key_id, principal.role.name
        issued = authenticator.issue_token(principal)
        note["reason"] = f"token {issued.token_id}"
        answer = {
            "access_token": issued.access_token,
            "token_type": "Bearer",
            "expires_in": int(issued.expires_in),
        }
        return JSONResponse(answer, headers={"Pragma": "no-cache"})

    @app.get(
        "/v1/info",
        summary="What this key may ask and receive",
        response_model=ServiceInfo,
        responses=ERRORS,
        dependencies=documented_security,
    )
    async def info(principal: Annotated[Principal, Depends(authenticated)]) -> dict:
        return {
            "key_id": principal.key_id,
            "role": principal.role.name,
            "outputs": list(principal.role.outputs),
            "output": principal.role.outputs[0] if principal.role.outputs else None,
            "input_shape": list(schema.input_shape),
            "input_range": list(schema.input_range),
            "num_classes": core.api.num_classes,
            "top_k": core.top_k,
            "max_batch": schema.max_batch,
            "max_body_bytes": schema.max_body_bytes,
            "remaining": core.remaining(principal.key_id),
            "quota": core.quota,
            "rate": rate,
            "burst": burst,
        }

    @app.post(
        "/v1/predict",
        summary="Predictions for a batch of inputs, as the key's role allows",
        response_model=PredictAnswer,
        responses={**ERRORS, 428: {"model": ErrorBody}},
        openapi_extra={
            "security": SECURITY_REQUIREMENTS,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": predict_body_schema(schema)}},
            },
        },
    )
    async def predict(request: Request):
        principal = await authenticated(request)
        allowed_output(principal.role, None)
        note = _note(request)
        body = await read_limited_body(request, schema.max_body_bytes)
        if len(body) <= INLINE_BODY_BYTES:
            note["digest"] = body_digest(body)
            parsed = parse_predict_body(body, request.headers.get("content-type"), schema)
        else:
            note["digest"] = await run_in_threadpool(body_digest, body)
            parsed = await body_parser.parse(body, request.headers.get("content-type"), schema)
        output = allowed_output(principal.role, parsed.output)
        note["digest"], note["rows"] = inputs_digest(parsed.inputs), len(parsed.inputs)
        if puzzles is not None:
            digest = request_digest(note["digest"], output)
            puzzles.admit(principal.key_id, digest, len(parsed.inputs), request.headers)
        served = await predictions.submit(Call(principal.key_id, parsed.inputs, output))
        note["served"] = True
        answer = {
            "outputs": served.answers.tolist(),
            "output": served.output,
            "remaining": served.remaining,
            "request_id": _request_id(request),
        }
        return JSONResponse(answer)

    if direct_predict:
        direct_routes.add("POST", "/v1/predict", predict)

    def served_model(name: str) -> None:
        if name != model_name:
            raise StarletteHTTPException(404, f"no model {name!r}; this server serves {model_name!r}")

    @app.get("/v2/health/live", summary="Open Inference Protocol liveness (no credentials)")
    async def oip_live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Open Inference Protocol readiness (no credentials)")
    async def oip_ready() -> dict:
        return {"ready": True}

    v2_errors = {**ERRORS, 404: {"model": ErrorBody, "description": "No model with this name"}}

    @app.get(
        "/v2/models/{name}",
        summary="Open Inference Protocol model metadata, with the outputs this key may ask for",
        responses=v2_errors,
        dependencies=documented_security,
    )
    async def oip_metadata(name: str, principal: Annotated[Principal, Depends(authenticated)]) -> dict:
        served_model(name)
        outputs = principal.role.outputs
        return oip.model_metadata(model_name, schema.input_shape, core.api.num_classes, outputs)

    @app.post(
        "/v2/models/{name}/infer",
        summary="Open Inference Protocol inference: the /v1/predict path behind KServe V2 tensors",
        responses=v2_errors,
        openapi_extra={
            "security": SECURITY_REQUIREMENTS,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": oip.infer_body_schema(schema)}},
            },
        },
    )
    async def oip_infer(name: str, request: Request):
        principal = await authenticated(request)
        served_model(name)
        allowed_output(principal.role, None)
        note = _note(request)
        body = await read_limited_body(request, schema.max_body_bytes)
        note["digest"] = await run_in_threadpool(body_digest, body)
        inputs, requested = await run_in_threadpool(
            oip.parse_infer_body, body, request.headers.get("content-type"), schema
        )
        output = allowed_output(principal.role, requested)
        note["digest"], note["rows"] = inputs_digest(inputs), len(inputs)
        served = await predictions.submit(Call(principal.key_id, inputs, output))
        note["served"] = True
        return JSONResponse(oip.infer_answer(model_name, served.output, served.answers))

    @app.get(
        "/metrics",
        summary="Prometheus metrics (roles metrics and admin)",
        description="The text exposition format; repeat name[]=FAMILY to ask for some families only.",
        response_class=Response,
        include_in_schema=False,  # the operator's endpoint, not part of the prediction API
    )
    async def metrics(request: Request, principal: Annotated[Principal, Depends(scraper)]):
        unknown = sorted({name for name in request.query_params if name != "name[]"})
        if unknown:
            raise BadRequest(
                400, "invalid_request", f"/metrics accepts only name[] parameters, got {unknown}"
            )
        names = request.query_params.getlist("name[]")
        if any(not name or len(name) > 200 for name in names):
            raise BadRequest(400, "invalid_request", "name[] must be a metric family name (1-200 characters)")
        body = await run_in_threadpool(monitor.exposition, names)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/admin/audit", summary="The latest audit rows (admin)", responses=ERRORS)
    def audit_rows(
        principal: Annotated[Principal, Depends(administrator)],
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        key_id: Annotated[str | None, Query(max_length=64)] = None,
    ) -> dict:
        return {"requests": audit.requests(limit, key_id)}

    @app.get(
        "/admin/alarms", summary="Alarms raised by the defenses' online reports (admin)", responses=ERRORS
    )
    def alarms(
        principal: Annotated[Principal, Depends(administrator)],
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict:
        return {"alarms": audit.alarms(limit)}

    @app.post(
        "/admin/keys/{key_id}/revoke",
        summary="Revoke a key and its tokens (admin)",
        responses={**ERRORS, 404: {"model": ErrorBody, "description": "No key with this id"}},
    )
    def revoke(key_id: str, principal: Annotated[Principal, Depends(administrator)]) -> dict:
        if authenticator.store.lookup(key_id) is None:
            raise StarletteHTTPException(404, f"no key {key_id!r}")
        record = authenticator.store.revoke(key_id)
        log.warning("key %s revoked by admin key %s", key_id, principal.key_id)
        return {"key_id": key_id, "revoked": record.revoked}

    return app


def app_from_config(
    cfg, token_signing_secret: bytes | None = None, worker: int | None = None
) -> tuple[FastAPI, ServerSettings]:
    """The server a composed ``configs/serve.yaml`` describes: the victim from the victim cache (its
    manifest's binding and digest verified, and its signature under ``protection.verify_key_file``), the
    defense chain, keys, audit log (encrypted at rest and chained when ``cfg.serve`` names those keys;
    verified before serving, see ``workers.open_audit_log``) and limits under ``cfg.serve``.

    token_signing_secret: the bearer-token secret (None: from the config, else random).
    worker: the index of this process among several (``workers.serve_workers``; None: the only one): the
    quota, rate limit and (for a chain with state) the defense state are the shared ones, and the audit log
    was verified by the parent."""
    from hydra.utils import instantiate

    from heistlab.compose import (
        at_rest_from,
        build_defense,
        build_splits,
        cache_directory,
        defender_data,
        load_victim,
    )
    from heistlab.results import versions
    from heistlab.serving.auth import KeyStore, token_secret
    from heistlab.serving.metrics import build_info, victim_digest
    from heistlab.serving.service import build_core
    from heistlab.serving.shared import SharedAdmission
    from heistlab.serving.shared_defense import store_for
    from heistlab.serving.validation import input_schema
    from heistlab.serving.workers import open_audit_log

    spec = cfg.serve
    store = KeyStore(Path(str(spec.key_store)).expanduser())
    throttle = FailedAuthThrottle(spec.failed_auth_burst, spec.failed_auth_rate, spec.failed_auth_hold_s)
    secret = token_signing_secret or token_secret(spec.token_secret_file)
    authenticator = Authenticator(store, secret, spec.token_ttl_s, throttle=throttle)
    # A broken log stops the server before the victim loads; a worker's parent checked it.
    audit = open_audit_log(spec, check=worker is None)
    splits = build_splits(cfg)
    defense = build_defense(cfg.defense, defender_data(cfg, splits))
    signed = at_rest_from(cfg).signing.public is not None
    victim, from_cache = load_victim(cfg, splits, defense)
    checks = "signature, binding and digest verified" if signed else "binding and digest verified"
    log.info("victim %s (%s)", cfg.victim.family, f"from the cache, {checks}" if from_cache else "trained")
    if not signed:
        log.warning(
            "UNSIGNED CHECKPOINT: the served victim is checked against an unsigned digest that anyone who "
            "can write %s can recompute; set protection.verify_key_file (python -m experiments.protect)",
            cache_directory(cfg),
        )
    several = worker is not None
    shared = SharedAdmission(audit.path, spec.quota, spec.rate, spec.burst) if several else None
    defense_store = store_for(audit.path, defense) if several else None
    schema = input_schema(splits.input_shape, (0.0, 1.0), spec.max_batch, spec.max_body_bytes)
    core = build_core(
        victim,
        defense,
        audit=audit,
        seed=cfg.seed,
        top_k=spec.top_k,
        quota=spec.quota,
        rate=spec.rate,
        burst=spec.burst,
        extra_admission=[instantiate(member) for member in spec.extra_admission],
        max_batch=spec.max_batch,
        monitor_every=spec.monitor_every,
        shared=shared,
        defense_store=defense_store,
        key_stream=worker if several and defense_store is None else None,
    )
    burst = spec.burst if spec.burst is not None or spec.rate is None else max(1, math.ceil(spec.rate))
    puzzles = puzzle_book_for(core, several)
    body_parser = BodyParser()
    body_parser.warm()
    app = create_app(
        core,
        authenticator,
        audit,
        schema,
        rate=spec.rate,
        burst=burst,
        insecure_open_routes=list(spec.get("insecure_open_routes") or ()),
        insecure_open_role=spec.get("insecure_open_role", "probabilities"),
        insecure_probabilities_to_every_role=bool(spec.get("insecure_probabilities_to_every_role", False)),
        body_parser=body_parser,
        model_name=str(spec.get("model_name") or "heistlab"),
        puzzles=puzzles,
        max_key_series=spec.metrics.max_key_series,
        request_log=spec.metrics.request_log,
        build=build_info(versions(), victim_digest(victim)),
    )
    settings = ServerSettings(
        spec.host,
        spec.port,
        Path(str(spec.certfile)).expanduser(),
        Path(str(spec.keyfile)).expanduser(),
        spec.log_level,
        spec.access_log,
        unparsed_request_auditor(audit),
    )
    return app, settings


def puzzle_book_for(core: ServingCore, several_workers: bool) -> PuzzleBook | None:
    """Hashcash puzzles at the difficulty the chain's proof-of-work sets per key (None: the chain has none).

    Puzzles are kept in this process's memory, so a proof-of-work server runs one worker."""
    from heistlab.defenses.proof_of_work import next_bits

    if next_bits(core.api.defense_state()[0], "") is None:
        return None
    if several_workers:
        raise ValueError(
            "defense=proof_of_work keeps its open puzzles in one process; accepted: serve.workers=1"
        )
    return PuzzleBook(lambda key_id: next_bits(core.api.defense_state()[0], key_id))
