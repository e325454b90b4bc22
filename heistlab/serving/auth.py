"""API keys, OAuth 2.0 client-credentials tokens and roles for the prediction server.

Keys live in a key store the operator names (a JSON file, mode 0600), never in configs or code. The store
keeps a hash of each key's secret, never the secret, and hashes are compared in constant time
(``hmac.compare_digest``).

A key's secret is 256 random bits (``secrets.token_urlsafe(32)``), not a password, so it is stored as
SHA-256 over a per-key salt and the secret (kdf ``sha256``): one hash costs about a microsecond, so a wrong
secret costs the server nothing worth flooding, while inverting it (or guessing the secret online at any
rate) means searching 2**256 secrets; a leaked store leaks no key. A slow KDF buys nothing for such a
secret: its cost factor (2**14 for scrypt) matters only when the search space is small, as for a
human-chosen password. HMAC-SHA256 under a server-side pepper was the other choice: it would add a second
secret that the server and ``experiments.keys`` must share (and that a leak of the store would not include),
but for 256-bit secrets it adds nothing to the 2**256 search, so plain salted SHA-256 it is. Stores made
before this, or elsewhere, keep slow records (salted scrypt, RFC 7914, or PBKDF2-HMAC-SHA256, RFC 8018,
which may hold human-chosen secrets); they are still accepted and verified at their cost, their failures
throttled harder (``Authenticator``). Re-create such keys (``experiments.keys create``, then revoke the old
ones) to move them to the fast check.

A client proves who it is in one of two ways:

- ``X-API-Key: <key id>.<secret>`` on every request;
- the client-credentials grant of OAuth 2.0 (RFC 6749 section 4.4): ``POST /oauth/token`` with
  ``grant_type=client_credentials``, ``client_id=<key id>`` and ``client_secret=<secret>`` returns a
  short-lived bearer token, sent as ``Authorization: Bearer <token>``. A token is
  ``hl1.<claims>.<signature>``: base64url JSON claims (``sub`` the key id, ``jti`` a token id, ``iat``,
  ``exp``) and their HMAC-SHA256 under the server's signing secret, in its one canonical unpadded base64url
  spelling (any other spelling of the same bytes is refused). Revoking a key refuses every token
  issued for it; tokens expire after their TTL.

A key's role decides what it receives and what it may do (see ``ROLES``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from heistlab.serving.failed_auth import FailedAuthThrottle

STORE_FORMAT = "heistlab-keys/1"
TOKEN_PREFIX = "hl1"
TOKEN_SECRET_ENV = "HEISTLAB_TOKEN_SECRET"
MIN_TOKEN_SECRET_BYTES = 32
MAX_TOKEN_TTL_S = 86_400.0
# Random 256-bit secrets: salted SHA-256 (see the module docstring); what new keys get.
SHA256 = {"name": "sha256", "dklen": 32}
# scrypt's "interactive" cost (N=2**14, r=8, p=1: 16 MiB, 0.09 s here), for secrets a human may have chosen.
SCRYPT = {"name": "scrypt", "n": 2**14, "r": 8, "p": 1, "dklen": 32}
KDF_NAMES = ("sha256", "scrypt", "pbkdf2_sha256")
SLOW_KDFS = ("scrypt", "pbkdf2_sha256")


class Role(NamedTuple):
    """What a key may receive (``outputs``, the first being its default) and whether it administers.

    A client can never receive more than its role's outputs: asking for more is refused with 403.
    """

    name: str
    outputs: tuple[str, ...]
    admin: bool = False


ROLES: dict[str, Role] = {
    "labels": Role("labels", ("labels",)),
    "top_k": Role("top_k", ("top_k", "labels")),
    "probabilities": Role("probabilities", ("probabilities", "top_k", "labels")),
    # Least privilege: the operator's key reads the audit log and alarms and revokes keys, but is served no
    # predictions (a client key does that).
    "admin": Role("admin", (), admin=True),
}


class Unauthenticated(Exception):
    """No valid credentials: missing, malformed, unknown, wrong, revoked or expired (HTTP 401)."""


class Forbidden(Exception):
    """Valid credentials whose role does not allow what was asked (HTTP 403)."""


class Credential(NamedTuple):
    """What a client holds: its key id (the OAuth ``client_id``) and secret (``client_secret``)."""

    key_id: str
    key: str

    @property
    def api_key(self) -> str:
        """The ``X-API-Key`` header value."""
        return f"{self.key_id}.{self.key}"


class KeyRecord(NamedTuple):
    """One key as the store keeps it: never the secret, only its salted hash."""

    key_id: str
    role: str
    salt: bytes
    digest: bytes
    kdf: dict
    created: float
    revoked: float | None = None

    @property
    def slow(self) -> bool:
        """Hashed with a slow KDF: possibly a human-chosen secret (see the module docstring)."""
        return self.kdf["name"] in SLOW_KDFS


class Principal(NamedTuple):
    """An authenticated client: its key id and role, and the token it came with (if any)."""

    key_id: str
    role: Role
    token_id: str | None = None


class IssuedToken(NamedTuple):
    access_token: str
    token_id: str
    expires_in: float


def role_named(name: str) -> Role:
    if name not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}; got {name!r}")
    return ROLES[name]


def allowed_output(role: Role, requested: str | None) -> str:
    """What ``role`` is served for a request asking ``requested`` (None: the role's default), or 403."""
    if not role.outputs:
        raise Forbidden(f"role {role.name!r} is served no predictions; use a client key")
    if requested is None:
        return role.outputs[0]
    if requested not in role.outputs:
        raise Forbidden(
            f"role {role.name!r} may receive {', '.join(role.outputs)}; it may not ask for {requested!r}"
        )
    return requested


def check_kdf(kdf: Mapping) -> dict:
    """Validates key-derivation parameters (from a store file, so bounded: no cost that stalls the server)."""
    name = kdf.get("name")
    if name == "scrypt":
        n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
        if not (isinstance(n, int) and 2**10 <= n <= 2**20 and n & (n - 1) == 0):
            raise ValueError(f"scrypt n must be a power of two in [2**10, 2**20], got {n!r}")
        if not (isinstance(r, int) and 1 <= r <= 32 and isinstance(p, int) and 1 <= p <= 16):
            raise ValueError(f"scrypt r must be in [1, 32] and p in [1, 16], got r={r!r}, p={p!r}")
    elif name == "sha256":
        if kdf.get("dklen", 32) != 32:
            raise ValueError(f"sha256 dklen must be 32, got {kdf.get('dklen')!r}")
    elif name == "pbkdf2_sha256":
        iterations = kdf.get("iterations")
        if not (isinstance(iterations, int) and 100_000 <= iterations <= 10_000_000):
            raise ValueError(f"pbkdf2_sha256 iterations must be in [100000, 10000000], got {iterations!r}")
    else:
        raise ValueError(f"kdf name must be one of {', '.join(KDF_NAMES)}; got {name!r}")
    dklen = kdf.get("dklen", 32)
    if not (isinstance(dklen, int) and 16 <= dklen <= 64):
        raise ValueError(f"kdf dklen must be in [16, 64], got {dklen!r}")
    return dict(kdf)


def derive(secret: str, salt: bytes, kdf: Mapping) -> bytes:
    """The salted hash of ``secret`` under ``kdf``: SHA-256 of salt and secret (random secrets), or scrypt
    (RFC 7914) or PBKDF2-HMAC-SHA256 (RFC 8018) for records that may hold a human-chosen secret."""
    raw = secret.encode()
    if kdf["name"] == "sha256":
        return hashlib.sha256(salt + raw).digest()
    if kdf["name"] == "scrypt":
        n, r, p = kdf["n"], kdf["r"], kdf["p"]
        memory = 128 * r * (n + p + 2)
        return hashlib.scrypt(raw, salt=salt, n=n, r=r, p=p, maxmem=memory + 2**20, dklen=kdf["dklen"])
    return hashlib.pbkdf2_hmac("sha256", raw, salt, kdf["iterations"], kdf.get("dklen", 32))


def new_key(role: str, kdf: Mapping = SHA256, now: float | None = None) -> tuple[Credential, KeyRecord]:
    """A fresh key: the credential to hand the client once, and the record the store keeps."""
    role_named(role)
    kdf = check_kdf(kdf)
    credential = Credential(secrets.token_hex(8), secrets.token_urlsafe(32))
    salt = secrets.token_bytes(16)
    created = time.time() if now is None else now
    record = KeyRecord(credential.key_id, role, salt, derive(credential.key, salt, kdf), kdf, created)
    return credential, record


def secret_matches(secret: str, record: KeyRecord) -> bool:
    return hmac.compare_digest(derive(secret, record.salt, record.kdf), record.digest)


def split_api_key(presented: str) -> Credential:
    """``<key id>.<secret>`` into its parts, or ``Unauthenticated``."""
    key_id, dot, secret = presented.strip().partition(".")
    if not dot or not key_id or not secret:
        raise Unauthenticated("malformed API key: expected '<key id>.<secret>'")
    return Credential(key_id, secret)


# -- the key store file ------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def record_to_json(record: KeyRecord) -> dict:
    return {
        "role": record.role,
        "salt": _b64(record.salt),
        "hash": _b64(record.digest),
        "kdf": record.kdf,
        "created": record.created,
        "revoked": record.revoked,
    }


def record_from_json(key_id: str, entry: Mapping) -> KeyRecord:
    role_named(entry["role"])
    return KeyRecord(
        key_id,
        entry["role"],
        _unb64(entry["salt"]),
        _unb64(entry["hash"]),
        check_kdf(entry["kdf"]),
        float(entry["created"]),
        None if entry.get("revoked") is None else float(entry["revoked"]),
    )


def read_store(path: Path) -> dict[str, KeyRecord]:
    """The records of the key store at ``path``; ``ValueError`` naming the file when it is not one."""
    try:
        document = json.loads(Path(path).read_text())
        if document.get("format") != STORE_FORMAT:
            raise ValueError(f"format must be {STORE_FORMAT!r}, got {document.get('format')!r}")
        return {key_id: record_from_json(key_id, entry) for key_id, entry in document["keys"].items()}
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a heistlab key store: {error}") from None


def write_store(path: Path, records: Mapping[str, KeyRecord]) -> None:
    """Writes the store atomically (temporary file, then rename), readable by its owner only."""
    path = Path(path)
    document = {"format": STORE_FORMAT, "keys": {k: record_to_json(r) for k, r in sorted(records.items())}}
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(document, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


@contextlib.contextmanager
def locked_store(path: Path) -> Iterator[None]:
    """Holds an exclusive lock beside the store, so the CLI and a server never lose each other's changes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(f"{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def create_key(path: Path, role: str, kdf: Mapping = SHA256) -> Credential:
    """Adds a new key with ``role`` to the store at ``path`` (created if absent); returns its credential."""
    credential, record = new_key(role, kdf)
    with locked_store(path):
        records = read_store(path) if Path(path).exists() else {}
        records[record.key_id] = record
        write_store(path, records)
    return credential


def revoke_key(path: Path, key_id: str, now: float | None = None) -> KeyRecord:
    """Marks ``key_id`` revoked in the store at ``path``; ``KeyError`` when the store has no such key."""
    with locked_store(path):
        records = read_store(path)
        if key_id not in records:
            raise KeyError(f"no key {key_id!r} in {path}")
        record = records[key_id]
        if record.revoked is None:
            record = record._replace(revoked=time.time() if now is None else now)
            records[key_id] = record
            write_store(path, records)
    return record


class KeyStore:
    """The server's view of a key store file, re-read whenever the file changes (so CLI revocations apply)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(
                f"key store {self.path} does not exist; create a key with "
                f"`python -m experiments.keys create --store {self.path} --role probabilities`"
            )
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._records: dict[str, KeyRecord] = {}
        self.generation = 0
        self.refresh()

    def refresh(self) -> None:
        """Re-reads the file if it changed since the last read."""
        status = os.stat(self.path)
        signature = (status.st_mtime_ns, status.st_ino, status.st_size)
        if signature == self._signature:
            return
        with self._lock:
            if signature != self._signature:
                self._records = read_store(self.path)
                self._signature = signature
                self.generation += 1

    def lookup(self, key_id: str) -> KeyRecord | None:
        self.refresh()
        return self._records.get(key_id)

    def records(self) -> dict[str, KeyRecord]:
        self.refresh()
        return dict(self._records)

    def revoke(self, key_id: str) -> KeyRecord:
        record = revoke_key(self.path, key_id)
        self.refresh()
        return record


# -- tokens --------------------------------------------------------------------------------------------------


def sign_token(claims: Mapping, secret: bytes) -> str:
    """``hl1.<base64url JSON claims>.<base64url HMAC-SHA256 of 'hl1.<claims>'>``."""
    body = _b64(json.dumps(dict(claims), sort_keys=True, separators=(",", ":")).encode())
    signed = f"{TOKEN_PREFIX}.{body}"
    return f"{signed}.{_b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())}"


def verify_token(token: str, secret: bytes, now: float) -> dict:
    """The claims of a genuine, unexpired token; ``Unauthenticated`` naming what is wrong otherwise."""
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise Unauthenticated("malformed bearer token")
    signed = f"{parts[0]}.{parts[1]}"
    expected = _b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())
    # The one canonical spelling (unpadded base64url) is compared, not its decoding: padded, standard-alphabet
    # or junk-carrying spellings of a genuine signature are refused.
    if not hmac.compare_digest(parts[2].encode("utf-8", "replace"), expected.encode()):
        raise Unauthenticated("bearer token signature does not verify")
    try:
        claims = json.loads(_unb64(parts[1]))
        subject, expiry, token_id = claims["sub"], float(claims["exp"]), claims["jti"]
    except (ValueError, KeyError, TypeError) as error:
        raise Unauthenticated("malformed bearer token") from error
    if not isinstance(subject, str) or not isinstance(token_id, str):
        raise Unauthenticated("malformed bearer token")
    if now >= expiry:
        raise Unauthenticated("bearer token expired; request a new one at /oauth/token")
    return claims


def token_secret(secret_file: str | Path | None = None, env: Mapping[str, str] | None = None) -> bytes:
    """The token signing secret: from ``secret_file``, else ``$HEISTLAB_TOKEN_SECRET``, else random.

    A random secret lives only as long as the server: a restart invalidates every token (keys still work).
    """
    env = os.environ if env is None else env
    if secret_file is not None:
        secret = Path(secret_file).read_bytes().strip()
        source = f"token secret file {secret_file}"
    elif env.get(TOKEN_SECRET_ENV):
        secret, source = env[TOKEN_SECRET_ENV].encode(), f"${TOKEN_SECRET_ENV}"
    else:
        return secrets.token_bytes(MIN_TOKEN_SECRET_BYTES)
    if len(secret) < MIN_TOKEN_SECRET_BYTES:
        raise ValueError(
            f"{source} must hold at least {MIN_TOKEN_SECRET_BYTES} bytes, got {len(secret)}; "
            "make one with `python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
        )
    return secret


class Authenticator:
    """Checks API keys and bearer tokens against a ``KeyStore``; issues tokens.

    token_ttl_s: how long an issued token is valid. clock: wall-clock seconds (injectable for tests).
    throttle: counts failed secret checks per key id and source address (``FailedAuthThrottle``; None:
    no throttle); a failure past its allowance raises ``Throttled`` (HTTP 429) instead of ``Unauthenticated``.
    A key under a slow KDF whose key id has no failure left is refused unchecked (``Throttled``), so its
    possibly human-chosen secret cannot be guessed online past the allowance, and nobody makes the server
    run scrypt for it; its owner is refused too until the allowance refills (re-create it to avoid that).
    A slow key's secret, once verified, is remembered as an HMAC under a per-process pepper, so later
    requests skip the KDF; the memory is dropped whenever the store file changes.
    """

    def __init__(
        self,
        store: KeyStore,
        secret: bytes,
        token_ttl_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        throttle: FailedAuthThrottle | None = None,
    ):
        if not isinstance(token_ttl_s, int | float) or not 0 < token_ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(f"token_ttl_s must be a number in (0, {MAX_TOKEN_TTL_S:g}], got {token_ttl_s!r}")
        if len(secret) < MIN_TOKEN_SECRET_BYTES:
            raise ValueError(f"token secret must hold at least {MIN_TOKEN_SECRET_BYTES} bytes")
        self.store, self.token_ttl_s, self.clock = store, float(token_ttl_s), clock
        self.throttle = throttle
        self._secret = secret
        self._pepper = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}
        self._verified_generation = -1
        self._decoy = KeyRecord("", "labels", b"\0" * 16, b"\0" * 32, dict(SHA256), 0.0)

    def _active_record(self, key_id: str) -> KeyRecord:
        record = self.store.lookup(key_id)
        if record is None:
            raise Unauthenticated("unknown key")
        if record.revoked is not None:
            raise Unauthenticated(f"key {key_id} was revoked")
        return record

    def _matches(self, secret: str, record: KeyRecord) -> bool:
        if not record.slow:
            return secret_matches(secret, record)
        if self._verified_generation != self.store.generation:
            self._verified, self._verified_generation = {}, self.store.generation
        remembered = hmac.new(self._pepper, secret.encode(), hashlib.sha256).digest()
        cached = self._verified.get(record.key_id)
        if cached is not None and hmac.compare_digest(cached, remembered):
            return True
        if not secret_matches(secret, record):
            return False
        self._verified[record.key_id] = remembered
        return True

    def authenticate_secret(self, credential: Credential, source: str | None = None) -> Principal:
        """The principal of a key id and secret (API key or OAuth client credentials) sent from ``source``
        (the client's address; None: not counted by address)."""
        record = self.store.lookup(credential.key_id)
        if record is not None and record.slow and self.throttle is not None:
            wait = self.throttle.key_wait(record.key_id)
            if wait is not None:
                raise self.throttle.refusal(f"for key {record.key_id} (not checked)", wait)
        if record is None:
            secret_matches(credential.key, self._decoy)  # the same work as for a key in the store
            matched = False
        else:
            matched = self._matches(credential.key, record)
        if not matched:
            refusal = None
            if self.throttle is not None:
                refusal = self.throttle.failed(None if record is None else record.key_id, source)
            raise refusal or Unauthenticated("invalid key id or secret")
        if record.revoked is not None:
            raise Unauthenticated(f"key {record.key_id} was revoked")
        return Principal(record.key_id, ROLES[record.role])

    def authenticate_api_key(self, presented: str, source: str | None = None) -> Principal:
        return self.authenticate_secret(split_api_key(presented), source)

    def issue_token(self, principal: Principal) -> IssuedToken:
        now = self.clock()
        token_id = uuid.uuid4().hex
        claims = {"sub": principal.key_id, "jti": token_id, "iat": now, "exp": now + self.token_ttl_s}
        return IssuedToken(sign_token(claims, self._secret), token_id, self.token_ttl_s)

    def authenticate_token(self, token: str) -> Principal:
        claims = verify_token(token, self._secret, self.clock())
        record = self._active_record(claims["sub"])
        return Principal(record.key_id, ROLES[record.role], claims["jti"])

    def authenticate_headers(
        self, authorization: str | None, api_key: str | None, source: str | None = None
    ) -> Principal:
        """The principal of a request's ``Authorization: Bearer`` or ``X-API-Key`` header, sent from
        ``source``. A bearer token costs one HMAC and is not a guess at a key's secret: its failures are not
        counted by the throttle."""
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("Authorization must be 'Bearer <token>'")
            return self.authenticate_token(token)
        if api_key:
            return self.authenticate_api_key(api_key, source)
        raise Unauthenticated("no credentials: send 'Authorization: Bearer <token>' or 'X-API-Key'")
