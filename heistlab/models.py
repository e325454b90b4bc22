"""Classifier families for victims and surrogates: softmax regression, an MLP and a small CNN (Flax).

Every model maps inputs shaped ``(batch, H, W, C)`` to logits ``(batch, num_classes)``.
``trains_in_compiled_loop`` says how training should drive a model: dense models train fastest as one
compiled program (``lax`` loop); the CNN does on small images, while on large ones its steps ran faster
dispatched from Python (DESIGN.md measured XLA-CPU convolutions inside loops about 9x slower).

The CNN's convolutions are ``PatchConv``: im2col by strided slices, then one matmul. The same parameters and
outputs as ``flax.linen.Conv``, but XLA-CPU runs the matmul and the slices' gradients (pads) much faster than
its convolution gradients: 28x28 CNN at batch 128, 4.2 ms per training step against 6.1 ms with ``nn.Conv``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp


class SoftmaxRegression(nn.Module):
    """Multinomial logistic regression: one dense layer on the flattened input."""

    num_classes: int
    compiled_loop: ClassVar[bool] = True

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class MLP(nn.Module):
    """ReLU multilayer perceptron on the flattened input (ART's digits setting: 64-256-256-10)."""

    num_classes: int
    hidden: Sequence[int] = (256, 256)
    compiled_loop: ClassVar[bool] = True

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def same_padding(size: int, kernel: int, stride: int) -> tuple[tuple[int, int], int]:
    """``SAME`` padding (low, high) along one axis, as ``flax.linen.Conv`` pads, and the output length."""
    output = -(-size // stride)
    total = max((output - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2), output


class PatchConv(nn.Module):
    """A ``SAME``-padded 2-D convolution computed as im2col (one strided slice per kernel tap) and a matmul.

    Parameters are ``kernel`` ``(kh, kw, in, out)`` and ``bias``, initialised as ``flax.linen.Conv`` does, and
    the output equals ``nn.Conv(features, kernel_size, strides, padding="SAME")`` for the same parameters.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        (kernel_h, kernel_w), (stride_h, stride_w) = self.kernel_size, self.strides
        channels = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kernel_h, kernel_w, channels, self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        pad_h, out_h = same_padding(x.shape[1], kernel_h, stride_h)
        pad_w, out_w = same_padding(x.shape[2], kernel_w, stride_w)
        x = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
        taps = [
            x[:, i : i + (out_h - 1) * stride_h + 1 : stride_h, j : j + (out_w - 1) * stride_w + 1 : stride_w]
            for i in range(kernel_h)
            for j in range(kernel_w)
        ]
        patches = jnp.concatenate(taps, axis=-1)  # (batch, out_h, out_w, kh * kw * in), kernel's order
        return patches @ kernel.reshape(kernel_h * kernel_w * channels, self.features) + bias


class CNN(nn.Module):
    """Small CNN: 3x3 convolutions downsampling by stride 2 (max-pool gradients ran ~7x slower on XLA-CPU).

    Trained inside the compiled loop on images of up to ``looped_pixels`` pixels (8x8, batch 64: 0.40 ms per
    step against 0.80 ms stepped from Python), stepped from Python on larger ones (28x28, batch 128: 4.2 ms
    against 6.1 ms inside the loop).
    """

    num_classes: int
    channels: Sequence[int] = (16, 32)
    hidden: int = 64
    compiled_loop: ClassVar[bool] = False
    looped_pixels: ClassVar[int] = 256

    @nn.compact
    def __call__(self, x):
        for index, width in enumerate(self.channels):
            x = nn.relu(PatchConv(width, (3, 3), strides=(2, 2), name=f"Conv_{index}")(x))
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def trains_in_compiled_loop(model: nn.Module, input_shape: Sequence[int]) -> bool:
    """Whether training (and PGD) on inputs shaped ``(H, W, C)`` runs inside one compiled loop.

    A user's module (``victim=flax``) that does not say is stepped from Python, which suits every model.
    """
    looped = getattr(model, "compiled_loop", False)
    return looped or math.prod(input_shape[:-1]) <= getattr(model, "looped_pixels", 0)


MODEL_FAMILIES = {"softmax_regression": SoftmaxRegression, "mlp": MLP, "cnn": CNN}


def build_model(family: str, num_classes: int, **options) -> nn.Module:
    """Builds a model by family name (``softmax_regression``, ``mlp``, ``cnn``) with its options."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; accepted: {', '.join(MODEL_FAMILIES)}")
    cls = MODEL_FAMILIES[family]
    accepted = {
        name
        for name, field in cls.__dataclass_fields__.items()
        if field._field_type is dataclasses._FIELD and name not in ("num_classes", "parent", "name")
    }
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(
            f"model family {family!r} has no option(s) {sorted(unknown)}; accepted: {sorted(accepted)}"
        )
    options = {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}
    return cls(num_classes=num_classes, **options)
