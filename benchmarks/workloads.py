"""What the benchmarks run: FLOP counts, model variants, PyTorch twins of heistlab's models, FGSM/PGD.

FLOP counts come from XLA's own cost analysis of one compiled training step (forward, backward and the Adam
update), so a GFLOP/s figure is the work XLA was asked to do divided by the time it took.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from heistlab.models import CNN

ROOFLINE_SIZE = 2048


def matmul_flops(size: int = ROOFLINE_SIZE) -> float:
    return 2.0 * size**3


def compiled_flops(function: Callable, *arguments) -> float:
    """XLA's FLOP count for ``function`` compiled on ``arguments``."""
    analysis = jax.jit(function).lower(*arguments).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
    return float(analysis["flops"])


def training_step_flops(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> float:
    """FLOPs of one Adam step of softmax cross-entropy on ``batch_size`` rows (heistlab's training step)."""
    optimizer = optax.adam(1e-3)
    params = model.init(jax.random.key(0), jnp.zeros((1, *input_shape)))
    inputs = jnp.zeros((batch_size, *input_shape))
    targets = jnp.full((batch_size, model.num_classes), 1.0 / model.num_classes)

    def step(params, opt_state, inputs, targets):
        loss = lambda p: -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(model.apply(p, inputs)), -1))
        updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return compiled_flops(step, params, optimizer.init(params), inputs, targets)


class LoopedCNN(CNN):
    """heistlab's CNN trained inside the compiled ``lax`` loop whatever the image size."""

    compiled_loop: ClassVar[bool] = True


class SteppedCNN(CNN):
    """heistlab's CNN stepped from Python whatever the image size."""

    looped_pixels: ClassVar[int] = 0


class FlaxConvCNN(nn.Module):
    """The CNN on ``flax.linen.Conv`` (XLA's convolution) instead of im2col ``PatchConv``, stepped from
    Python; with ``max_pool``, 2x2 max-pooling after stride-1 convolutions instead of stride-2 ones."""

    num_classes: int
    max_pool: bool = False
    channels: tuple[int, ...] = (16, 32)
    hidden: int = 64
    compiled_loop: ClassVar[bool] = False

    @nn.compact
    def __call__(self, x):
        for width in self.channels:
            if self.max_pool:
                x = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(x))
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            else:
                x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME")(x))
        x = jnp.reshape(x, (x.shape[0], -1))
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.hidden)(x)))


def image_data(count: int, side: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Uniform ``(count, side, side, 1)`` inputs with one-hot targets of random classes."""
    rng = np.random.default_rng(seed)
    inputs = rng.uniform(size=(count, side, side, 1)).astype(np.float32)
    return inputs, np.eye(classes, dtype=np.float32)[rng.integers(0, classes, count)]


def torch_cnn(side: int, channels: tuple[int, ...] = (16, 32), hidden: int = 64, classes: int = 10):
    """heistlab's CNN in PyTorch: 3x3 stride-2 convolutions ('SAME' padding), a dense layer, logits out."""
    import torch

    layers: list[torch.nn.Module] = []
    width_in = 1
    for width in channels:
        layers += [torch.nn.Conv2d(width_in, width, 3, stride=2, padding=1), torch.nn.ReLU()]
        width_in, side = width, (side + 1) // 2
    flat = width_in * side * side
    return torch.nn.Sequential(
        *layers,
        torch.nn.Flatten(),
        torch.nn.Linear(flat, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, classes),
    )


def torch_training(model, inputs: np.ndarray, targets: np.ndarray, batch_size: int) -> Callable[[int], None]:
    """A function running ``steps`` Adam steps of soft-target cross-entropy on shuffled minibatches.

    Inputs are NHWC as in heistlab and are handed to PyTorch as NCHW once, outside the timed steps.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(inputs.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(targets)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def run(steps: int) -> None:
        for _ in range(steps):
            rows = torch.randint(0, len(x), (batch_size,), generator=generator)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()

    return run


@functools.lru_cache(maxsize=8)
def _reference_pgd(model: nn.Module):
    """A small jitted L-inf PGD (Madry et al. 2018); FGSM is its one-step case without random start."""

    def loss(params, inputs, labels):
        log_probs = jax.nn.log_softmax(model.apply(params, inputs))
        return -jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))

    @functools.partial(jax.jit, static_argnames=("steps", "random_start"))
    def craft(params, clean, labels, key, epsilon, step_size, steps, random_start):
        start = clean + jax.random.uniform(key, clean.shape, minval=-epsilon, maxval=epsilon)
        adversarial = jnp.clip(start, 0.0, 1.0) if random_start else clean

        def step(_, current):
            gradient = jax.grad(loss, argnums=1)(params, current, labels)
            moved = current + step_size * jnp.sign(gradient)
            return jnp.clip(jnp.clip(moved, clean - epsilon, clean + epsilon), 0.0, 1.0)

        return jax.lax.fori_loop(0, steps, step, adversarial)

    return craft


def evasion_crafters(epsilon: float, step_size: float, steps: int) -> tuple[str, Callable, Callable]:
    """heistlab's FGSM and PGD crafting functions ``(model, params, inputs, labels, key) -> adversarial``.

    Uses ``attacks.evasion`` when it provides them, else the small reference above; the name says which.
    """
    try:
        from heistlab.attacks.evasion import fgsm, pgd

        fgsm_craft = fgsm(epsilon=epsilon).craft
        pgd_craft = pgd(epsilon=epsilon, step_size=step_size, steps=steps, random_start=True).craft
        return "heistlab.attacks.evasion", fgsm_craft, pgd_craft
    except (ImportError, AttributeError, TypeError):
        pass

    def reference(steps_taken: int, size: float, random_start: bool):
        def craft(model, params, inputs, labels, key):
            program = _reference_pgd(model)
            return np.asarray(
                program(
                    params,
                    jnp.asarray(inputs),
                    jnp.asarray(labels),
                    key,
                    epsilon,
                    size,
                    steps_taken,
                    random_start,
                )
            )

        return craft

    return "benchmarks.workloads", reference(1, epsilon, False), reference(steps, step_size, True)
