import math

import pytest

from heistlab.defenses.base import Request
from heistlab.defenses.budget import budget


def ask(defense, state, client, size):
    return defense.admit(state, Request(client, size, now=0.0))


def test_per_client_cap_refuses_the_crossing_batch_whole_and_leaves_the_state_alone():
    defense = budget(per_client=10)
    verdict, state = ask(defense, defense.init(), "alice", 8)
    assert verdict.admitted
    refused, after = ask(defense, state, "alice", 3)
    assert not refused.admitted and refused.delay == math.inf
    assert refused.reason.startswith("per-client cap of 10 queries")
    assert after == state
    assert ask(defense, state, "alice", 2)[0].admitted
    assert ask(defense, state, "bob", 10)[0].admitted


def test_global_cap_holds_across_clients():
    defense = budget(total=10)
    state = defense.init()
    for client in ("alice", "bob", "carol"):
        verdict, state = ask(defense, state, client, 3)
        assert verdict.admitted
    refused, _ = ask(defense, state, "dave", 2)
    assert not refused.admitted and refused.reason.startswith("global cap of 10 queries")
    verdict, state = ask(defense, state, "dave", 1)
    assert verdict.admitted and state.total == 10


def test_the_per_client_cap_is_checked_before_the_global_one():
    defense = budget(per_client=5, total=5)
    verdict, _ = ask(defense, defense.init(), "alice", 6)
    assert "per-client" in verdict.reason


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"per_client": -1}, "per_client must be an int >= 0 or None, got -1"),
        ({"total": 2.5}, "total must be an int >= 0 or None, got 2.5"),
        ({"per_client": True}, "per_client must be an int"),
        ({}, "set at least one cap"),
    ],
)
def test_bad_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        budget(**arguments)
