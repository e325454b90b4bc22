"""``num_seeds=N``: N seeds in one run, each the run ``seed=s`` would make, surrogates trained together."""

from __future__ import annotations

import pytest

from heistlab.experiment import execute, execute_seeds, run_experiment
from heistlab.results import read_results
from tests.test_configs import composed
from tests.test_end_to_end import TINY, run_cli

PER_RUN = ("victim_accuracy", "served_accuracy", "queries_served", "queries_refused", "mean_l1_distortion")


@pytest.mark.slow
def test_each_seed_of_a_vectorised_run_is_the_single_seed_run(tmp_path, cache_dir):
    finished = run_cli(
        ["num_seeds=2", "seed=4", "defense=rounding", *TINY, f"hydra.run.dir={tmp_path}"], cache_dir
    )
    assert finished.returncode == 0, finished.stderr
    assert "mean of 2 seeds" in " ".join(finished.stdout.split())  # the table's title, wrapped by rich
    record = read_results(tmp_path)
    assert record["status"] == "complete" and [entry["seed"] for entry in record["seeds"]] == [4, 5]
    assert record["metrics"]["seeds_vectorised"] is True and record["metrics"]["num_seeds"] == 2
    test_rows = 359  # the digits test split: one flipped label moves fidelity by 1/359
    for entry in record["seeds"]:
        alone = execute(
            composed(f"seed={entry['seed']}", "defense=rounding", f"cache_dir={cache_dir}", *TINY)
        )
        for name in PER_RUN:
            assert entry["metrics"][name] == alone[name], name
        for name in ("fidelity_test", "surrogate_accuracy"):
            assert abs(entry["metrics"][name] - alone[name]) <= 1 / test_rows, name
    fidelities = [entry["metrics"]["fidelity_test"] for entry in record["seeds"]]
    assert record["metrics"]["fidelity_test"] == pytest.approx(sum(fidelities) / 2)
    assert record["seeds"][0]["rounds"] == [{"round": 0, "queries": 120, "soft": True}]


def test_an_attack_that_trains_in_rounds_runs_its_seeds_one_after_another(cache_dir):
    adaptive = ("attack=knockoff_adaptive", "attack.clusters=4", f"cache_dir={cache_dir}", *TINY)
    found, per_seed = execute_seeds(composed("num_seeds=2", *adaptive))
    assert found["seeds_vectorised"] is False and [entry["seed"] for entry in per_seed] == [0, 1]
    assert all(entry["metrics"]["queries_served"] == 120 for entry in per_seed)
    alone = execute(composed("seed=1", *adaptive))
    assert per_seed[1]["metrics"]["fidelity_test"] == alone["fidelity_test"]
    assert len(per_seed[1]["rounds"]) == alone["attack_rounds"] > 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["num_seeds=0"], "num_seeds must be an integer >= 1, got 0"),
        (["num_seeds=2", "api=http"], "num_seeds=2 needs api=inprocess"),
    ],
)
def test_bad_seed_counts_are_named(tmp_path, cache_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_experiment(composed(*overrides, f"cache_dir={cache_dir}", *TINY), tmp_path)
    assert read_results(tmp_path)["status"] == "refused"
