import functools

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

from heistlab import data, training
from heistlab.api import Oracle, QueryRefused
from heistlab.attacks.base import Surrogate
from heistlab.attacks.cloudleak import cloudleak, feature_fool, margins
from heistlab.checks import ConfigError
from heistlab.experiment import build_attack
from heistlab.models import MLP

SURROGATE = Surrogate(MLP(10, (32,)), training.TrainConfig(epochs=20, batch_size=64, learning_rate=3e-3))


@functools.cache
def digits() -> data.Splits:
    return data.make_splits(data.load_digits(), seed=0)


class RecordingOracle:
    """Answers with the digits label of the nearest training input (no model), records every query, and
    refuses past its cap."""

    def __init__(self, cap: int | None):
        self.cap, self.queries = cap, []
        self.reference = digits().victim_train

    def answer(self, inputs: np.ndarray) -> np.ndarray:
        served = sum(map(len, self.queries))
        if self.cap is not None and served + len(inputs) > self.cap:
            raise QueryRefused("attacker", len(inputs), self.cap - served, "test cap")
        self.queries.append(np.array(inputs, copy=True))
        flat = self.reference.x.reshape(len(self.reference.x), -1)
        nearest = ((inputs.reshape(len(inputs), 1, -1) - flat[None]) ** 2).sum(-1).argmin(1)
        return np.eye(10, dtype=np.float32)[self.reference.y[nearest]]

    def oracle(self) -> Oracle:
        remaining = lambda: None if self.cap is None else self.cap - sum(map(len, self.queries))
        return Oracle(self.answer, remaining, (8, 8, 1), 10, "probabilities")


@pytest.mark.slow
@pytest.mark.parametrize(("norm", "epsilon"), [("linf", 0.1), ("l2", 1.0)])
def test_queries_stay_in_the_budget_near_their_pool_sources(norm, epsilon):
    pool = digits().pool
    recording = RecordingOracle(cap=None)
    attack = cloudleak(budget=130, seed_size=40, per_round=50, epsilon=epsilon, norm=norm, steps=4)
    result = attack.run(recording.oracle(), pool, SURROGATE, jax.random.key(0))
    sent = np.concatenate(recording.queries)
    assert len(sent) == result.queries == 130
    assert [entry["queries"] for entry in result.rounds] == [40, 50, 40]
    assert sent.dtype == np.float32 and sent.min() >= 0.0 and sent.max() <= 1.0
    natural, crafted = sent[:40], sent[40:]
    flat_pool = pool.reshape(len(pool), -1)
    assert all((flat_pool == row.reshape(-1)).all(1).any() for row in natural), "seeds are pool samples"
    differences = crafted.reshape(len(crafted), 1, -1) - flat_pool[None]
    if norm == "linf":
        nearest = np.abs(differences).max(-1).min(1)
    else:
        nearest = np.sqrt((differences**2).sum(-1)).min(1)
    assert np.all(nearest <= epsilon + 1e-5)
    assert np.mean(nearest > 1e-3) > 0.9, "the crafted queries are perturbed, not the sources themselves"


@pytest.mark.slow
def test_stops_at_the_apis_cap_without_being_refused():
    recording = RecordingOracle(cap=75)
    attack = cloudleak(budget=200, seed_size=30, per_round=30, steps=2)
    result = attack.run(recording.oracle(), digits().pool, SURROGATE, jax.random.key(1))
    assert result.queries == sum(map(len, recording.queries)) == 75


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_featurefool_moves_sources_towards_the_substitutes_boundary(norm):
    splits = digits()
    targets = training.one_hot(splits.victim_train.y, 10)
    params = training.train_classifier(
        SURROGATE.model, splits.victim_train.x, targets, jax.random.key(0), SURROGATE.train
    )
    sources = splits.pool[:200]
    epsilon = 0.1 if norm == "linf" else 0.8
    crafted = feature_fool(
        SURROGATE.model, params, sources, splits.victim_train.x, splits.victim_train.y, epsilon, norm, 10, 0.5
    )
    before = margins(training.predict_proba(SURROGATE.model, params, sources))
    after = margins(training.predict_proba(SURROGATE.model, params, crafted))
    assert after.mean() < before.mean() - 0.2, (before.mean(), after.mean())
    assert np.mean(after < before) > 0.8
    delta = (crafted - sources).reshape(len(sources), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta**2).sum(1))
    assert np.all(size <= epsilon + 1e-5) and crafted.min() >= 0 and crafted.max() <= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 100, "seed_size": 100}, "budget=100 leaves no FeatureFool queries after seed_size=100"),
        ({"norm": "l1"}, "norm must be one of linf, l2; got 'l1'"),
        ({"epsilon": 0.0}, "epsilon must be a finite number > 0, got 0.0"),
        ({"per_round": 0}, "per_round must be an integer >= 1, got 0"),
        ({"labels": "logits"}, "labels must be one of soft, hard"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=f"cloudleak: {message}"):
        cloudleak(**kwargs)


def test_a_budget_below_the_seed_set_stops_the_run_in_one_line():
    spec = OmegaConf.create({"_target_": "heistlab.attacks.cloudleak", "budget": 50, "seed_size": 100})
    with pytest.raises(ConfigError, match=r"^attack: cloudleak: budget=50 leaves no FeatureFool") as error:
        build_attack(spec)
    assert "\n" not in str(error.value)
