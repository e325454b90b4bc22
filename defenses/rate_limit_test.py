import math

import numpy as np
import pytest

from heistlab.defenses.base import Request
from heistlab.defenses.rate_limit import cumulative_delay, progressive_delay, rate_limit


def run_client(defense, sizes, client="alice"):
    """Sends ``sizes`` as one client whose clock advances by each delay, as the API's does; returns clocks."""
    state, clock, served_at = defense.init(), 0.0, []
    for size in sizes:
        verdict, state = defense.admit(state, Request(client, size, clock))
        assert verdict.admitted
        clock += verdict.delay
        served_at.append(clock)
    return served_at, state


def test_token_bucket_delays_worked_out_by_hand():
    # rate 10/s, burst 20, full at t=0. 15 rows: 5 left, no wait. 15 rows: 10 missing -> wait 1.0 s, 0 left.
    # 5 rows: 0.5 s. 20 rows: 2.0 s. Served at 0, 1.0, 1.5, 3.5: 55 rows = burst + rate * 3.5.
    served_at, _ = run_client(rate_limit(rate=10.0, burst=20), [15, 15, 5, 20])
    np.testing.assert_allclose(served_at, [0.0, 1.0, 1.5, 3.5])


def test_no_row_is_served_before_the_bucket_allows_it():
    rate, burst = 3.0, 16
    sizes = np.random.default_rng(0).integers(1, burst + 1, size=200).tolist()
    served_at, _ = run_client(rate_limit(rate, burst), sizes)
    served = np.cumsum(sizes)
    assert np.all(served <= burst + rate * np.asarray(served_at) + 1e-9)
    # ...and it waits no longer than needed: at the end the bucket was exactly empty.
    assert served[-1] == pytest.approx(burst + rate * served_at[-1])


def test_the_bucket_refills_with_the_clients_clock_up_to_burst():
    defense = rate_limit(rate=2.0, burst=10)
    _, state = defense.admit(defense.init(), Request("alice", 10, 0.0))
    verdict, state = defense.admit(state, Request("alice", 4, 1.0))
    assert verdict.delay == pytest.approx(1.0)
    verdict, _ = defense.admit(state, Request("alice", 10, 100.0))
    assert verdict.admitted and verdict.delay == 0.0


def test_each_client_has_its_own_bucket():
    defense = rate_limit(rate=1.0, burst=5)
    _, state = defense.admit(defense.init(), Request("alice", 5, 0.0))
    assert defense.admit(state, Request("bob", 5, 0.0))[0].delay == 0.0
    assert defense.admit(state, Request("alice", 5, 0.0))[0].delay == pytest.approx(5.0)


def test_a_batch_over_burst_is_refused_for_ever():
    defense = rate_limit(rate=1.0, burst=5)
    verdict, state = defense.admit(defense.init(), Request("alice", 6, 0.0))
    assert not verdict.admitted and verdict.delay == math.inf and "burst of 5" in verdict.reason
    assert state == defense.init()


def test_progressive_delay_worked_out_by_hand():
    # threshold 2, base 1 s, growth 2: query 3 waits 1, query 4 waits 2, query 5 waits 4, query 6 waits 8.
    served_at, _ = run_client(progressive_delay(threshold=2, base_delay=1.0, growth=2.0), [2, 1, 2, 1])
    np.testing.assert_allclose(served_at, [0.0, 1.0, 7.0, 15.0])


def test_progressive_delay_total_has_the_closed_form():
    base, growth, threshold = 0.1, 1.005, 200
    served_at, _ = run_client(progressive_delay(threshold, base, growth), [64] * 15 + [40])
    assert served_at[-1] == pytest.approx(base * (growth**800 - 1) / (growth - 1))
    linear, _ = run_client(progressive_delay(threshold=3, base_delay=0.5, growth=1.0), [5, 5])
    np.testing.assert_allclose(linear, [1.0, 3.5])


def test_progressive_delay_overflows_to_inf_not_an_error():
    assert cumulative_delay(10**7, 1.0, 2.0) == math.inf
    verdict, _ = progressive_delay(0, 1.0, 2.0).admit(
        progressive_delay(0, 1.0, 2.0).init(), Request("alice", 10**5, 0.0)
    )
    assert verdict.admitted and verdict.delay == math.inf


@pytest.mark.parametrize(
    ("factory", "arguments", "message"),
    [
        (rate_limit, {"rate": 0.0, "burst": 5}, "rate must be a finite number > 0"),
        (rate_limit, {"rate": math.inf, "burst": 5}, "rate must be a finite number > 0"),
        (rate_limit, {"rate": 1.0, "burst": 0}, "burst must be an int >= 1"),
        (rate_limit, {"rate": 1.0, "burst": 2.5}, "burst must be an int >= 1"),
        (progressive_delay, {"threshold": -1, "base_delay": 1.0, "growth": 1.0}, "threshold must be an int"),
        (progressive_delay, {"threshold": 1, "base_delay": 0.0, "growth": 1.0}, "base_delay must be"),
        (progressive_delay, {"threshold": 1, "base_delay": 1.0, "growth": 0.5}, "growth must be .* >= 1"),
    ],
)
def test_bad_arguments_are_named(factory, arguments, message):
    with pytest.raises(ValueError, match=message):
        factory(**arguments)
