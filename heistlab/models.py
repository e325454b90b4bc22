"""Classifier families for victims and surrogates (Flax): softmax regression, an MLP, a small CNN, and the
papers' image models: LeNet-5, ResNet-20 and a WideResNet (WRN-16-4) with batch normalisation.

Every model maps inputs shaped ``(batch, H, W, C)`` to logits ``(batch, num_classes)``. Models with batch
normalisation take ``train``: ``True`` normalises by the batch's statistics and updates the running averages
in the ``batch_stats`` collection (``heistlab.training`` applies them so, with ``mutable=["batch_stats"]``),
``False`` (the default, used by every prediction) normalises by the running averages. The zoo's ``dtype``
option sets the compute precision (``bfloat16`` for accelerators); parameters and logits stay float32.
``trains_in_compiled_loop`` says how training should drive a model: dense models train fastest as one
compiled program (``lax`` loop); the CNN does on small images, while on large ones its steps ran faster
dispatched from Python (DESIGN.md measured XLA-CPU convolutions inside loops about 9x slower).

The convolutions of the CNN and the zoo are ``PatchConv``: im2col by strided slices, then one matmul. Same
parameters and outputs as ``flax.linen.Conv``, but XLA-CPU runs the matmul and the slices' gradients (pads)
much faster than its convolution gradients: 28x28 CNN at batch 128, 4.2 ms per training step against 6.1 ms
with ``nn.Conv``. The zoo's models are stepped from Python.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

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


def valid_padding(size: int, kernel: int, stride: int) -> tuple[tuple[int, int], int]:
    """``VALID`` padding (none) along one axis, and the output length."""
    if size < kernel:
        raise ValueError(
            f"a VALID convolution of kernel {kernel} needs inputs of at least {kernel}, got {size}"
        )
    return (0, 0), (size - kernel) // stride + 1


PADDINGS = {"SAME": same_padding, "VALID": valid_padding}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(name: str) -> jnp.dtype:
    """The dtype a model computes in, by name; parameters are float32 whatever it is."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; accepted: {', '.join(COMPUTE_DTYPES)}")
    return jnp.dtype(name)


class PatchConv(nn.Module):
    """A 2-D convolution computed as im2col (one strided slice per kernel tap) and a matmul.

    Parameters are ``kernel`` ``(kh, kw, in, out)`` and ``bias`` (without ``use_bias``, none), initialised as
    ``flax.linen.Conv`` does, and the output equals ``nn.Conv(features, kernel_size, strides, padding)`` for
    the same parameters and ``padding`` ``SAME`` or ``VALID``. With ``dtype`` the inputs and kernel are cast
    to it before the matmul (parameters stay float32).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str = "SAME"
    use_bias: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        (kernel_h, kernel_w), (stride_h, stride_w) = self.kernel_size, self.strides
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown padding {self.padding!r}; accepted: {', '.join(PADDINGS)}")
        channels = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kernel_h, kernel_w, channels, self.features)
        )
        if self.dtype is not None:
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        pad_h, out_h = PADDINGS[self.padding](x.shape[1], kernel_h, stride_h)
        pad_w, out_w = PADDINGS[self.padding](x.shape[2], kernel_w, stride_w)
        x = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
        taps = [
            x[:, i : i + (out_h - 1) * stride_h + 1 : stride_h, j : j + (out_w - 1) * stride_w + 1 : stride_w]
            for i in range(kernel_h)
            for j in range(kernel_w)
        ]
        patches = jnp.concatenate(taps, axis=-1)  # (batch, out_h, out_w, kh * kw * in), kernel's order
        out = patches @ kernel.reshape(kernel_h * kernel_w * channels, self.features)
        if not self.use_bias:
            return out
        return out + self.param("bias", nn.initializers.zeros, (self.features,)).astype(out.dtype)


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


def average_pool(x: jnp.ndarray, size: int = 2) -> jnp.ndarray:
    """Non-overlapping ``size`` x ``size`` mean pooling by reshape (odd edges cropped): fast on XLA-CPU."""
    batch, height, width, channels = x.shape
    height, width = height - height % size, width - width % size
    blocks = x[:, :height, :width].reshape(batch, height // size, size, width // size, size, channels)
    return blocks.mean(axis=(2, 4))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., "Gradient-based learning applied to document recognition", 1998), as used on
    MNIST-sized inputs: 5x5 convolution to 6 maps (``SAME``: 28x28 stays 28x28, as the paper's 32x32 input
    with a border does), 2x2 average pooling, 5x5 ``VALID`` convolution to 16 maps, pooling, then dense layers
    of 120 and 84 units. ReLU replaces the paper's scaled tanh. Any input of at least 12x12 pixels.
    """

    num_classes: int
    dtype: str = "float32"
    compiled_loop: ClassVar[bool] = False

    @nn.compact
    def __call__(self, x):
        if min(x.shape[1:3]) < 12:
            raise ValueError(f"LeNet-5 needs inputs of at least 12x12 pixels, got {x.shape[1]}x{x.shape[2]}")
        dtype = compute_dtype(self.dtype)
        x = nn.relu(PatchConv(6, (5, 5), dtype=dtype, name="Conv_0")(x))
        x = nn.relu(PatchConv(16, (5, 5), padding="VALID", dtype=dtype, name="Conv_1")(average_pool(x)))
        x = average_pool(x).reshape((x.shape[0], -1))
        for index, width in enumerate((120, 84)):
            x = nn.relu(nn.Dense(width, dtype=dtype, name=f"Dense_{index}")(x))
        return nn.Dense(self.num_classes, dtype=dtype, name="Dense_2")(x).astype(jnp.float32)


def batch_norm(train: bool, dtype: jnp.dtype, name: str) -> nn.BatchNorm:
    """Batch normalisation as the ResNet papers use it (momentum 0.9 on the running averages, eps 1e-5)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


class ResidualBlock(nn.Module):
    """He et al. 2016's basic block: conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU.

    When the block halves the resolution and widens, the shortcut is the paper's CIFAR option A: the input
    subsampled by 2 with its new channels zero (no parameters).
    """

    features: int
    stride: int
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        conv = lambda stride, name: PatchConv(
            self.features, (3, 3), (stride, stride), use_bias=False, dtype=self.dtype, name=name
        )
        y = nn.relu(batch_norm(train, self.dtype, "BatchNorm_0")(conv(self.stride, "Conv_0")(x)))
        y = batch_norm(train, self.dtype, "BatchNorm_1")(conv(1, "Conv_1")(y))
        shortcut = x[:, :: self.stride, :: self.stride]
        extra = self.features - shortcut.shape[-1]
        if extra:
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, extra)))
        return nn.relu(y + shortcut.astype(y.dtype))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2:
    a 3x3 convolution to ``widths[0]`` maps, then one stage per width of ``blocks_per_stage`` basic blocks
    (the second and third stages start at stride 2), global average pooling and a dense layer. The defaults
    are ResNet-20 (6n+2 layers for n = 3; 0.27M parameters); n = 5, 7, 9 give ResNet-32, 44, 56.
    """

    num_classes: int
    blocks_per_stage: int = 3
    widths: Sequence[int] = (16, 32, 64)
    dtype: str = "float32"
    compiled_loop: ClassVar[bool] = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        x = PatchConv(self.widths[0], (3, 3), use_bias=False, dtype=dtype, name="Conv_0")(x)
        x = nn.relu(batch_norm(train, dtype, "BatchNorm_0")(x))
        for stage, width in enumerate(self.widths):
            for block in range(self.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                x = ResidualBlock(width, stride, dtype, name=f"Stage_{stage}_Block_{block}")(x, train)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=dtype, name="Dense_0")(x).astype(jnp.float32)


class WideBlock(nn.Module):
    """Zagoruyko & Komodakis 2016's pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut,
    a 1x1 convolution of the pre-activated input where the width or resolution changes (no dropout)."""

    features: int
    stride: int
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        strides = (self.stride, self.stride)
        conv = lambda kernel, stride, name: PatchConv(
            self.features, kernel, stride, use_bias=False, dtype=self.dtype, name=name
        )
        activated = nn.relu(batch_norm(train, self.dtype, "BatchNorm_0")(x))
        y = conv((3, 3), strides, "Conv_0")(activated)
        y = nn.relu(batch_norm(train, self.dtype, "BatchNorm_1")(y))
        y = conv((3, 3), (1, 1), "Conv_1")(y)
        if self.stride == 1 and x.shape[-1] == self.features:
            return y + x.astype(y.dtype)
        return y + conv((1, 1), strides, "Shortcut")(activated)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` of Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016): a 3x3
    convolution to 16 maps, three stages of (depth - 4) / 6 wide blocks of 16k, 32k, 64k maps (the second and
    third at stride 2), BN-ReLU, global average pooling and a dense layer. Defaults: WRN-16-4 (2.75M
    parameters), the paper's WRN-16-4 without dropout.
    """

    num_classes: int
    depth: int = 16
    widen: int = 4
    dtype: str = "float32"
    compiled_loop: ClassVar[bool] = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(
                f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28...), got {self.depth}"
            )
        if self.widen < 1:
            raise ValueError(f"WideResNet widen must be an integer >= 1, got {self.widen}")
        dtype = compute_dtype(self.dtype)
        x = PatchConv(16, (3, 3), use_bias=False, dtype=dtype, name="Conv_0")(x)
        for stage, width in enumerate((16 * self.widen, 32 * self.widen, 64 * self.widen)):
            for block in range((self.depth - 4) // 6):
                stride = 2 if stage > 0 and block == 0 else 1
                x = WideBlock(width, stride, dtype, name=f"Stage_{stage}_Block_{block}")(x, train)
        x = nn.relu(batch_norm(train, dtype, "BatchNorm_0")(x)).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=dtype, name="Dense_0")(x).astype(jnp.float32)


def trains_in_compiled_loop(model: nn.Module, input_shape: Sequence[int]) -> bool:
    """Whether training (and PGD) on inputs shaped ``(H, W, C)`` runs inside one compiled loop.

    A user's module (``victim=flax``) that does not say is stepped from Python, which suits every model.
    """
    looped = getattr(model, "compiled_loop", False)
    return looped or math.prod(input_shape[:-1]) <= getattr(model, "looped_pixels", 0)


MODEL_FAMILIES = {
    "softmax_regression": SoftmaxRegression,
    "mlp": MLP,
    "cnn": CNN,
    "lenet5": LeNet5,
    "resnet20": ResNet,
    "wrn16_4": WideResNet,
}


def build_model(family: str, num_classes: int, **options) -> nn.Module:
    """Builds a model by family name (one of ``MODEL_FAMILIES``) with its options."""
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
    if "dtype" in options:
        compute_dtype(options["dtype"])
    return cls(num_classes=num_classes, **options)
