"""Classifier families for victims and surrogates: softmax regression, an MLP and a small CNN (Flax).

Every model maps inputs shaped ``(batch, H, W, C)`` to logits ``(batch, num_classes)``. ``compiled_loop``
says how training should drive it: dense models train fastest as one compiled program (``lax`` loop),
while XLA-CPU convolutions inside ``lax.scan``/``while`` ran about 9x slower than the same jitted step
driven from Python on these machines (DESIGN.md), so the CNN is stepped from Python.
"""

from __future__ import annotations

import dataclasses
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


class CNN(nn.Module):
    """Small CNN: 3x3 convolutions downsampling by stride 2 (max-pool gradients ran ~7x slower on XLA-CPU)."""

    num_classes: int
    channels: Sequence[int] = (16, 32)
    hidden: int = 64
    compiled_loop: ClassVar[bool] = False

    @nn.compact
    def __call__(self, x):
        for width in self.channels:
            x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME")(x))
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


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
