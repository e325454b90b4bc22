"""Data sets and splits: seeded, disjoint, the pool sources, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from heistlab import data


def _row_set(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


def test_digits_are_in_unit_range_and_shaped_as_images():
    digits = data.load_digits()
    assert digits.x.shape == (1797, 8, 8, 1) and digits.x.dtype == np.float32
    assert digits.x.min() == 0.0 and digits.x.max() == 1.0 and digits.num_classes == 10


def test_splits_are_disjoint_cover_the_data_and_are_seeded():
    digits = data.load_digits()
    splits = data.make_splits(digits, seed=0)
    sizes = (len(splits.test.y), len(splits.victim_train.y), len(splits.pool))
    assert sizes == (359, 575, 863) and sum(sizes) == 1797
    # digits holds a few exact duplicate images, so compare positions through a unique tag per row
    tagged = digits._replace(x=np.arange(len(digits.y), dtype=np.float32).reshape(-1, 1, 1, 1))
    tagged_splits = data.make_splits(tagged, seed=0)
    parts = [
        set(tagged_splits.test.x.ravel()),
        set(tagged_splits.victim_train.x.ravel()),
        set(tagged_splits.pool.ravel()),
    ]
    assert parts[0].isdisjoint(parts[1]) and parts[0].isdisjoint(parts[2]) and parts[1].isdisjoint(parts[2])
    again = data.make_splits(digits, seed=0)
    assert np.array_equal(again.pool, splits.pool)
    assert not np.array_equal(data.make_splits(digits, seed=1).pool, splits.pool)


def test_uniform_pool_is_noise_of_the_same_shape():
    splits = data.make_splits(data.load_digits(), seed=0, pool_source="uniform", pool_size=50)
    assert splits.pool.shape == (50, 8, 8, 1)
    assert _row_set(splits.pool).isdisjoint(_row_set(data.load_digits().x))


def test_pool_from_another_dataset_must_match_the_shape():
    other = data.make_synthetic(num_samples=100, num_features=64)
    with pytest.raises(ValueError, match=r"has inputs of shape \(64, 1, 1\).*\(8, 8, 1\)"):
        data.make_splits(data.load_digits(), seed=0, pool_source="synthetic", pool_dataset=other)
    reshaped = other._replace(x=other.x.reshape(-1, 8, 8, 1))
    splits = data.make_splits(data.load_digits(), seed=0, pool_source="synthetic", pool_dataset=reshaped)
    assert len(splits.pool) == 100


def test_synthetic_is_seeded_any_shape_and_learnable():
    first = data.make_synthetic(num_samples=500, num_features=7, num_classes=5, seed=3)
    assert first.x.shape == (500, 7, 1, 1) and set(np.unique(first.y)) == set(range(5))
    assert np.array_equal(
        first.x, data.make_synthetic(num_samples=500, num_features=7, num_classes=5, seed=3).x
    )
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        data.make_synthetic(num_classes=1)


def test_unknown_dataset_names_the_accepted_ones():
    with pytest.raises(
        ValueError, match="unknown data set 'imagenet'; accepted: digits, synthetic, synthetic_cifar, mnist"
    ):
        data.load_dataset("imagenet")


def test_download_disabled_names_missing_files_and_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("HEISTLAB_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as missing:
        data.load_dataset("mnist", data_dir=str(tmp_path), download=False)
    assert "train-images-idx3-ubyte.gz" in str(missing.value) and str(tmp_path / "mnist") in str(
        missing.value
    )


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5])
def test_fractions_are_validated(fraction):
    with pytest.raises(ValueError, match="data.test_fraction must lie strictly between 0 and 1"):
        data.make_splits(data.load_digits(), seed=0, test_fraction=fraction)


def test_digits_match_scikit_learns_loader():
    from sklearn.datasets import load_digits as sklearn_digits

    reference, ours = sklearn_digits(), data.load_digits()
    np.testing.assert_array_equal(ours.x.reshape(-1, 64) * 16.0, reference.data)
    np.testing.assert_array_equal(ours.y, reference.target)


def test_synthetic_cifar_is_seeded_cifar_shaped_and_class_dependent():
    images = data.load_dataset("synthetic_cifar", synthetic={"num_samples": 400, "seed": 3})
    assert images.x.shape == (400, 32, 32, 3) and images.x.dtype == np.float32 and images.num_classes == 10
    assert images.x.min() >= 0.0 and images.x.max() <= 1.0 and set(images.y) == set(range(10))
    again = data.make_synthetic_images(num_samples=400, seed=3)
    np.testing.assert_array_equal(images.x, again.x)
    assert not np.array_equal(images.x, data.make_synthetic_images(num_samples=400, seed=4).x)
    # The classes differ: the nearest class mean (of the first half) labels most of the second half.
    means = np.stack([images.x[:200][images.y[:200] == c].mean(0) for c in range(10)])
    distances = ((images.x[200:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
    assert (distances.argmin(1) == images.y[200:]).mean() > 0.8


def test_synthetic_cifar_names_a_bad_image_shape():
    with pytest.raises(
        ValueError, match=r"image_shape must be three positive integers \[H, W, C\], got \(32, 32\)"
    ):
        data.make_synthetic_images(image_shape=(32, 32))
