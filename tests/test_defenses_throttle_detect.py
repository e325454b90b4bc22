"""Done-means checks for throttling, detection and input-side defenses, through whole experiments on digits.

PRADA (Juuti et al., EuroS&P 2019) must raise no alarm on benign streams and one on JBDA within JBDA's budget;
the token bucket's simulated time must be the one worked out by hand; a global budget must bound a Sybil
attacker that a per-client budget does not.
"""

from __future__ import annotations

import numpy as np
import pytest

from heistlab.compose import build_defense, build_splits, defender_data
from heistlab.defenses import Evidence
from heistlab.defenses.prada import calibrate_delta
from heistlab.experiment import execute, stream_benign_clients
from tests.test_configs import composed

CHEAP = ["surrogate.train.epochs=3", "eval.uniform_samples=64"]


def run(cache_dir, *overrides):
    return execute(composed(f"cache_dir={cache_dir}", *CHEAP, *overrides))


@pytest.mark.slow
def test_prada_detects_jbda_within_its_budget_and_spares_benign_streams(cache_dir):
    # JBDA with 400 queries: 150 natural seeds, then Jacobian steps. Its distances turn non-normal within the
    # first augmentation round; three benign clients each stream the whole shuffled test split (360 digits).
    metrics = run(cache_dir, "attack=jbda", "attack.budget=400", "defense=prada", "eval.benign_clients=3")
    assert metrics["detected"] is True
    assert 150 < metrics["queries_to_detection"] <= 400 == metrics["queries_served"]
    assert metrics["false_positive_rate"] == 0.0
    assert metrics["prada_min_w_attack"] < metrics["prada_delta"] < metrics["prada_min_w_benign"]


class RecordingAPI:
    """Takes every query a benign client streams, and remembers its rows."""

    def __init__(self):
        self.rows = []

    def remaining(self, client):
        return 10**9

    def query(self, inputs, client):
        self.rows.extend(np.asarray(inputs))


def test_prada_calibrates_on_defender_data_the_benign_clients_never_send():
    cfg = composed("defense=prada", "defense.calibration_streams=3", "eval.benign_clients=2")
    splits = build_splits(cfg)
    defender = defender_data(cfg, splits)
    api = RecordingAPI()
    stream_benign_clients(cfg, api, splits.test)
    streamed = {row.tobytes() for row in api.rows}
    calibration = {row.tobytes() for row in np.asarray(defender.x)}
    assert len(streamed) == len(splits.test.x) and len(calibration) == len(defender.x)
    assert streamed.isdisjoint(calibration)
    defense = build_defense(cfg.defense, defender)
    labels = lambda x: np.zeros(len(x), np.int64)
    found = defense.report(defense.init(), Evidence(labels, labels, labels, (), ()))
    assert found["prada_delta"] == calibrate_delta(defender, 3, 1000, 0.05)


@pytest.mark.slow
def test_token_bucket_time_is_what_the_bucket_allows(cache_dir):
    # Knockoff sends 4 batches of 150; rate 10/s, burst 360. The first two batches take 300 of the 360 tokens;
    # the third finds 60 and waits 9 s for 90 more; the fourth waits 15 s for 150. The last row is served at
    # 24 simulated seconds, exactly when the bucket allows 600 rows (360 + 10 * 24), not a moment earlier.
    # (The burst holds the test split, which the experiment's evaluation sends through the defense at once.)
    metrics = run(
        cache_dir,
        "attack.budget=600",
        "attack.query_batch=150",
        "defense=rate_limit",
        "defense.rate=10.0",
        "defense.burst=360",
    )
    assert metrics["queries_served"] == 600 and metrics["queries_refused"] == 0
    assert metrics["simulated_seconds"] == 24.0


@pytest.mark.parametrize(
    ("identities", "total", "served", "refused"),
    [(1, "null", 400, 200), (3, "null", 1200, 0), (3, "800", 800, 200)],
    ids=[
        "single-client-stopped-by-per-client-cap",
        "sybil-passes-per-client-cap",
        "sybil-stopped-by-global-cap",
    ],
)
@pytest.mark.slow
def test_budget_against_a_sybil_attacker(cache_dir, identities, total, served, refused):
    # Knockoff plans 1200 queries in batches of 200 against a per-client cap of 400: one client is refused at
    # its third batch and stops; three identities share the batches and get all 1200; a global cap of 800
    # refuses the Sybil's fifth batch. (Caps hold the 360-row test split the evaluation sends at once.)
    metrics = run(
        cache_dir,
        "attack.budget=1200",
        "attack.query_batch=200",
        f"api.attacker_identities={identities}",
        "defense=budget",
        "defense.per_client=400",
        f"defense.total={total}",
    )
    assert metrics["queries_served"] == served
    assert metrics["queries_refused"] == refused


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["none", "rate_limit", "prada", "feature_squeezing"])
def test_the_done_means_sweep_runs_in_process(cache_dir, defense):
    # The cells of `python -m experiments.run -m defense=none,rate_limit,prada,feature_squeezing
    # attack.budget=200 surrogate.train.epochs=5 eval.benign_clients=2`, run in-process (the command line's
    # multirun itself is tested in test_end_to_end.py).
    metrics = execute(
        composed(
            f"cache_dir={cache_dir}",
            f"defense={defense}",
            "attack.budget=200",
            "surrogate.train.epochs=5",
            "eval.benign_clients=2",
            "eval.uniform_samples=64",
        )
    )
    assert metrics["queries_served"] == 200
    expected = {
        "none": set(),
        "rate_limit": {"rate_limit_benign_seconds"},
        "prada": {"detected", "queries_to_detection", "false_positive_rate"},
        "feature_squeezing": {"squeezing_flagged_fraction_attack", "squeezing_flagged_fraction_benign"},
    }[defense]
    assert expected <= set(metrics)
