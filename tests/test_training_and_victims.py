"""Training learns, reuses compiled programs across data sizes; the victim cache refuses tampering."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heistlab import data, training, victims
from heistlab.models import CNN, PatchConv, SoftmaxRegression, build_model
from tests.conftest import FAST_TRAINING, SMALL_MLP


def test_small_victim_learns_digits(small_victim, digits_splits):
    predicted = small_victim.predict_proba(digits_splits.test.x).argmax(-1)
    assert np.mean(predicted == digits_splits.test.y) > 0.9


@pytest.mark.slow
@pytest.mark.parametrize(
    "model", [SoftmaxRegression(num_classes=4), CNN(num_classes=4, channels=(4,), hidden=8)]
)
def test_each_family_learns_a_separable_task(model):
    synthetic = data.make_synthetic(num_samples=256, num_features=16, num_classes=4, class_separation=6.0)
    x = synthetic.x.reshape(-1, 4, 4, 1)
    config = training.TrainConfig(epochs=15, batch_size=32, learning_rate=1e-2)
    params = training.train_classifier(model, x, training.one_hot(synthetic.y, 4), jax.random.key(0), config)
    assert np.mean(training.predict_labels(model, params, x) == synthetic.y) > 0.9


@pytest.mark.slow
def test_growing_data_reuses_one_compiled_program(digits_splits):
    x, y = digits_splits.victim_train.x, training.one_hot(digits_splits.victim_train.y, 10)
    config = training.TrainConfig(epochs=1, batch_size=64, learning_rate=1e-3)
    training.train_classifier(SMALL_MLP, x[:150], y[:150], jax.random.key(0), config)
    run_all = training._training_program(SMALL_MLP, 64, 1e-3).run_all
    compiled = run_all._cache_size()
    for size in (170, 190, 150):
        training.train_classifier(SMALL_MLP, x[:size], y[:size], jax.random.key(size), config)
    assert run_all._cache_size() == compiled


@pytest.mark.slow
def test_padding_rows_never_enter_the_loss(digits_splits):
    """40 rows in batches of 64: every step sees all rows, so garbage padding and capacity must not matter."""
    x, y = digits_splits.victim_train.x[:40], training.one_hot(digits_splits.victim_train.y[:40], 10)
    run_all = training._training_program(SMALL_MLP, 64, 1e-3).run_all
    params = training.init_params(SMALL_MLP, (8, 8, 1), jax.random.key(0))
    trained = []
    for capacity, fill in ((128, 0.0), (256, 7.0)):
        inputs = np.full((capacity, 8, 8, 1), fill, np.float32)
        targets = np.full((capacity, 10), fill, np.float32)
        inputs[:40], targets[:40] = x, y
        trained.append(run_all(params, inputs, targets, 40, 1, 5, jax.random.key(1)))
    for first, second in zip(*map(jax.tree.leaves, trained), strict=True):
        np.testing.assert_allclose(first, second, atol=1e-5)


def test_build_model_names_bad_family_and_option():
    with pytest.raises(
        ValueError, match="unknown model family 'rnn'; accepted: softmax_regression, mlp, cnn"
    ):
        build_model("rnn", 10)
    with pytest.raises(ValueError, match=r"no option\(s\) \['depth'\]; accepted: \['hidden'\]"):
        build_model("mlp", 10, depth=3)


def test_victim_cache_hits_and_refuses_a_tampered_checkpoint(digits_splits, tmp_path):
    config = training.TrainConfig(epochs=2, batch_size=64, learning_rate=1e-3)
    first, cached = victims.load_or_train(SMALL_MLP, digits_splits, config, 0, {"k": 1}, tmp_path)
    second, hit = victims.load_or_train(SMALL_MLP, digits_splits, config, 0, {"k": 1}, tmp_path)
    assert (cached, hit) == (False, True)
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params), strict=True):
        np.testing.assert_array_equal(a, b)
    checkpoint = next(tmp_path.glob("victims/*/params.msgpack"))
    payload = bytearray(checkpoint.read_bytes())
    payload[-5] ^= 0xFF
    checkpoint.write_bytes(bytes(payload))
    with pytest.raises(victims.TamperedCheckpointError, match="SHA-256 .* manifest recorded"):
        victims.load_or_train(SMALL_MLP, digits_splits, config, 0, {"k": 1}, tmp_path)


def test_fast_training_config_is_valid():
    assert FAST_TRAINING.validated() is FAST_TRAINING
    with pytest.raises(ValueError, match="train.epochs must be an integer >= 1, got 0"):
        training.TrainConfig(epochs=0).validated()


def test_victim_identity_follows_the_training_code(tmp_path):
    from heistlab.experiment import source_digest

    first, second = tmp_path / "a.py", tmp_path / "b.py"
    first.write_text("x = 1\n")
    second.write_text("y = 2\n")
    before = source_digest([first, second])
    assert source_digest([second, first]) == before
    first.write_text("x = 3\n")
    assert source_digest([first, second]) != before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("side", "channels", "kernel", "stride"), [(8, 1, 3, 2), (7, 3, 3, 2), (6, 2, 5, 1), (9, 2, 3, 3)]
)
def test_patch_convolution_equals_flax_convolution(side, channels, kernel, stride):
    """The CNN's im2col convolution: same parameters, same outputs as ``nn.Conv`` with SAME padding."""
    x = jax.random.uniform(jax.random.key(0), (3, side, side, channels))
    reference = nn.Conv(5, (kernel, kernel), strides=(stride, stride), padding="SAME")
    params = reference.init(jax.random.key(1), x)
    ours = PatchConv(5, (kernel, kernel), strides=(stride, stride))
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), atol=1e-5)


def test_capacity_buckets_worked_by_hand():
    assert [training.capacity_for(n) for n in (1, 64, 65, 359, 1000)] == [64, 64, 128, 512, 1024]
    # Four sizes per octave: (256, 512] splits into 320, 384, 448, 512.
    quarters = [training.capacity_for(n, steps_per_octave=4) for n in (10, 65, 100, 359, 384, 385, 1025)]
    assert quarters == [64, 80, 112, 384, 384, 448, 1280]
