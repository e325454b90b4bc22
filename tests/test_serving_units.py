"""The serving package's parts on their own: key store, tokens, roles, throttles, validation, audit, TLS."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import ssl
import stat
import threading

import numpy as np
import pytest

from heistlab.defenses import rounding
from heistlab.defenses.base import Request, Verdict
from heistlab.serving import auth
from heistlab.serving.audit import AuditEntry, AuditLog
from heistlab.serving.failed_auth import Allowances, FailedAuthThrottle, Throttled
from heistlab.serving.service import alarms_in, client_view
from heistlab.serving.throttle import real_clock_verdict, retry_after_header, server_admission
from heistlab.serving.tls import self_signed_pair
from heistlab.serving.validation import BadRequest, input_schema, inputs_digest, parse_predict_body

CHEAP_KDF = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1, "dklen": 32}
DIGITS = input_schema((8, 8, 1), max_batch=4)


def test_key_store_keeps_only_salted_hashes_readable_by_its_owner(tmp_path):
    store = tmp_path / "keys.json"
    first = auth.create_key(store, "labels")  # a new key: salted SHA-256 of a 256-bit random secret
    second = auth.create_key(store, "labels", kdf=CHEAP_KDF)  # as stores made before kept them
    text = store.read_text()
    assert first.key not in text and second.key not in text
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    records = auth.read_store(store)
    assert records[first.key_id].kdf == auth.SHA256 and not records[first.key_id].slow
    assert records[second.key_id].slow
    assert len(base64.urlsafe_b64decode(first.key + "=")) == 32  # 256 random bits
    salt = records[first.key_id].salt
    assert records[first.key_id].digest == hashlib.sha256(salt + first.key.encode()).digest()
    assert salt != records[second.key_id].salt
    assert auth.secret_matches(first.key, records[first.key_id])
    assert auth.secret_matches(second.key, records[second.key_id])
    assert not auth.secret_matches(second.key, records[first.key_id])


def test_revoking_marks_the_key_and_unknown_keys_are_named(tmp_path):
    store = tmp_path / "keys.json"
    credential = auth.create_key(store, "top_k", kdf=CHEAP_KDF)
    assert auth.revoke_key(store, credential.key_id, now=5.0).revoked == 5.0
    assert auth.revoke_key(store, credential.key_id, now=9.0).revoked == 5.0  # revoking twice keeps the first
    with pytest.raises(KeyError, match="no key 'nope'"):
        auth.revoke_key(store, "nope")


@pytest.mark.parametrize(
    ("kdf", "message"),
    [
        ({"name": "md5"}, "kdf name must be one of sha256, scrypt, pbkdf2_sha256"),
        ({"name": "sha256", "dklen": 16}, "sha256 dklen must be 32"),
        ({**CHEAP_KDF, "n": 1000}, "scrypt n must be a power of two"),
        ({**CHEAP_KDF, "n": 2**24}, "scrypt n must be a power of two"),
        ({"name": "pbkdf2_sha256", "iterations": 10}, "iterations must be in"),
    ],
)
def test_key_derivation_parameters_are_bounded(kdf, message):
    with pytest.raises(ValueError, match=message):
        auth.check_kdf(kdf)


def test_pbkdf2_stores_made_elsewhere_verify():
    record = auth.new_key("labels", {"name": "pbkdf2_sha256", "iterations": 100_000, "dklen": 32})
    assert auth.secret_matches(record[0].key, record[1]) and not auth.secret_matches("guess", record[1])


def test_a_store_that_is_not_one_is_named(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match=r"keys.json is not a heistlab key store"):
        auth.read_store(path)
    with pytest.raises(FileNotFoundError, match="experiments.keys create"):
        auth.KeyStore(tmp_path / "missing.json")


def test_tokens_verify_only_when_genuine_and_unexpired():
    secret = b"s" * 32
    token = auth.sign_token({"sub": "k1", "jti": "t1", "iat": 0.0, "exp": 10.0}, secret)
    assert auth.verify_token(token, secret, now=9.9)["sub"] == "k1"
    with pytest.raises(auth.Unauthenticated, match="expired"):
        auth.verify_token(token, secret, now=10.0)
    with pytest.raises(auth.Unauthenticated, match="signature"):
        auth.verify_token(token, b"t" * 32, now=0.0)
    prefix, _, signature = token.split(".")
    forged = auth._b64(json.dumps({"sub": "admin", "jti": "t1", "iat": 0.0, "exp": 1e12}).encode())
    with pytest.raises(auth.Unauthenticated, match="signature"):
        auth.verify_token(f"{prefix}.{forged}.{signature}", secret, now=0.0)
    for malformed in ("", "a.b", "hl1.!!.??", "Bearer x"):
        with pytest.raises(auth.Unauthenticated):
            auth.verify_token(malformed, secret, now=0.0)


def test_token_secret_comes_from_a_file_or_the_environment_and_must_be_long(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"f" * 40 + b"\n")
    assert auth.token_secret(path, env={}) == b"f" * 40
    assert auth.token_secret(None, env={auth.TOKEN_SECRET_ENV: "e" * 32}) == b"e" * 32
    assert len(auth.token_secret(None, env={})) == 32
    with pytest.raises(ValueError, match="at least 32 bytes, got 5"):
        auth.token_secret(None, env={auth.TOKEN_SECRET_ENV: "short"})


def test_authenticator_refuses_revoked_keys_and_their_tokens(tmp_path):
    store_path = tmp_path / "keys.json"
    credential = auth.create_key(store_path, "probabilities", kdf=CHEAP_KDF)
    now = [1000.0]
    authenticator = auth.Authenticator(auth.KeyStore(store_path), b"x" * 32, 60, clock=lambda: now[0])
    principal = authenticator.authenticate_api_key(credential.api_key)
    assert principal.role.name == "probabilities"
    token = authenticator.issue_token(principal).access_token
    assert authenticator.authenticate_headers(f"Bearer {token}", None).key_id == credential.key_id
    with pytest.raises(auth.Unauthenticated, match="invalid key id or secret"):
        authenticator.authenticate_api_key(f"{credential.key_id}.wrong")
    with pytest.raises(auth.Unauthenticated, match="invalid key id or secret"):
        authenticator.authenticate_api_key(f"unknown.{credential.key}")
    auth.revoke_key(store_path, credential.key_id)  # as the CLI does, behind the server's back
    for attempt in (lambda: authenticator.authenticate_api_key(credential.api_key),
                    lambda: authenticator.authenticate_token(token)):  # fmt: skip
        with pytest.raises(auth.Unauthenticated, match="revoked"):
            attempt()


@pytest.mark.parametrize(
    ("role", "requested", "served"),
    [
        ("labels", None, "labels"),
        ("labels", "probabilities", None),
        ("labels", "top_k", None),
        ("top_k", None, "top_k"),
        ("top_k", "labels", "labels"),
        ("top_k", "probabilities", None),
        ("probabilities", None, "probabilities"),
        ("probabilities", "labels", "labels"),
        ("admin", None, None),
    ],
)
def test_a_role_never_receives_more_than_it_allows(role, requested, served):
    if served is None:
        with pytest.raises(auth.Forbidden):
            auth.allowed_output(auth.ROLES[role], requested)
    else:
        assert auth.allowed_output(auth.ROLES[role], requested) == served


def admit_on_real_clock(admission, state, client: str, size: int, now: float):
    """What the server does: a delayed admission is a refusal, and only an admission changes the state."""
    verdict, new_state = admission.admit(state, Request(client, size, now))
    verdict = real_clock_verdict(verdict)
    return verdict, (new_state if verdict.admitted else state)


def test_server_admission_rate_limit_worked_by_hand():
    """defenses.rate_limit at 2 rows/s, burst 4, on the real clock: 4 rows at t=0, one more must wait 0.5 s
    (429, Retry-After), is admitted at t=0.5; every key has its own bucket; 5 rows never fit."""
    admission, state = server_admission(quota=None, rate=2.0, burst=4, spent={})
    verdict, state = admit_on_real_clock(admission, state, "a", 4, 0.0)
    assert verdict.admitted
    verdict, state = admit_on_real_clock(admission, state, "a", 1, 0.0)
    assert not verdict.admitted and verdict.delay == pytest.approx(0.5)
    verdict, state = admit_on_real_clock(admission, state, "a", 1, 0.5)
    assert verdict.admitted
    assert admit_on_real_clock(admission, state, "b", 4, 0.5)[0].admitted
    verdict, _ = admit_on_real_clock(admission, state, "a", 5, 100.0)
    assert not verdict.admitted and verdict.delay == math.inf


def test_server_admission_quota_starts_from_what_was_spent():
    admission, state = server_admission(quota=10, rate=None, burst=None, spent={"a": 9})
    verdict, state = admit_on_real_clock(admission, state, "a", 2, 0.0)
    assert not verdict.admitted and verdict.delay == math.inf and "9 used, 2 asked" in verdict.reason
    verdict, state = admit_on_real_clock(admission, state, "a", 1, 0.0)
    assert verdict.admitted and not admit_on_real_clock(admission, state, "a", 1, 0.0)[0].admitted
    assert admit_on_real_clock(admission, state, "b", 10, 0.0)[0].admitted
    assert server_admission(None, None, None, {}) == (None, None)
    with pytest.raises(ValueError, match="must have an admit part"):
        server_admission(None, None, None, {}, extra=[rounding(2)])


def test_real_clock_verdicts_and_retry_after():
    delayed = real_clock_verdict(Verdict(admitted=True, delay=2.5))
    assert not delayed.admitted and delayed.delay == 2.5
    assert real_clock_verdict(Verdict(admitted=True)).admitted
    assert [retry_after_header(d) for d in (0.01, 2.5, math.inf)] == ["1", "3", "86400"]


def body(inputs, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


ROW = np.full((8, 8, 1), 0.5).tolist()


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "message"),
    [
        (b"x" * 5_000_000, "application/json", 413, "exceeds the limit"),
        (body([ROW]), "text/plain", 415, "application/json"),
        (b"{", "application/json", 400, "not valid JSON"),
        (b"\xff\xfe", "application/json", 400, "not UTF-8"),
        (b"[" * 100_000, "application/json", 400, "JSON"),
        (b"[]", "application/json", 422, "JSON object"),
        (json.dumps({"x": 1}).encode(), "application/json", 422, "unknown fields"),
        (body([ROW], output="logits"), "application/json", 422, "output must be one of"),
        (body([]), "application/json", 422, "empty batch"),
        (body([ROW] * 5), "application/json", 422, "maximum batch size 4"),
        (body([[["0.5"] * 1] * 8] * 1), "application/json", 422, "numbers"),
        (body([np.full((8, 8, 1), True).tolist()]), "application/json", 422, "found bool"),
        (body([[[None]] * 8]), "application/json", 422, "found NoneType"),
        (body([ROW, ROW[:7]]), "application/json", 422, "rectangular"),
        (body([np.zeros((8, 8)).tolist()]), "application/json", 422, "shaped ('batch', 8, 8, 1)"),
        (body([np.full((8, 8, 1), 2.0).tolist()]), "application/json", 422, "lie in [0, 1]"),
        (body([np.full((8, 8, 1), 10**400).tolist()]), "application/json", 422, "too large"),
        (body([np.full((8, 8, 1), np.nan).tolist()]), "application/json", 422, "NaN or infinite"),
        (b'{"inputs": [[[[1e999]]]]}', "application/json", 422, "shaped"),
    ],
)
def test_every_bad_body_gets_its_4xx_and_a_clear_message(raw, content_type, status, message):
    with pytest.raises(BadRequest) as refused:
        parse_predict_body(raw, content_type, DIGITS)
    assert refused.value.status == status and message in refused.value.message


def test_valid_body_becomes_exact_float32():
    inputs = np.random.default_rng(0).uniform(size=(3, 8, 8, 1)).astype(np.float32)
    parsed = parse_predict_body(
        body(inputs.tolist(), output="labels"), "application/json; charset=utf-8", DIGITS
    )
    assert parsed.output == "labels" and parsed.inputs.dtype == np.float32
    assert np.array_equal(parsed.inputs, inputs)
    assert inputs_digest(parsed.inputs) == inputs_digest(inputs) != inputs_digest(inputs[:2])


def test_schema_parameters_are_validated():
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1, got 0"):
        input_schema((64,), max_batch=0)
    with pytest.raises(ValueError, match="input_range"):
        input_schema((64,), input_range=(1.0, 0.0))


def test_client_views_and_alarm_entries():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], np.float32)
    assert client_view(probs, "labels", 2).tolist() == [1, 0]
    assert np.allclose(client_view(probs, "top_k", 2), [[0, 0.6, 0.3], [0.5, 0, 0.3]])
    report = {"detected": np.bool_(True), "queries_to_detection": 30, "flagged": False, "alarm": "y", "w": 1}
    assert alarms_in(report) == {"detected": True}


def test_audit_log_is_wal_and_loses_no_row_under_concurrent_writers(tmp_path):
    log = AuditLog(tmp_path / "audit.sqlite")
    assert log._connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    def write(worker: int) -> None:
        for index in range(25):
            log.record(
                AuditEntry(f"{worker}-{index}", 0.0, "k", "labels", "POST", "/", None, 2, "served", 200)
            )

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other = AuditLog(tmp_path / "audit.sqlite")  # a second connection, as after a restart
    assert other.count(key_id="k") == 200 and other.served_rows() == {"k": 400}


def test_self_signed_pair_is_a_trust_anchor_for_its_hosts(tmp_path):
    from cryptography import x509

    pair = self_signed_pair(tmp_path, hosts=("127.0.0.1", "localhost"), days=2)
    assert stat.S_IMODE(pair.keyfile.stat().st_mode) == 0o600
    certificate = x509.load_pem_x509_certificate(pair.certfile.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    ssl.create_default_context(cafile=str(pair.certfile)).load_cert_chain(pair.certfile, pair.keyfile)
    with pytest.raises(ValueError, match="days must be an integer in"):
        self_signed_pair(tmp_path, days=0)


def test_failed_auth_allowance_worked_by_hand():
    now = [0.0]
    allowances = Allowances(burst=3, rate=0.5, clock=lambda: now[0], max_names=8)
    assert [allowances.take("k") for _ in range(3)] == [None, None, None]
    assert allowances.take("k") == pytest.approx(2.0)  # empty: one failure refills in 1 / 0.5 s
    now[0] = 1.0
    assert allowances.wait("k") == pytest.approx(1.0) and allowances.wait("other") is None
    now[0] = 2.0
    assert allowances.take("k") is None and allowances.take("k") == pytest.approx(2.0)


def test_failed_auth_tracks_a_bounded_number_of_addresses():
    now = [0.0]
    allowances = Allowances(burst=1, rate=1.0, clock=lambda: now[0], max_names=2)
    for address in ("a", "b", "c"):
        allowances.take(address)
    assert len(allowances._buckets) == 2 and "a" not in allowances._buckets  # the oldest went first
    now[0] = 5.0  # everything refilled: forgotten before anything still counting
    allowances.take("d")
    assert set(allowances._buckets) == {"d"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"burst": 0}, "failed_auth_burst must be an integer >= 1"),
        ({"rate": 0}, "failed_auth_rate must be a number of failures per second > 0"),
        ({"rate": math.inf}, "failed_auth_rate"),
        ({"hold_s": 31}, r"failed_auth_hold_s must be seconds in \[0, 30\]"),
    ],
)
def test_failed_auth_settings_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        FailedAuthThrottle(**options)


def throttled_authenticator(store_path, now):
    throttle = FailedAuthThrottle(burst=3, rate=0.1, hold_s=0.0, clock=lambda: now[0])
    return auth.Authenticator(auth.KeyStore(store_path), b"x" * 32, 60, throttle=throttle)


def test_wrong_secrets_are_throttled_per_key_id_but_the_right_one_is_served(tmp_path):
    store_path, now = tmp_path / "keys.json", [0.0]
    good = auth.create_key(store_path, "probabilities")
    authenticator = throttled_authenticator(store_path, now)
    wrong = auth.Credential(good.key_id, "wrong")
    for source in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):  # three addresses: only the key's allowance spent
        with pytest.raises(auth.Unauthenticated, match="invalid key id or secret"):
            authenticator.authenticate_secret(wrong, source)
    with pytest.raises(Throttled, match=f"for key {good.key_id}") as refusal:
        authenticator.authenticate_secret(wrong, "10.0.0.4")
    assert refusal.value.retry_after == pytest.approx(10.0)
    assert authenticator.authenticate_secret(good, "10.0.0.4").key_id == good.key_id
    now[0] = 10.0
    with pytest.raises(auth.Unauthenticated):
        authenticator.authenticate_secret(wrong, "10.0.0.5")


def test_unknown_key_ids_are_throttled_per_address(tmp_path):
    store_path, now = tmp_path / "keys.json", [0.0]
    good = auth.create_key(store_path, "labels")
    authenticator = throttled_authenticator(store_path, now)
    for attempt in range(3):
        with pytest.raises(auth.Unauthenticated):
            authenticator.authenticate_secret(auth.Credential(f"guess{attempt}", "x"), "10.0.0.9")
    with pytest.raises(Throttled, match="from 10.0.0.9"):
        authenticator.authenticate_secret(auth.Credential("guess3", "x"), "10.0.0.9")
    with pytest.raises(auth.Unauthenticated):
        authenticator.authenticate_secret(auth.Credential("guess4", "x"), "10.0.0.10")
    assert authenticator.authenticate_secret(good, "10.0.0.9").role.name == "labels"


def test_a_slow_key_whose_allowance_is_spent_is_refused_unchecked(tmp_path, monkeypatch):
    store_path, now = tmp_path / "keys.json", [0.0]
    legacy = auth.create_key(store_path, "labels", kdf=CHEAP_KDF)
    authenticator = throttled_authenticator(store_path, now)
    for _ in range(3):
        with pytest.raises(auth.Unauthenticated):
            authenticator.authenticate_secret(auth.Credential(legacy.key_id, "guess"))
    checked = []
    monkeypatch.setattr(auth, "secret_matches", lambda *args: checked.append(args) or True)
    for attempt in (auth.Credential(legacy.key_id, "guess"), legacy):
        with pytest.raises(Throttled, match="not checked"):
            authenticator.authenticate_secret(attempt)
    assert checked == []  # no scrypt run for a throttled slow key, not even for the right secret
    monkeypatch.undo()
    now[0] = 10.0
    assert authenticator.authenticate_secret(legacy).key_id == legacy.key_id


def test_request_ids_are_token_hex_ids_drawn_a_block_at_a_time(monkeypatch):
    from heistlab.serving import app

    drawn = []

    def token_bytes(count: int) -> bytes:
        block = bytes((len(drawn) * 7 + index) % 256 for index in range(count))
        drawn.append(block)
        return block

    monkeypatch.setattr(app.secrets, "token_bytes", token_bytes)
    ids = app.RequestIds(block=4)
    found = [ids.next() for _ in range(10)]
    expected = [block[start : start + 8].hex() for block in drawn for start in range(0, len(block), 8)]
    assert [len(block) for block in drawn] == [32, 32, 32] and found == expected[:10]
    assert all(len(request_id) == 16 and int(request_id, 16) >= 0 for request_id in found)
    real = app.RequestIds()
    monkeypatch.undo()
    assert len({real.next() for _ in range(2000)}) == 2000
