"""Data sets that users bring: NumPy archives and folders of images, checked before anything uses them.

``data=arrays``: one ``.npz`` archive holding ``x`` and ``y``, or ``x_train``, ``y_train``, ``x_test`` and
``y_test`` (the parts are joined, as for the downloaded data sets: ``heistlab.data.make_splits`` draws its
own seeded disjoint splits). ``data=image_folder``: one sub-folder per class, named freely (classes are
numbered in the sorted order of the names), each image decoded with Pillow and resized to a declared
``(H, W, C)`` shape, C being 1 (grey) or 3 (RGB). Either can also be the attacker's pool (``data.pool=PATH``):
a natural-image pool from elsewhere, as Knockoff Nets' attackers use (Orekondy et al., CVPR 2019); a pool's
labels are ignored.

Inputs are floats in ``[0, 1]``; ``uint8`` arrays are read as 0..255 pixels and divided by 255. Anything else
is refused with the file and the first offending index: values outside ``[0, 1]``, NaNs or infinities,
labels that are not integers in ``[0, num_classes)``, arrays of different lengths, images that do not decode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from heistlab.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ARRAY_LAYOUTS = "`x` and `y`, or `x_train`, `y_train`, `x_test` and `y_test`"


def as_images(x: np.ndarray, source: str) -> np.ndarray:
    """float32 ``(N, H, W, C)`` in [0, 1]; ``(N, D)`` becomes ``(N, D, 1, 1)``, ``(N, H, W)`` gains a C."""
    if x.ndim == 2:
        x = x[:, :, None, None]
    elif x.ndim == 3:
        x = x[..., None]
    elif x.ndim != 4:
        raise ValueError(f"{source}: inputs must be shaped (N, D), (N, H, W) or (N, H, W, C); got {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{source}: inputs must be numbers (float in [0, 1] or uint8); got dtype {x.dtype}")
    x = x.astype(np.float32)
    _refuse_first(~np.isfinite(x), source, "is not finite (NaN or infinity)")
    _refuse_first(
        (x < 0.0) | (x > 1.0), source, "lies outside [0, 1] (scale inputs to [0, 1], or pass uint8)"
    )
    return x


def as_labels(y: np.ndarray, count: int, num_classes: int | None, source: str) -> tuple[np.ndarray, int]:
    """int32 labels in ``[0, num_classes)``; ``num_classes`` defaults to the largest label plus one."""
    if y.shape != (count,):
        raise ValueError(f"{source}: labels must be shaped ({count},) to match the inputs; got {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        _refuse_first(y != np.round(y), source, "is not a whole-number label", values=y)
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers; got dtype {y.dtype}")
    classes = int(y.max()) + 1 if num_classes is None else num_classes
    if classes < 2:
        raise ValueError(f"{source}: needs at least 2 classes; got num_classes={classes}")
    _refuse_first(
        (y < 0) | (y >= classes), source, f"is outside [0, {classes}) (num_classes={classes})", values=y
    )
    return y.astype(np.int32), classes


def _refuse_first(bad: np.ndarray, source: str, problem: str, values: np.ndarray | None = None) -> None:
    if not bad.any():
        return
    index = np.argwhere(bad)[0]
    row = int(index[0])
    where = f"index {row}" if bad.ndim == 1 else f"index {row} (element {tuple(int(i) for i in index[1:])})"
    shown = f" value {values[tuple(index)].item()!r}" if values is not None else ""
    rows = int(bad.reshape(len(bad), -1).any(axis=1).sum())
    raise ValueError(f"{source}: {where}{shown} {problem} ({rows} row(s) affected)")


def load_arrays(path: str | Path, num_classes: int | None = None, name: str = "arrays") -> Dataset:
    """A labelled data set from an ``.npz`` archive (``x``/``y``, or train and test parts, joined)."""
    path = Path(path).expanduser()
    with np.load(_existing(path), allow_pickle=False) as archive:
        parts = _array_parts(archive, path)
        x = np.concatenate([as_images(archive[key], f"{path}[{key}]") for key, _ in parts])
        y = np.concatenate([archive[label] for _, label in parts])
    labels, classes = as_labels(y, len(x), num_classes, f"{path}[{'+'.join(label for _, label in parts)}]")
    return Dataset(x=x, y=labels, num_classes=classes, name=name)


def _array_parts(archive, path: Path) -> list[tuple[str, str]]:
    keys = set(archive.files)
    if {"x", "y"} <= keys:
        return [("x", "y")]
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        return [("x_train", "y_train"), ("x_test", "y_test")]
    raise ValueError(f"{path}: holds arrays {sorted(keys)}; accepted: {ARRAY_LAYOUTS}")


def load_pool_inputs(path: str | Path, image_shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """The attacker's pool from an ``.npz`` archive (its inputs only) or a folder of images (any depth)."""
    path = _existing(Path(path).expanduser())
    if path.is_dir():
        if image_shape is None:
            raise ValueError(
                f"{path}: a folder pool needs data.image_shape, the (H, W, C) to resize images to"
            )
        files = sorted(file for file in path.rglob("*") if file.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no images found (accepted suffixes: {', '.join(IMAGE_SUFFIXES)})")
        return np.stack([decode_image(file, image_shape) for file in files])
    with np.load(path, allow_pickle=False) as archive:
        keys = [key for key in ("x", "x_train", "x_test") if key in archive.files]
        if not keys:
            raise ValueError(f"{path}: holds arrays {sorted(archive.files)}; a pool needs `x` or `x_train`")
        return np.concatenate([as_images(archive[key], f"{path}[{key}]") for key in keys])


def load_image_folder(
    root: str | Path, image_shape: tuple[int, int, int], name: str = "image_folder"
) -> Dataset:
    """A labelled data set from ``root/<class name>/<image>``; classes numbered in sorted name order."""
    root = _existing(Path(root).expanduser())
    classes = sorted(entry for entry in root.iterdir() if entry.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{root}: needs one sub-folder per class, at least 2; found {len(classes)}")
    inputs, labels = [], []
    for label, folder in enumerate(classes):
        files = sorted(file for file in folder.iterdir() if file.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{folder}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        inputs.extend(decode_image(file, image_shape) for file in files)
        labels.extend([label] * len(files))
    return Dataset(
        x=np.stack(inputs), y=np.asarray(labels, dtype=np.int32), num_classes=len(classes), name=name
    )


def decode_image(file: Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """One image as float32 ``(H, W, C)`` in [0, 1], resized (bilinear) to ``image_shape``."""
    from PIL import Image, UnidentifiedImageError

    height, width, channels = check_image_shape(image_shape)
    try:
        with Image.open(file) as image:
            converted = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{file}: not a readable image ({error})") from None
    pixels = np.asarray(converted, dtype=np.float32) / 255.0
    return pixels.reshape(height, width, channels)


def check_image_shape(image_shape) -> tuple[int, int, int]:
    shape = tuple(image_shape or ())
    if len(shape) != 3 or shape[2] not in (1, 3) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(
            f"data.image_shape must be [H, W, C] with C 1 (grey) or 3 (RGB); got {image_shape!r}"
        )
    return shape


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or folder (a relative path is read from the launch folder)"
        )
    return path
