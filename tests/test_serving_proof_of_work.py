"""The calibrated proof-of-work served over HTTPS on loopback (Dziedzic et al., ICLR 2022): a prediction is
answered only with a solved hashcash puzzle, a wrong or reused solution is refused with a fresh puzzle, and a
key whose answers leak more is asked harder puzzles. One server in a thread on 127.0.0.1, stopped at the end;
every request loop is bounded."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from heistlab.defenses import chain, rounding
from heistlab.defenses.leakage import answer_entropy
from heistlab.defenses.proof_of_work import proof_of_work
from heistlab.serving.app import create_app, puzzle_book_for
from heistlab.serving.audit import AuditLog
from heistlab.serving.auth import Authenticator, KeyStore, create_key
from heistlab.serving.client import remote_api, write_credentials
from heistlab.serving.puzzle import NONCE_HEADER, SOLUTION_HEADER, solve
from heistlab.serving.server import serve_in_thread
from heistlab.serving.service import build_core
from heistlab.serving.tls import client_context, self_signed_pair
from heistlab.serving.validation import input_schema

CHEAP_KDF = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1, "dklen": 32}
BASE_BITS = 4


@pytest.fixture
def server(tmp_path, small_victim):
    """A server whose chain ends in a proof-of-work on answer entropy, with two probability keys."""
    tls = self_signed_pair(tmp_path / "tls")
    store = tmp_path / "keys.json"
    keys = [create_key(store, "probabilities", kdf=CHEAP_KDF) for _ in range(2)]
    audit = AuditLog(tmp_path / "audit.sqlite")
    defense = chain(rounding(4), proof_of_work(answer_entropy(), base_bits=BASE_BITS, leakage_unit=0.5))
    core = build_core(small_victim, defense, audit=audit)
    app = create_app(
        core,
        Authenticator(KeyStore(store), b"k" * 32, 300),
        audit,
        input_schema(small_victim.input_shape, max_batch=256),
        puzzles=puzzle_book_for(core, several_workers=False),
    )
    running = serve_in_thread(app, tls.certfile, tls.keyfile)
    client = httpx.Client(verify=client_context(tls.certfile), timeout=30)
    write_credentials(tmp_path / "client.json", keys[:1])
    yield running.url, client, keys, audit, tls.certfile
    client.close()
    running.stop()


def post(client, url, key, inputs, puzzle=None, solution=None):
    headers = {"X-API-Key": key.api_key}
    if puzzle is not None:
        headers.update({NONCE_HEADER: puzzle["nonce"], SOLUTION_HEADER: solution})
    body = {"inputs": np.asarray(inputs).tolist(), "output": "probabilities"}
    return client.post(f"{url}/v1/predict", json=body, headers=headers)


def solved_query(client, url, key, inputs) -> tuple[int, httpx.Response]:
    """Asks, solves the puzzle it is given and asks again: the puzzle's bits and the final answer."""
    challenge = post(client, url, key, inputs)
    assert challenge.status_code == 428, challenge.text
    puzzle = challenge.json()["puzzle"]
    return puzzle["bits"], post(client, url, key, inputs, puzzle, solve(puzzle))


def test_only_a_solved_single_use_puzzle_bound_to_the_request_is_served(server, digits_splits):
    url, client, (key, other), audit, _ = server
    inputs = digits_splits.test.x[:2]
    refused = post(client, url, key, inputs)
    assert refused.status_code == 428
    body = refused.json()
    assert body["error"] == "proof_of_work_required" and "proof of work" in body["message"]
    puzzle = body["puzzle"]
    assert puzzle["algorithm"] == "sha256-leading-zero-bits" and puzzle["key_id"] == key.key_id
    assert puzzle["bits"] == BASE_BITS + 1, "a 2-row batch asks for two base puzzles' work"
    solution = solve(puzzle)
    # Another key, or other inputs, cannot spend the puzzle; a wrong solution is refused with a fresh one.
    assert post(client, url, other, inputs, puzzle, solution).status_code == 428
    puzzle = post(client, url, key, inputs).json()["puzzle"]
    solution = solve(puzzle)
    moved = post(client, url, key, digits_splits.test.x[2:4], puzzle, solution)
    assert moved.status_code == 428 and "another request" in moved.json()["message"]
    puzzle = post(client, url, key, inputs).json()["puzzle"]
    wrong = next(str(n) for n in range(10_000) if n != int(solve(puzzle)) and _too_weak(puzzle, str(n)))
    answer = post(client, url, key, inputs, puzzle, wrong)
    assert answer.status_code == 428 and "leading zero bits" in answer.json()["message"]
    assert answer.json()["puzzle"]["nonce"] != puzzle["nonce"]
    puzzle = answer.json()["puzzle"]
    served = post(client, url, key, inputs, puzzle, solve(puzzle))
    assert served.status_code == 200 and len(served.json()["outputs"]) == 2
    reused = post(client, url, key, inputs, puzzle, solve(puzzle))
    assert reused.status_code == 428 and "already used" in reused.json()["message"]
    statuses = [row["status"] for row in audit.requests(100, key.key_id)]
    assert statuses.count(200) == 1 and statuses.count(428) >= 6


def _too_weak(puzzle, solution) -> bool:
    from heistlab.serving.puzzle import leading_zero_bits, puzzle_hash

    digest = puzzle_hash(puzzle["nonce"], puzzle["key_id"], puzzle["request"], solution)
    return leading_zero_bits(digest) < puzzle["bits"]


def test_difficulty_rises_with_what_the_keys_answers_leaked(server, digits_splits, small_victim):
    url, client, (confident_key, noisy_key), _, _ = server
    rng = np.random.default_rng(0)
    confident = digits_splits.test.x[small_victim.predict_proba(digits_splits.test.x).max(axis=1) > 0.99][:8]
    noise = rng.uniform(size=(8, *digits_splits.test.x.shape[1:])).astype(np.float32)
    bits = {"confident": [], "noise": []}
    for step in range(4):
        for name, key, stream in (("confident", confident_key, confident), ("noise", noisy_key, noise)):
            puzzle_bits, answer = solved_query(client, url, key, stream[2 * step : 2 * step + 2])
            assert answer.status_code == 200
            bits[name].append(puzzle_bits)
    assert bits["confident"][0] == bits["noise"][0] == BASE_BITS + 1
    assert bits["noise"][-1] > bits["confident"][-1]
    assert bits["noise"] == sorted(bits["noise"])


def test_the_remote_client_solves_puzzles_and_counts_the_time(server, digits_splits, small_victim, tmp_path):
    url, _, _, _, ca_file = server
    api = remote_api(url, tmp_path / "client.json", ca_file, output="probabilities")
    try:
        answers = api.query(digits_splits.test.x[:4])
    finally:
        api.close()
    expected = small_victim.predict_proba(digits_splits.test.x[:4])
    np.testing.assert_allclose(answers, expected, rtol=0, atol=1e-4)
    assert api.served("attacker") == 4 and api.simulated_seconds("attacker") > 0


def test_puzzles_are_only_built_for_a_proof_of_work_chain_served_by_one_worker(small_victim, tmp_path):
    audit = AuditLog(tmp_path / "audit.sqlite")
    plain = build_core(small_victim, rounding(2), audit=audit)
    assert puzzle_book_for(plain, several_workers=False) is None
    guarded = build_core(small_victim, proof_of_work(answer_entropy()), audit=audit)
    with pytest.raises(ValueError, match="accepted: serve.workers=1"):
        puzzle_book_for(guarded, several_workers=True)
