"""Seeds as a vector: one compiled program trains a surrogate per key, each equal to its sequential run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import jax
import numpy as np
import pytest

from heistlab import seeds, training
from heistlab.models import MLP

REPO = Path(__file__).resolve().parent.parent
TWO_EPOCHS = training.TrainConfig(epochs=2, batch_size=64, learning_rate=3e-3)


def largest_difference(left, right) -> float:
    differences = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), left, right)
    return max(jax.tree_util.tree_leaves(differences))


@pytest.fixture(scope="module")
def answered_queries(digits_splits, small_victim):
    inputs = digits_splits.pool[:100]
    return inputs, small_victim.predict_proba(inputs)


@pytest.mark.slow
def test_each_seed_equals_its_sequential_run_and_seeds_differ(answered_queries, small_surrogate):
    inputs, targets = answered_queries
    keys = seeds.seed_keys(7, 3)
    stacked = seeds.train_classifiers(small_surrogate.model, inputs, targets, keys, TWO_EPOCHS)
    trained = [seeds.params_for_seed(stacked, index) for index in range(3)]
    for key, params in zip(keys, trained, strict=True):
        sequential = training.train_classifier(small_surrogate.model, inputs, targets, key, TWO_EPOCHS)
        assert largest_difference(params, sequential) < 1e-5
    assert largest_difference(trained[0], trained[1]) > 1e-2, "different keys must give different surrogates"
    probabilities = seeds.predict_proba_per_seed(small_surrogate.model, stacked, inputs[:5])
    expected = training.predict_proba(small_surrogate.model, trained[2], inputs[:5])
    assert probabilities.shape == (3, 5, 10) and np.allclose(probabilities[2], expected, atol=1e-6)


class SteppedMLP(MLP):
    """A dense model driven like the CNN: one jitted step at a time from Python (``compiled_loop=False``)."""

    compiled_loop: ClassVar[bool] = False


@pytest.mark.slow
def test_a_stepped_model_trains_per_seed_like_its_sequential_run(answered_queries):
    """Models stepped from Python (the CNN: XLA-CPU convolutions in loops are slow) step all seeds at once."""
    inputs, targets = answered_queries
    stepped = SteppedMLP(num_classes=10, hidden=(16,))
    keys = seeds.seed_keys(0, 2)
    stacked = seeds.train_classifiers(stepped, inputs, targets, keys, TWO_EPOCHS)
    sequential = training.train_classifier(stepped, inputs, targets, keys[1], TWO_EPOCHS)
    assert largest_difference(seeds.params_for_seed(stacked, 1), sequential) < 1e-5


@pytest.mark.slow
def test_per_seed_data_trains_each_seed_like_its_sequential_run(answered_queries, small_surrogate):
    """Each seed its own transfer set (as ``num_seeds`` experiments collect them), one program for all."""
    inputs, targets = answered_queries
    order = np.random.default_rng(0).permutation(len(inputs))
    sets = [(inputs, targets), (inputs[order], targets[order]), (inputs[::-1], targets[::-1])]
    keys = seeds.seed_keys(3, 3)
    stacked = seeds.train_classifiers_per_seed(
        small_surrogate.model, [x for x, _ in sets], [y for _, y in sets], keys, TWO_EPOCHS
    )
    for index, ((x, y), key) in enumerate(zip(sets, keys, strict=True)):
        sequential = training.train_classifier(small_surrogate.model, x, y, key, TWO_EPOCHS)
        assert largest_difference(seeds.params_for_seed(stacked, index), sequential) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "model", [SteppedMLP(num_classes=10, hidden=(16,)), MLP(num_classes=10, hidden=(16,))]
)
def test_seeds_with_fewer_rows_take_fewer_steps(answered_queries, model):
    """An API that refused some queries: seeds of 100 and 70 rows (2 steps per epoch of 64) and 60 (1 step).

    The first two share the largest seed's capacity bucket, so each equals its sequential run; the third sees
    all its rows in its one step (the shuffle cannot matter) and must not move on the others' second step.
    """
    inputs, targets = answered_queries
    sizes = (100, 70, 60)
    keys = seeds.seed_keys(5, 3)
    stacked = seeds.train_classifiers_per_seed(
        model, [inputs[:n] for n in sizes], [targets[:n] for n in sizes], keys, TWO_EPOCHS
    )
    for index, (size, key) in enumerate(zip(sizes, keys, strict=True)):
        sequential = training.train_classifier(model, inputs[:size], targets[:size], key, TWO_EPOCHS)
        assert largest_difference(seeds.params_for_seed(stacked, index), sequential) < 1e-5


def test_per_seed_data_names_mismatched_lengths(answered_queries, small_surrogate):
    inputs, targets = answered_queries
    with pytest.raises(ValueError, match="got 2 input sets, 2 target sets and 3 keys"):
        seeds.train_classifiers_per_seed(
            small_surrogate.model, [inputs] * 2, [targets] * 2, seeds.seed_keys(0, 3), TWO_EPOCHS
        )
    with pytest.raises(ValueError, match="seed 1's inputs hold 100 rows but its targets 99"):
        seeds.train_classifiers_per_seed(
            small_surrogate.model, [inputs] * 2, [targets, targets[:99]], seeds.seed_keys(0, 2), TWO_EPOCHS
        )


SHARDED_RUN = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    from heistlab import seeds, training
    from heistlab.models import SoftmaxRegression

    model, config = SoftmaxRegression(num_classes=3), training.TrainConfig(epochs=2, batch_size=16)
    inputs = np.random.default_rng(0).uniform(size=(40, 4, 1, 1)).astype(np.float32)
    targets = training.one_hot(np.arange(40) % 3, 3)
    keys = seeds.seed_keys(1, 6)
    stacked = seeds.train_classifiers(model, inputs, targets, keys, config)
    kernel = stacked["params"]["Dense_0"]["kernel"]
    per_seed = seeds.train_classifiers_per_seed(
        model, [inputs[index:] for index in range(6)], [targets[index:] for index in range(6)], keys, config
    )["params"]["Dense_0"]["kernel"]
    worst = 0.0
    for index in range(6):
        alone = training.train_classifier(model, inputs, targets, keys[index], config)
        worst = max(worst, float(np.abs(alone["params"]["Dense_0"]["kernel"] - kernel[index]).max()))
        alone = training.train_classifier(model, inputs[index:], targets[index:], keys[index], config)
        worst = max(worst, float(np.abs(alone["params"]["Dense_0"]["kernel"] - per_seed[index]).max()))
    print(json.dumps({"devices": len(jax.devices()), "seeds": kernel.shape[0], "worst": worst,
                      "shards": len({shard.device for shard in kernel.addressable_shards}),
                      "per_seed_shards": len({shard.device for shard in per_seed.addressable_shards})}))
    """
)


@pytest.mark.slow
def test_seeds_are_sharded_across_simulated_devices_and_match_sequential_runs():
    """Six seeds over four host devices: padded to eight, two per device, the padding dropped; with shared
    data and with each seed's own data (34 to 40 rows, one capacity bucket)."""
    environment = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": str(REPO),
    }
    finished = subprocess.run(
        [sys.executable, "-c", SHARDED_RUN],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4 and report["seeds"] == 6
    assert report["shards"] == report["per_seed_shards"] == 4, (
        "the seed axis should be spread over every device"
    )
    assert report["worst"] < 1e-5


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (lambda: np.arange(3), "typed PRNG keys"),
        (lambda: jax.random.key(0), "typed PRNG keys"),
    ],
)
def test_keys_must_be_a_vector_of_typed_keys(keys, message, answered_queries, small_surrogate):
    inputs, targets = answered_queries
    with pytest.raises(ValueError, match=message):
        seeds.train_classifiers(small_surrogate.model, inputs, targets, keys(), TWO_EPOCHS)


def test_seed_keys_rejects_a_non_positive_count():
    with pytest.raises(ValueError, match="count must be an integer >= 1, got 0"):
        seeds.seed_keys(0, 0)
