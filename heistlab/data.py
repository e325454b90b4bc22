"""Data sets and the seeded, disjoint splits an extraction experiment needs.

Every data set is a ``Dataset`` of float32 inputs in ``[0, 1]`` shaped ``(N, H, W, C)`` and int32 labels. An
experiment splits it three ways: the victim's training data, the attacker's pool (inputs only: the attacker
learns labels by querying) and a test set on which accuracy and fidelity are measured. The attacker's pool is
drawn from the same data set (``in_distribution``), from another data set with the same input shape, or from
uniform noise.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import NamedTuple

import numpy as np

POOL_SOURCES = ("in_distribution", "uniform")
DOWNLOADABLE = ("mnist", "fashion_mnist", "cifar10")


class Dataset(NamedTuple):
    """Inputs ``x`` (float32 in [0, 1], ``(N, H, W, C)``) and labels ``y`` (int32, ``(N,)``)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def take(self, indices: np.ndarray) -> Dataset:
        return self._replace(x=self.x[indices], y=self.y[indices])


class Splits(NamedTuple):
    """Disjoint parts of one experiment: the victim's training set, the attacker's pool, the test set."""

    victim_train: Dataset
    pool: np.ndarray
    test: Dataset

    @property
    def num_classes(self) -> int:
        return self.test.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.test.input_shape


def digits_file() -> Path:
    """The digits CSV inside scikit-learn's installed package, found without importing scikit-learn (~2 s)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits data set ships with scikit-learn: pip install scikit-learn")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


def load_digits() -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 samples, 10 classes), shipped inside its wheel.

    Read straight from the wheel's ``digits.csv.gz`` (64 pixel values in 0..16, then the label per row), the
    file ``sklearn.datasets.load_digits`` reads.
    """
    path = digits_file()
    stat = path.stat()
    table = _parsed_csv(str(path), stat.st_mtime_ns, stat.st_size)
    x = (table[:, :64] / 16.0).reshape(-1, 8, 8, 1)
    return Dataset(x=x, y=table[:, 64].astype(np.int32), num_classes=10, name="digits")


@functools.lru_cache(maxsize=4)
def _parsed_csv(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """A CSV file of numbers, parsed once per process for each version of the file (its time and size); the
    array is read-only, and callers build new arrays from it."""
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    table.flags.writeable = False
    return table


def make_synthetic(
    num_samples: int = 2000,
    num_features: int = 20,
    num_classes: int = 4,
    class_separation: float = 3.0,
    seed: int = 0,
) -> Dataset:
    """A seeded Gaussian mixture: one unit-variance cluster per class, squashed into [0, 1] by a logistic.

    Cluster centres are drawn with norm ``class_separation``; any dimension and class count, for scale tests.
    Inputs are shaped ``(N, num_features, 1, 1)`` so that every model family accepts them.
    """
    _check_positive_ints(num_samples=num_samples, num_features=num_features)
    if num_classes < 2:
        raise ValueError(f"synthetic: num_classes must be an integer >= 2, got {num_classes!r}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, num_features))
    centres *= class_separation / np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, num_classes, size=num_samples).astype(np.int32)
    latent = centres[y] + rng.normal(size=(num_samples, num_features))
    x = (1.0 / (1.0 + np.exp(-latent))).astype(np.float32)[:, :, None, None]
    return Dataset(x=x, y=y, num_classes=num_classes, name="synthetic")


def make_synthetic_images(
    num_samples: int = 2000,
    image_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    class_separation: float = 1.0,
    grid: int = 4,
    seed: int = 0,
) -> Dataset:
    """Seeded images in CIFAR-10's shape (32x32x3, 10 classes by default), for paper-scale runs without data.

    Each class has a prototype: a ``grid`` x ``grid`` pattern per channel of Gaussian values with standard
    deviation ``class_separation``, enlarged to the image size (nearest neighbour). An image is its
    class's prototype plus an enlarged pattern of unit noise and unit pixel noise, squashed into [0, 1] by a
    logistic: coarse, class-dependent structure that convolutions learn, and no two images alike.
    """
    image_shape = tuple(image_shape)
    _check_positive_ints(num_samples=num_samples, grid=grid)
    if len(image_shape) != 3 or any(not isinstance(size, int) or size < 1 for size in image_shape):
        raise ValueError(
            f"synthetic: image_shape must be three positive integers [H, W, C], got {image_shape!r}"
        )
    if num_classes < 2:
        raise ValueError(f"synthetic: num_classes must be an integer >= 2, got {num_classes!r}")
    height, width, channels = image_shape
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=num_samples).astype(np.int32)
    prototypes = class_separation * rng.normal(size=(num_classes, grid, grid, channels))
    coarse = prototypes[y] + rng.normal(size=(num_samples, grid, grid, channels))
    rows, cols = np.arange(height) * grid // height, np.arange(width) * grid // width
    latent = coarse[:, rows][:, :, cols] + rng.normal(size=(num_samples, *image_shape))
    x = (1.0 / (1.0 + np.exp(-latent))).astype(np.float32)
    return Dataset(x=x, y=y, num_classes=num_classes, name="synthetic_cifar")


def _check_positive_ints(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"synthetic: {name} must be an integer >= 1, got {value!r}")


def load_downloaded(name: str, data_dir: str | None, download: bool) -> Dataset:
    """MNIST, Fashion-MNIST or CIFAR-10, downloaded and verified by ``heistlab.downloads``.

    The official train and test parts are joined; ``make_splits`` draws its own seeded disjoint splits.
    """
    from heistlab import downloads

    raw = downloads.LOADERS[name](data_dir=data_dir, download=download)
    return Dataset(
        x=np.concatenate([raw.x_train, raw.x_test]),
        y=np.concatenate([raw.y_train, raw.y_test]).astype(np.int32),
        num_classes=raw.num_classes,
        name=name,
    )


DATASETS = ("digits", "synthetic", "synthetic_cifar", *DOWNLOADABLE)


def load_dataset(
    name: str, *, data_dir: str | None = None, download: bool = True, synthetic: dict | None = None
) -> Dataset:
    """Loads a data set by name; ``synthetic`` holds ``make_synthetic``'s (or ``make_synthetic_images``'s)
    arguments."""
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return make_synthetic(**(synthetic or {}))
    if name == "synthetic_cifar":
        return make_synthetic_images(**(synthetic or {}))
    if name in DOWNLOADABLE:
        return load_downloaded(name, data_dir, download)
    raise ValueError(f"unknown data set {name!r}; accepted: {', '.join(DATASETS)}")


def make_splits(
    dataset: Dataset,
    *,
    seed: int,
    test_fraction: float = 0.2,
    victim_fraction: float = 0.4,
    pool_source: str = "in_distribution",
    pool_size: int | None = None,
    pool_dataset: Dataset | None = None,
) -> Splits:
    """Seeded disjoint splits: test set, victim training set, attacker pool.

    ``test_fraction`` of the data is the test set; ``victim_fraction`` of the rest trains the victim, and the
    remainder is the attacker's in-distribution pool. With ``pool_source='uniform'`` the pool is uniform noise
    of the same shape; with another data set's name (passed as ``pool_dataset``) it is that data set's inputs.
    ``pool_size`` caps the pool (noise pools default to the in-distribution pool's size).
    """
    for name, fraction in (("test_fraction", test_fraction), ("victim_fraction", victim_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"data.{name} must lie strictly between 0 and 1, got {fraction!r}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dataset.y))
    num_test = round(test_fraction * len(order))
    rest = order[num_test:]
    num_victim = round(victim_fraction * len(rest))
    test, victim_train = dataset.take(order[:num_test]), dataset.take(rest[:num_victim])
    in_distribution = dataset.x[rest[num_victim:]]
    pool = _attacker_pool(in_distribution, rng, pool_source, pool_size, pool_dataset)
    if pool.shape[1:] != dataset.input_shape:
        raise ValueError(
            f"attacker pool {pool_source!r} has inputs of shape {pool.shape[1:]}, but the victim's data set "
            f"{dataset.name!r} has {dataset.input_shape}; choose a pool data set of the same shape"
        )
    return Splits(victim_train=victim_train, pool=pool, test=test)


def _attacker_pool(
    in_distribution: np.ndarray,
    rng: np.random.Generator,
    source: str,
    size: int | None,
    other: Dataset | None,
) -> np.ndarray:
    if size is not None and size < 1:
        raise ValueError(f"data.pool_size must be a positive integer or null, got {size!r}")
    if source == "in_distribution":
        return in_distribution[:size]
    if source == "uniform":
        count = size or len(in_distribution)
        return rng.uniform(size=(count, *in_distribution.shape[1:])).astype(np.float32)
    if other is None:
        raise ValueError(f"unknown pool source {source!r}; accepted: {', '.join(POOL_SOURCES + DATASETS)}")
    return other.x[rng.permutation(len(other.x))[:size]]
