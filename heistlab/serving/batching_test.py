"""Adaptive batching: calls that arrive while a batch runs are served together next, in arrival order, and
each call gets its own outcome."""

from __future__ import annotations

import asyncio
import threading

import pytest

from heistlab.serving.batching import Coalescer


def held_server(refuse: set[int]):
    """A serve_in_turn that holds its first batch until released; records each batch it was given."""
    batches: list[list[int]] = []
    release = threading.Event()

    def serve_in_turn(calls):
        if not batches:
            release.wait(timeout=10)
        batches.append(list(calls))
        return [ValueError(f"call {call} refused") if call in refuse else call * 10 for call in calls]

    return serve_in_turn, batches, release


async def submit_all(coalescer: Coalescer, calls: list[int], release: threading.Event) -> list:
    first = asyncio.ensure_future(coalescer.submit(calls[0]))
    await asyncio.sleep(0.01)  # the first call is being served alone; the rest arrive meanwhile
    rest = [asyncio.ensure_future(coalescer.submit(call)) for call in calls[1:]]
    await asyncio.sleep(0.01)
    release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_calls_arriving_during_a_batch_are_served_next_in_arrival_order_at_most_max_batch():
    serve_in_turn, batches, release = held_server(refuse=set())
    coalescer = Coalescer(serve_in_turn, max_batch=4)
    outcomes = asyncio.run(submit_all(coalescer, list(range(10)), release))
    assert outcomes == [call * 10 for call in range(10)]
    assert batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert (coalescer.batches, coalescer.calls) == (4, 10)


def test_a_refused_call_fails_alone_and_a_failed_batch_fails_each_of_its_calls():
    serve_in_turn, _, release = held_server(refuse={3})
    outcomes = asyncio.run(submit_all(Coalescer(serve_in_turn), [1, 2, 3, 4], release))
    assert outcomes[:2] == [10, 20] and outcomes[3] == 40
    assert isinstance(outcomes[2], ValueError) and str(outcomes[2]) == "call 3 refused"

    def broken(calls):
        return []  # one outcome short per call: every caller is told, none is left waiting

    async def two_calls():
        coalescer = Coalescer(broken)
        return await asyncio.gather(coalescer.submit(1), coalescer.submit(2), return_exceptions=True)

    failures = asyncio.run(two_calls())
    assert all(
        isinstance(failure, RuntimeError) and "0 outcomes for 2 calls" in str(failure) for failure in failures
    )


@pytest.mark.parametrize("max_batch", [0, -1, 1.5, True])
def test_max_batch_must_be_a_positive_integer(max_batch):
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        Coalescer(lambda calls: calls, max_batch=max_batch)
