"""Users' data: .npz archives and image folders, read exactly; bad values refused by file and index."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from heistlab import external_data


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_arrays_join_train_and_test_parts_and_keep_values(tmp_path):
    x_train = np.linspace(0, 1, 6 * 4, dtype=np.float32).reshape(6, 2, 2)
    x_test = np.full((2, 2, 2), 0.5, np.float32)
    path = write_npz(
        tmp_path / "d.npz", x_train=x_train, y_train=[0, 1, 2, 0, 1, 2], x_test=x_test, y_test=[2, 2]
    )
    dataset = external_data.load_arrays(path)
    assert dataset.x.shape == (8, 2, 2, 1) and dataset.x.dtype == np.float32
    np.testing.assert_array_equal(dataset.x[:6, ..., 0], x_train)
    np.testing.assert_array_equal(dataset.y, [0, 1, 2, 0, 1, 2, 2, 2])
    assert dataset.num_classes == 3


def test_uint8_pixels_are_scaled_and_flat_features_become_columns(tmp_path):
    pixels = np.array([[[0, 255], [51, 102]]], dtype=np.uint8).repeat(2, axis=0)
    dataset = external_data.load_arrays(write_npz(tmp_path / "p.npz", x=pixels, y=[0, 1]))
    np.testing.assert_allclose(dataset.x[0, ..., 0], [[0.0, 1.0], [0.2, 0.4]])
    flat = external_data.load_arrays(write_npz(tmp_path / "f.npz", x=np.zeros((3, 5)), y=[0, 1, 1]))
    assert flat.x.shape == (3, 5, 1, 1)


@pytest.mark.parametrize(
    ("x", "y", "num_classes", "message"),
    [
        (np.array([[0.1, 0.2], [0.3, 1.5]]), [0, 1], None, r"x\]: index 1 \(element \(1, 0, 0\)\) lies"),
        (np.array([[0.1, np.nan], [0.3, 0.5]]), [0, 1], None, r"index 0 .*not finite"),
        (np.zeros((3, 2)), [0, 1, 4], 3, r"y\]: index 2 value 4 is outside \[0, 3\)"),
        (np.zeros((3, 2)), [0, -1, 1], None, r"index 1 value -1 is outside"),
        (np.zeros((2, 2)), [0.0, 0.5], None, r"index 1 value 0.5 is not a whole-number label"),
        (np.zeros((3, 2)), [0, 1], None, r"labels must be shaped \(3,\)"),
    ],
)
def test_bad_values_are_refused_naming_the_file_and_the_index(tmp_path, x, y, num_classes, message):
    path = write_npz(tmp_path / "bad.npz", x=x, y=np.asarray(y))
    with pytest.raises(ValueError, match=message) as refused:
        external_data.load_arrays(path, num_classes=num_classes)
    assert str(path) in str(refused.value)


def test_an_archive_without_the_accepted_arrays_names_what_it_holds(tmp_path):
    path = write_npz(tmp_path / "odd.npz", inputs=np.zeros((2, 2)), labels=[0, 1])
    with pytest.raises(ValueError, match=r"holds arrays \['inputs', 'labels'\]; accepted: `x` and `y`"):
        external_data.load_arrays(path)
    with pytest.raises(FileNotFoundError, match="missing.npz: no such file"):
        external_data.load_arrays(tmp_path / "missing.npz")


def write_image(path, value: int, size=(6, 4), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = (value, value, value) if mode == "RGB" else value
    Image.new(mode, size, colour).save(path)


def test_image_folder_numbers_classes_in_sorted_order_and_resizes(tmp_path):
    write_image(tmp_path / "zebra" / "a.png", 255)
    write_image(tmp_path / "cat" / "b.png", 0, mode="L")
    write_image(tmp_path / "cat" / "c.jpg", 0)
    dataset = external_data.load_image_folder(tmp_path, (3, 2, 3))
    assert dataset.x.shape == (3, 3, 2, 3) and dataset.num_classes == 2
    np.testing.assert_array_equal(dataset.y, [0, 0, 1])  # cat (2 images), then zebra
    np.testing.assert_allclose(dataset.x[2], 1.0)
    np.testing.assert_allclose(dataset.x[0], 0.0)
    grey = external_data.load_image_folder(tmp_path, (2, 2, 1))
    assert grey.x.shape == (3, 2, 2, 1)


def test_image_folder_refuses_unreadable_images_and_bad_shapes(tmp_path):
    write_image(tmp_path / "a" / "ok.png", 10)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken.png: not a readable image"):
        external_data.load_image_folder(tmp_path, (4, 4, 3))
    with pytest.raises(ValueError, match=r"data.image_shape must be \[H, W, C\] with C 1 \(grey\) or 3"):
        external_data.load_image_folder(tmp_path, (4, 4, 2))


def test_pool_from_a_folder_of_any_depth_or_an_archive(tmp_path):
    write_image(tmp_path / "pool" / "x" / "y" / "deep.png", 255)
    write_image(tmp_path / "pool" / "flat.png", 0)
    pool = external_data.load_pool_inputs(tmp_path / "pool", (2, 2, 1))
    assert pool.shape == (2, 2, 2, 1)
    archive = write_npz(tmp_path / "pool.npz", x_train=np.ones((3, 2, 2)), x_test=np.zeros((1, 2, 2)))
    assert external_data.load_pool_inputs(archive).shape == (4, 2, 2, 1)
