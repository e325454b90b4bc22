"""Every attack runs through the same contract against a counting oracle that holds no model at all.

The oracle answers from a fixed rule on the input (the class of the brightest pixel block), so an attack can
only learn by querying; it never exceeds the budget, and when the API's cap is tighter than the attack's own
budget the attack stops at the cap instead of failing.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from heistlab.api import Oracle, QueryRefused
from heistlab.attacks import (
    activethief,
    cloudleak,
    dfme,
    equation_solving,
    functional_equivalence,
    jbda,
    knockoff,
    maze,
)
from heistlab.attacks.base import fit_transfer_set

ATTACKS = {
    "knockoff_soft": lambda budget: knockoff(budget=budget, labels="soft", query_batch=32),
    "knockoff_hard": lambda budget: knockoff(budget=budget, labels="hard", query_batch=32),
    "jbda": lambda budget: jbda(budget=budget, seed_size=20, rounds=3, query_batch=32),
    "activethief_k_center": lambda budget: activethief(
        budget=budget, seed_size=20, per_round=20, query_batch=32
    ),
    "activethief_uncertainty": lambda budget: activethief(
        budget=budget, seed_size=20, per_round=20, strategy="uncertainty", query_batch=32
    ),
    "knockoff_adaptive": lambda budget: knockoff(
        budget=budget, strategy="adaptive", clusters=4, round_size=16, refit_every=2, query_batch=32
    ),
    "cloudleak": lambda budget: cloudleak(
        budget=budget, seed_size=min(20, budget - 1), per_round=20, steps=3, query_batch=32
    ),
    "dfme": lambda budget: dfme(budget=budget, batch_size=8, student_steps=2, generator_hidden=(32,)),
}

# Attacks whose loss compares output distributions: they need scores and refuse labels-only answers.
SCORE_ATTACKS = {
    "maze": lambda budget: maze(
        budget=budget, batch_size=4, directions=2, clone_steps=2, generator_hidden=(32,)
    ),
}
BUDGETED = {**ATTACKS, **SCORE_ATTACKS}

# Exact extraction solves equations in the answered probabilities: no labels-only mode, a clear error instead.
PROBABILITY_ATTACKS = {
    "equation_solving": lambda budget: equation_solving(budget=budget, query_batch=32),
    "functional_equivalence": lambda budget: functional_equivalence(budget=budget, query_batch=32),
}


class CountingOracle:
    """A client's API view built from a plain rule: counts rows, refuses past its cap, serves no model."""

    def __init__(self, cap: int | None, output: str = "probabilities"):
        self.cap, self.served, self.refused, self.batches = cap, 0, 0, 0
        self.output = output

    def answer(self, inputs: np.ndarray) -> np.ndarray:
        assert inputs.dtype == np.float32 and inputs.shape[1:] == (8, 8, 1)
        assert np.all((inputs >= 0) & (inputs <= 1))
        if self.cap is not None and self.served + len(inputs) > self.cap:
            self.refused += len(inputs)
            raise QueryRefused("attacker", len(inputs), self.cap - self.served, "test cap")
        self.served += len(inputs)
        self.batches += 1
        scores = _block_scores(inputs)
        probs = np.exp(8 * scores) / np.exp(8 * scores).sum(-1, keepdims=True)
        return probs.argmax(-1).astype(np.int32) if self.output == "labels" else probs.astype(np.float32)

    def oracle(self) -> Oracle:
        remaining = lambda: None if self.cap is None else self.cap - self.served
        return Oracle(self.answer, remaining, (8, 8, 1), 10, self.output)


def _block_scores(inputs: np.ndarray) -> np.ndarray:
    flat = inputs.reshape(len(inputs), -1)[:, :60]
    return flat.reshape(len(inputs), 10, 6).mean(-1)


@pytest.mark.parametrize("name", sorted(BUDGETED))
@pytest.mark.parametrize(("attack_budget", "api_cap"), [(100, 100), (100, 50), (60, None)])
def test_attack_stays_inside_its_budget_and_the_apis(name, attack_budget, api_cap, small_surrogate, rng):
    counting = CountingOracle(api_cap)
    pool = rng.uniform(size=(80, 8, 8, 1)).astype(np.float32)
    result = BUDGETED[name](attack_budget).run(counting.oracle(), pool, small_surrogate, jax.random.key(1))
    limit = attack_budget if api_cap is None else min(attack_budget, api_cap)
    assert counting.served <= limit
    assert counting.refused == 0, "an attack must check the budget left instead of being refused"
    assert result.queries == counting.served
    assert counting.served >= min(limit, 20), "the attack should spend its budget"


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_learns_from_label_only_answers(name, small_surrogate, rng):
    counting = CountingOracle(cap=None, output="labels")
    pool = rng.uniform(size=(80, 8, 8, 1)).astype(np.float32)
    result = ATTACKS[name](120).run(counting.oracle(), pool, small_surrogate, jax.random.key(2))
    assert counting.served == result.queries <= 120
    assert result.params is not None


@pytest.mark.parametrize("name", sorted(PROBABILITY_ATTACKS))
@pytest.mark.parametrize(("attack_budget", "api_cap"), [(100, 100), (100, 50), (60, None)])
def test_probability_attack_stays_inside_its_budget_and_the_apis(
    name, attack_budget, api_cap, small_surrogate, rng
):
    counting = CountingOracle(api_cap)
    pool = rng.uniform(size=(80, 8, 8, 1)).astype(np.float32)
    attack = PROBABILITY_ATTACKS[name](attack_budget)
    result = attack.run(counting.oracle(), pool, small_surrogate, jax.random.key(1))
    limit = attack_budget if api_cap is None else min(attack_budget, api_cap)
    assert counting.served <= limit and counting.refused == 0
    assert result.queries == counting.served >= min(limit, 20)
    assert result.model is not None, "an exact extraction returns the architecture it recovered"


@pytest.mark.parametrize("name", sorted(PROBABILITY_ATTACKS | SCORE_ATTACKS))
def test_probability_attack_refuses_label_only_answers_naming_the_requirement(name, small_surrogate, rng):
    counting = CountingOracle(cap=None, output="labels")
    pool = rng.uniform(size=(80, 8, 8, 1)).astype(np.float32)
    with pytest.raises(ValueError, match=r"needs .*probabilit.*api\.output=labels|api.output=probabilities"):
        (PROBABILITY_ATTACKS | SCORE_ATTACKS)[name](100).run(
            counting.oracle(), pool, small_surrogate, jax.random.key(0)
        )
    assert counting.served == 0


def test_knockoff_with_budget_above_pool_walks_the_pool_again(small_surrogate, rng):
    counting = CountingOracle(cap=None)
    pool = rng.uniform(size=(30, 8, 8, 1)).astype(np.float32)
    knockoff(budget=75, query_batch=32).run(counting.oracle(), pool, small_surrogate, jax.random.key(0))
    assert counting.served == 75


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: knockoff(budget=0), "knockoff: budget must be an integer >= 1, got 0"),
        (lambda: knockoff(labels="logits"), "knockoff: labels must be one of soft, hard; got 'logits'"),
        (lambda: jbda(step=-0.1), "jbda: step"),
        (lambda: jbda(rounds=-1), "jbda: rounds"),
    ],
)
def test_bad_attack_parameters_are_named(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


COLLECTING = sorted(name for name, build in ATTACKS.items() if build(10).collect is not None)


def test_the_query_then_train_attacks_are_the_ones_expected():
    assert COLLECTING == ["knockoff_hard", "knockoff_soft"]


@pytest.mark.parametrize("name", COLLECTING)
def test_run_is_collect_then_one_training(name, small_surrogate, rng):
    """``num_seeds`` relies on it: ``run`` must equal ``fit_transfer_set(collect(...))`` for the same key."""
    pool = rng.uniform(size=(80, 8, 8, 1)).astype(np.float32)
    attack = ATTACKS[name](50)
    counting = CountingOracle(40)
    transfer = attack.collect(counting.oracle(), pool, small_surrogate, jax.random.key(3))
    assert len(transfer.inputs) == len(transfer.targets) == counting.served == 40, "the cap, not the budget"
    collected = fit_transfer_set(small_surrogate, transfer)
    result = attack.run(CountingOracle(40).oracle(), pool, small_surrogate, jax.random.key(3))
    assert result.queries == collected.queries and result.rounds == collected.rounds
    for ours, theirs in zip(jax.tree.leaves(result.params), jax.tree.leaves(collected.params), strict=True):
        np.testing.assert_array_equal(ours, theirs)
