"""The model zoo: architectures as the papers describe them, batch norm in training and inference, bf16."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heistlab import training
from heistlab.models import PatchConv, ResNet, build_model


def conv(kernel: int, inputs: int, outputs: int, bias: bool = False) -> int:
    return kernel * kernel * inputs * outputs + (outputs if bias else 0)


def norm(channels: int) -> int:
    return 2 * channels  # scale and bias; the running averages are batch_stats, not parameters


def dense(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs


def resnet20_parameters() -> int:
    """He et al.'s CIFAR ResNet-20, counted layer by layer; option A shortcuts have no parameters."""
    total = conv(3, 3, 16) + norm(16)
    previous = 16
    for width in (16, 32, 64):
        for _ in range(3):
            total += conv(3, previous, width) + conv(3, width, width) + 2 * norm(width)
            previous = width
    return total + dense(64, 10)


def wrn16_4_parameters() -> int:
    """WRN-16-4: two pre-activation blocks per stage, a 1x1 projection where the width changes."""
    total, previous = conv(3, 3, 16), 16
    for width in (64, 128, 256):
        for _ in range(2):
            total += norm(previous) + conv(3, previous, width) + norm(width) + conv(3, width, width)
            total += conv(1, previous, width) if previous != width else 0
            previous = width
    return total + norm(256) + dense(256, 10)


def lenet5_parameters() -> int:
    return (
        conv(5, 1, 6, True) + conv(5, 6, 16, True) + dense(16 * 5 * 5, 120) + dense(120, 84) + dense(84, 10)
    )


def shapes(model: nn.Module, input_shape: tuple[int, ...], batch: int = 3):
    """Variables' and logits' shapes, traced without computing anything."""
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
    logits = jax.eval_shape(model.apply, variables, jnp.zeros((batch, *input_shape)))
    return variables, logits


def parameter_count(variables) -> int:
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]))


@pytest.mark.parametrize(
    ("family", "input_shape", "expected", "by_layer"),
    [
        ("lenet5", (28, 28, 1), 61_706, lenet5_parameters),
        ("resnet20", (32, 32, 3), 269_722, resnet20_parameters),
        ("wrn16_4", (32, 32, 3), 2_748_890, wrn16_4_parameters),
    ],
)
def test_zoo_models_have_the_papers_parameter_counts_and_logits(family, input_shape, expected, by_layer):
    variables, logits = shapes(build_model(family, 10), input_shape)
    assert parameter_count(variables) == expected == by_layer()
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert ("batch_stats" in variables) == (family != "lenet5")


def test_lenet5_takes_other_sizes_and_refuses_tiny_images():
    _, logits = shapes(build_model("lenet5", 10), (32, 32, 3))
    assert logits.shape == (3, 10)
    with pytest.raises(ValueError, match="at least 12x12 pixels, got 8x8"):
        shapes(build_model("lenet5", 10), (8, 8, 1))


def test_bad_options_name_what_is_accepted():
    with pytest.raises(ValueError, match="unknown compute dtype 'float8'; accepted: float32, bfloat16"):
        build_model("resnet20", 10, dtype="float8")
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4.*got 15"):
        shapes(build_model("wrn16_4", 10, depth=15), (32, 32, 3))


@pytest.mark.slow
@pytest.mark.parametrize(("padding", "bias"), [("SAME", True), ("VALID", False)])
def test_patch_conv_equals_flax_conv(padding, bias):
    x = jax.random.uniform(jax.random.key(1), (2, 9, 7, 3))
    patch = PatchConv(5, (3, 3), (2, 2), padding=padding, use_bias=bias)
    variables = patch.init(jax.random.key(2), x)
    reference = nn.Conv(5, (3, 3), (2, 2), padding=padding, use_bias=bias).apply(variables, x)
    np.testing.assert_allclose(patch.apply(variables, x), reference, atol=1e-5)


TINY_RESNET = ResNet(num_classes=4, blocks_per_stage=1, widths=(4, 8))
infer = jax.jit(TINY_RESNET.apply)
train_pass = jax.jit(
    lambda variables, x: TINY_RESNET.apply(variables, x, train=True, mutable=["batch_stats"])
)


stem_apply = jax.jit(PatchConv(4, (3, 3), use_bias=False).apply)


def first_batch_norm_input(variables, x):
    """What the first batch norm normalises: the stem convolution of ``x``."""
    return stem_apply({"params": variables["params"]["Conv_0"]}, x)


@pytest.mark.slow
def test_a_training_pass_updates_running_averages_by_the_batch_statistics():
    x = jax.random.uniform(jax.random.key(3), (6, 8, 8, 3))
    variables = training.init_params(TINY_RESNET, (8, 8, 3), jax.random.key(4))
    _, updated = train_pass(variables, x)
    batch_mean = first_batch_norm_input(variables, x).mean(axis=(0, 1, 2))
    # Momentum 0.9 from the initial running mean of 0.
    np.testing.assert_allclose(updated["batch_stats"]["BatchNorm_0"]["mean"], 0.1 * batch_mean, atol=1e-6)


@pytest.mark.slow
def test_inference_uses_the_running_averages_and_is_batch_independent():
    x = jax.random.uniform(jax.random.key(5), (6, 8, 8, 3))
    variables = training.init_params(TINY_RESNET, (8, 8, 3), jax.random.key(6))
    together = infer(variables, x)
    one_by_one = jnp.concatenate([infer(variables, x[i : i + 1]) for i in range(6)])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    np.testing.assert_array_equal(together, infer(variables, x))
    shifted = jax.tree_util.tree_map(lambda leaf: leaf + 0.5, variables["batch_stats"])
    assert not np.allclose(infer({**variables, "batch_stats": shifted}, x), together, atol=1e-3)
    assert not np.allclose(train_pass(variables, x)[0], together)


@pytest.mark.slow
def test_training_updates_statistics_from_real_rows_only_and_keeps_them_for_prediction():
    # Five identical images in a batch of 16: the statistics are the image's, whatever the padding.
    image = jax.random.uniform(jax.random.key(7), (1, 8, 8, 3))
    inputs = np.repeat(np.asarray(image), 5, axis=0)
    start = training.init_params(TINY_RESNET, (8, 8, 3), jax.random.key(8))
    config = training.TrainConfig(epochs=1, batch_size=16)
    targets = training.one_hot(np.arange(5) % 4, 4)
    trained = training.train_classifier(TINY_RESNET, inputs, targets, jax.random.key(9), config, start)
    expected = 0.1 * first_batch_norm_input(start, image).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(trained["batch_stats"]["BatchNorm_0"]["mean"], expected, atol=1e-6)
    assert trained["batch_stats"]["Stage_1_Block_0"]["BatchNorm_1"]["var"].min() != 1.0
    probabilities = training.predict_proba(TINY_RESNET, trained, inputs)
    np.testing.assert_allclose(probabilities, jax.nn.softmax(infer(trained, inputs)), atol=1e-6)


@pytest.mark.slow
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_parameters():
    low = ResNet(num_classes=4, blocks_per_stage=1, widths=(4, 8), dtype="bfloat16")
    x = np.asarray(jax.random.uniform(jax.random.key(10), (8, 8, 8, 3)))
    variables = training.init_params(low, (8, 8, 3), jax.random.key(11))
    assert "bf16" in str(jax.make_jaxpr(lambda v: low.apply(v, x))(variables))
    reference = infer(variables, x)
    logits = jax.jit(low.apply)(variables, x)
    assert logits.dtype == jnp.float32 and not np.array_equal(logits, reference)
    np.testing.assert_allclose(logits, reference, atol=0.1)
    targets = training.one_hot(np.arange(8) % 4, 4)
    config = training.TrainConfig(epochs=2, batch_size=4)
    trained = training.train_classifier(low, x, targets, jax.random.key(12), config)
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(trained)}
    assert dtypes == {jnp.dtype("float32")}
