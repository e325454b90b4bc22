"""The paper-scale path end to end: a ResNet-20 victim on CIFAR-shaped synthetic data, attacked from the
command line; batch-norm models trained for several seeds in one program."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from heistlab import data, seeds, training
from heistlab.attacks import dfme
from heistlab.attacks.base import Surrogate
from heistlab.models import ResNet
from heistlab.results import read_results
from tests.test_attack_contract import CountingOracle
from tests.test_end_to_end import run_cli

# Sized so that few ResNet-20 programs compile (most of this test's time on a cold cache): 336 victim images
# in batches of 12 are 28 steps an epoch, a multiple of training.STEPS_PER_CALL, so no single-step program;
# the 128 queries and 128 uniform rows share the 120-row test split's 128-row padding bucket.
PAPER_SHAPED = [
    "data=synthetic_cifar",
    "data.synthetic.num_samples=600",
    "data.victim_fraction=0.7",
    "victim=resnet20",
    "victim.train.epochs=3",
    "victim.train.batch_size=12",
    "surrogate=resnet20",
    "surrogate.train.epochs=2",
    "eval.uniform_samples=128",
]


@pytest.mark.slow
def test_a_resnet20_victim_on_synthetic_cifar_is_attacked_from_the_command_line(tmp_path, cache_dir):
    budget = 128
    overrides = [*PAPER_SHAPED, "attack=knockoff", f"attack.budget={budget}", f"hydra.run.dir={tmp_path}"]
    finished = run_cli(overrides, cache_dir)
    assert finished.returncode == 0, finished.stderr
    record = read_results(tmp_path)
    metrics = record["metrics"]
    assert record["status"] == "complete" and record["config"]["victim"]["family"] == "resnet20"
    assert metrics["queries_served"] == budget and metrics["queries_refused"] == 0
    # 336 synthetic training images, 84 steps: the victim learns well above chance (0.1).
    assert metrics["victim_accuracy"] > 0.3
    assert 0.0 <= metrics["fidelity_test"] <= 1.0 and 0.0 <= metrics["surrogate_accuracy"] <= 1.0


@pytest.mark.slow
def test_batch_norm_models_train_several_seeds_in_one_program_like_their_sequential_runs():
    # heistlab/models_test.py's tiny ResNet, 8x8x3 images in batches of 16 in a 64-row bucket, as there: the
    # sequential training program is the same one, compiled once for both tests.
    model = ResNet(num_classes=4, blocks_per_stage=1, widths=(4, 8))
    images = data.make_synthetic_images(num_samples=40, image_shape=(8, 8, 3), num_classes=4)
    targets = training.one_hot(images.y, 4)
    config = training.TrainConfig(epochs=2, batch_size=16)
    keys = seeds.seed_keys(0, 2)
    stacked = seeds.train_classifiers(model, images.x, targets, keys, config)
    for index in range(2):
        sequential = training.train_classifier(model, images.x, targets, keys[index], config)
        difference = jax.tree_util.tree_map(
            lambda a, b: float(np.max(np.abs(a - b))), seeds.params_for_seed(stacked, index), sequential
        )
        assert max(jax.tree_util.tree_leaves(difference)) < 1e-4
    assert "batch_stats" in stacked and stacked["batch_stats"]["BatchNorm_0"]["mean"].shape == (2, 4)


@pytest.mark.slow
def test_dfme_trains_a_batch_norm_student_and_its_running_statistics():
    student = Surrogate(ResNet(num_classes=10, blocks_per_stage=1, widths=(4, 8)), training.TrainConfig())
    pool = np.zeros((1, 8, 8, 1), np.float32)  # DFME needs no data; the pool only gives the shape
    attack = dfme(budget=8 * 2 + 8 * 2, batch_size=8, student_steps=2, generator_hidden=(32,))
    result = attack.run(CountingOracle(cap=None).oracle(), pool, student, jax.random.key(0))
    start = training.init_params(student.model, (8, 8, 1), jax.random.split(jax.random.key(0), 3)[0])
    assert result.queries == 32 and result.rounds[0]["student_loss"] is not None
    moved = result.params["batch_stats"]["BatchNorm_0"]["mean"] - start["batch_stats"]["BatchNorm_0"]["mean"]
    assert np.abs(moved).max() > 0
