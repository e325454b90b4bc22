import hashlib

import pytest

from heistlab.serving.puzzle import (
    NONCE_HEADER,
    SOLUTION_HEADER,
    PuzzleBook,
    PuzzleRequired,
    batch_bits,
    leading_zero_bits,
    puzzle_hash,
    solve,
)


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def headers(puzzle, solution):
    return {NONCE_HEADER.lower(): puzzle["nonce"], SOLUTION_HEADER.lower(): solution}


def challenge(book, key_id="k1", request="r1", rows=1):
    with pytest.raises(PuzzleRequired) as required:
        book.admit(key_id, request, rows, {})
    return required.value.puzzle


def test_leading_zero_bits_by_hand():
    assert leading_zero_bits(bytes([0, 0, 0b00010000]) + b"\xff" * 29) == 19
    assert leading_zero_bits(b"\x80" + bytes(31)) == 0
    assert leading_zero_bits(bytes(32)) == 256


def test_a_solution_meets_the_difficulty_and_hashes_what_the_puzzle_says():
    puzzle = {"nonce": "ab", "key_id": "k", "request": "r", "bits": 10}
    solution = solve(puzzle)
    digest = hashlib.sha256(f"heistlab-pow/1:ab:k:r:{solution}".encode()).digest()
    assert digest == puzzle_hash("ab", "k", "r", solution) and leading_zero_bits(digest) >= 10


def test_a_solved_puzzle_is_accepted_once():
    book = PuzzleBook(lambda key_id: 6)
    puzzle = challenge(book)
    solution = solve(puzzle)
    book.admit("k1", "r1", 1, headers(puzzle, solution))
    with pytest.raises(PuzzleRequired, match="unknown or already used"):
        book.admit("k1", "r1", 1, headers(puzzle, solution))


@pytest.mark.parametrize(
    ("key_id", "bound_to", "message"),
    [("k2", "r1", "issued to another key"), ("k1", "r2", "issued for another request")],
)
def test_a_puzzle_is_bound_to_its_key_and_request(key_id, bound_to, message):
    book = PuzzleBook(lambda key_id: 6)
    puzzle = challenge(book)
    with pytest.raises(PuzzleRequired, match=message):
        book.admit(key_id, bound_to, 1, headers(puzzle, solve(puzzle)))


def test_a_wrong_solution_spends_the_nonce_and_a_fresh_puzzle_comes_back():
    book = PuzzleBook(lambda key_id: 20)
    puzzle = challenge(book)
    wrong = next(
        str(n)
        for n in range(1000)
        if leading_zero_bits(puzzle_hash(puzzle["nonce"], "k1", "r1", str(n))) < 20
    )
    with pytest.raises(PuzzleRequired, match="fewer than the 20 leading zero bits") as refused:
        book.admit("k1", "r1", 1, headers(puzzle, wrong))
    assert refused.value.puzzle["nonce"] != puzzle["nonce"]


def test_an_expired_puzzle_is_refused():
    clock = Clock()
    book = PuzzleBook(lambda key_id: 4, ttl_s=10, clock=clock)
    puzzle = challenge(book)
    clock.now = 11.0
    with pytest.raises(PuzzleRequired, match="expired|unknown"):
        book.admit("k1", "r1", 1, headers(puzzle, solve(puzzle)))


def test_a_batch_costs_about_its_rows_in_puzzles():
    assert [batch_bits(12, rows) for rows in (1, 2, 16, 17)] == [12, 13, 16, 17]
    book = PuzzleBook(lambda key_id: 3)
    assert challenge(book, rows=16)["bits"] == 7


def test_open_puzzles_per_key_are_bounded():
    book = PuzzleBook(lambda key_id: 1, max_open_per_key=2)
    first, _, third = (challenge(book) for _ in range(3))
    with pytest.raises(PuzzleRequired, match="unknown or already used"):
        book.admit("k1", "r1", 1, headers(first, solve(first)))
    book.admit("k1", "r1", 1, headers(third, solve(third)))
