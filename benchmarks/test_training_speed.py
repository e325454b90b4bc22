"""Training speed: steps per second and achieved GFLOP/s of the victims' and surrogates' training, beside a
2048^3 float32 matmul measured in the same run (the machine's practical roofline, DESIGN.md: ~84 GFLOP/s).

Each training benchmark times ``heistlab.training.train_classifier`` itself, the path every victim and
surrogate takes; a step's FLOPs come from XLA's cost analysis of one Adam step (``workloads``). The CNN rows
compare heistlab's CNN as it trains (inside the compiled loop on 8x8 images, stepped from Python on 28x28)
with both loop structures forced, with XLA's own convolution (``nn.Conv``) instead of im2col, with max-pool
downsampling instead of stride-2 convolutions, and with PyTorch's CPU step on the same architecture.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import workloads
from benchmarks.conftest import composed
from heistlab import training
from heistlab.compose import build_model_from, train_config_from
from heistlab.models import MLP

ROUNDS = 3


def timed_training(benchmark, name, model, inputs, targets, config, **info):
    steps = config.epochs * math.ceil(len(inputs) / config.batch_size)
    flops = workloads.training_step_flops(model, inputs.shape[1:], config.batch_size)
    key = jax.random.key(0)
    train = lambda: jax.block_until_ready(training.train_classifier(model, inputs, targets, key, config))
    benchmark.group = "training"
    benchmark.extra_info.update(
        kind="training", name=name, batch=config.batch_size, items_per_round=steps,
        flops_per_round=flops * steps, input_shape=list(inputs.shape[1:]), **info,
    )  # fmt: skip
    benchmark.pedantic(train, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def test_matmul_roofline(benchmark):
    size = workloads.ROOFLINE_SIZE
    left = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    right = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    product = jax.jit(jnp.matmul)
    benchmark.group = "training"
    benchmark.extra_info.update(
        kind="roofline", name=f"matmul {size}^3 float32", items_per_round=1,
        flops_per_round=workloads.matmul_flops(size),
    )  # fmt: skip
    benchmark.pedantic(lambda: product(left, right).block_until_ready(), rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("family", ["mlp", "cnn"])
@pytest.mark.parametrize("role", ["victim", "surrogate"])
def test_default_training(benchmark, splits, default_victim, role, family):
    """The default experiment's victim (its training split) and surrogate (1000 answered pool queries)."""
    spec = composed(f"{role}={family}")[role]
    model, config = build_model_from(spec, splits.num_classes), train_config_from(spec.train)
    if role == "victim":
        inputs, targets = splits.victim_train.x, training.one_hot(splits.victim_train.y, splits.num_classes)
    else:
        inputs = np.resize(splits.pool, (1000, *splits.input_shape))
        targets = default_victim.predict_proba(inputs)
    timed_training(benchmark, f"{family} {role}", model, inputs, targets, config, family=family, role=role)


@pytest.mark.parametrize("batch", [64, 256, 1024, 4096])
def test_mlp_training_by_batch(benchmark, batch):
    """MLP 64-256-256-10 at growing batches: where its matmuls are large enough to approach the roofline."""
    inputs, targets = workloads.image_data(max(4 * batch, 2048), 8)
    config = training.TrainConfig(epochs=max(1, 8192 // len(inputs) * 4), batch_size=batch)
    timed_training(benchmark, f"mlp batch {batch}", MLP(10), inputs, targets, config, family="mlp")


def cnn_epochs(side: int) -> int:
    """8 epochs of 8 steps at 8x8; 2 at 28x28, where the slow variants take seconds per epoch."""
    return 8 if side == 8 else 2


CNN_VARIANTS = {
    "as configured (heistlab)": lambda: build_model_from(composed("victim=cnn").victim, 10),
    "inside the compiled loop": lambda: workloads.LoopedCNN(10),
    "stepped from Python": lambda: workloads.SteppedCNN(10),
    "flax nn.Conv, stepped from Python": lambda: workloads.FlaxConvCNN(10),
    "max-pool, stepped from Python": lambda: workloads.FlaxConvCNN(10, max_pool=True),
}


@pytest.mark.parametrize(("side", "batch"), [(8, 64), (28, 128)])
@pytest.mark.parametrize("variant", list(CNN_VARIANTS))
def test_cnn_loop_structures(benchmark, variant, side, batch):
    """DESIGN.md measured convolutions inside ``lax`` loops ~9x slower, max-pool gradients ~7x slower.

    heistlab's CNN (im2col ``PatchConv``) loops on 8x8 images and is stepped from Python on 28x28 ones."""
    inputs, targets = workloads.image_data(8 * batch, side)
    config = training.TrainConfig(epochs=cnn_epochs(side), batch_size=batch)
    name = f"cnn {side}x{side} batch {batch}, {variant}"
    timed_training(benchmark, name, CNN_VARIANTS[variant](), inputs, targets, config, family="cnn", side=side)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("side", "batch"), [(8, 64), (28, 128)])
def test_pytorch_cnn_step(benchmark, side, batch, threads):
    """The same CNN in PyTorch (CPU, ``threads`` intra-op threads): the peer for the CNN step."""
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs, targets = workloads.image_data(8 * batch, side)
        steps = 8 * cnn_epochs(side)
        run = workloads.torch_training(workloads.torch_cnn(side), inputs, targets, batch)
        flops = workloads.training_step_flops(
            CNN_VARIANTS["as configured (heistlab)"](), (side, side, 1), batch
        )
        benchmark.group = "training"
        benchmark.extra_info.update(
            kind="training", name=f"cnn {side}x{side} batch {batch}, PyTorch {threads} thread(s)",
            family="cnn", peer="pytorch", side=side, batch=batch, threads=threads,
            items_per_round=steps, flops_per_round=flops * steps,
        )  # fmt: skip
        benchmark.pedantic(lambda: run(steps), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(previous)
