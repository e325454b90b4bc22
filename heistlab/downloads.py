"""Download, verify, cache and parse MNIST, Fashion-MNIST and CIFAR-10.

Every file is fetched from its canonical source (then from well-known mirrors), checked against a pinned
SHA-256 digest and cached at ``<data_dir>/<dataset>/<file name>``. A cached file whose digest matches is never
downloaded again. With ``download=False`` nothing touches the network: missing files raise a
:class:`FileNotFoundError` that lists what to place where.

Formats:

* MNIST and Fashion-MNIST use LeCun's IDX format, described at the bottom of
  http://yann.lecun.com/exdb/mnist/ : two zero bytes, a type code byte, a dimension count byte, then one
  big-endian 32-bit size per dimension, then the payload in big-endian C order.
* CIFAR-10 "python version", described at https://www.cs.toronto.edu/~kriz/cifar.html : a tar.gz holding
  ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each a pickled dict whose
  ``b"data"`` is a ``(N, 3072)`` uint8 array (per row: 1024 red, 1024 green, then 1024 blue values, each
  plane a row-major 32x32 image) and whose ``b"labels"`` is a list of N ints in 0..9.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import os
import pickle
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

DATA_DIR_ENV = "HEISTLAB_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.cache/heistlab/data")

DOWNLOAD_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20
USER_AGENT = "heistlab-downloader/0.1 (+python urllib)"


class RawSplit(NamedTuple):
    """A dataset as arrays: images float32 in [0, 1] shaped (N, H, W, C), labels int32 shaped (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


class RemoteFile(NamedTuple):
    """One downloadable file: its name in the data dir, URLs tried in order, and its SHA-256 hex digest."""

    name: str
    urls: tuple[str, ...]
    sha256: str


class DownloadError(OSError):
    """Every URL of a file failed; the message lists each URL and why it failed."""


def _mirrored(name: str, base_urls: Sequence[str]) -> tuple[str, ...]:
    return tuple(base + name for base in base_urls)


# MNIST: LeCun's site is the canonical source but often refuses downloads, so the copies used by
# TensorFlow Datasets (Google's CVDF bucket) and torchvision (ossci-datasets) follow it.
MNIST_BASE_URLS = (
    "http://yann.lecun.com/exdb/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
# Digests from tensorflow/datasets, tensorflow_datasets/url_checksums/mnist.txt (the cvdf-datasets URLs);
# the same values are pinned for the LeCun and ossci-datasets URLs by independent projects.
MNIST_FILES: dict[str, RemoteFile] = {
    "train_images": RemoteFile(
        "train-images-idx3-ubyte.gz",
        _mirrored("train-images-idx3-ubyte.gz", MNIST_BASE_URLS),
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",  # tfds mnist.txt, 9912422 B
    ),
    "train_labels": RemoteFile(
        "train-labels-idx1-ubyte.gz",
        _mirrored("train-labels-idx1-ubyte.gz", MNIST_BASE_URLS),
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",  # tfds mnist.txt, 28881 B
    ),
    "test_images": RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        _mirrored("t10k-images-idx3-ubyte.gz", MNIST_BASE_URLS),
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",  # tfds mnist.txt, 1648877 B
    ),
    "test_labels": RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        _mirrored("t10k-labels-idx1-ubyte.gz", MNIST_BASE_URLS),
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",  # tfds mnist.txt, 4542 B
    ),
}

# Fashion-MNIST: Zalando's S3 website is canonical; the same files are committed in the project's repository.
FASHION_MNIST_BASE_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# Digests from tensorflow/datasets, tensorflow_datasets/url_checksums/fashion_mnist.txt (the S3 URLs).
FASHION_MNIST_FILES: dict[str, RemoteFile] = {
    "train_images": RemoteFile(
        "train-images-idx3-ubyte.gz",
        _mirrored("train-images-idx3-ubyte.gz", FASHION_MNIST_BASE_URLS),
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",  # tfds, 26421880 B
    ),
    "train_labels": RemoteFile(
        "train-labels-idx1-ubyte.gz",
        _mirrored("train-labels-idx1-ubyte.gz", FASHION_MNIST_BASE_URLS),
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",  # tfds, 29515 B
    ),
    "test_images": RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        _mirrored("t10k-images-idx3-ubyte.gz", FASHION_MNIST_BASE_URLS),
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",  # tfds, 4422102 B
    ),
    "test_labels": RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        _mirrored("t10k-labels-idx1-ubyte.gz", FASHION_MNIST_BASE_URLS),
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",  # tfds, 5148 B
    ),
}

# CIFAR-10 python version, from Krizhevsky's page. Digest from tensorflow/datasets,
# tensorflow_datasets/url_checksums/cifar10.csv (also the file_hash of keras.datasets.cifar10.load_data).
CIFAR10_ARCHIVE = RemoteFile(
    "cifar-10-python.tar.gz",
    ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",  # 170498071 B
)
CIFAR10_TRAIN_MEMBERS = tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_MEMBER = "cifar-10-batches-py/test_batch"

NUM_CLASSES = 10


# ----------------------------------------------------------------------------------------------------------
# Data directory and fetching
# ----------------------------------------------------------------------------------------------------------


def resolve_data_dir(configured: str | os.PathLike | None) -> Path:
    """$HEISTLAB_DATA_DIR wins if set; else `configured`; else ~/.cache/heistlab/data."""
    from_env = os.environ.get(DATA_DIR_ENV, "").strip()
    if from_env:
        chosen: str | os.PathLike = from_env
    elif configured is not None and str(configured).strip():
        chosen = configured
    else:
        chosen = DEFAULT_DATA_DIR
    return Path(chosen).expanduser().resolve()


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_problem(path: Path, expected_sha256: str) -> str | None:
    """None if `path` holds the expected bytes, else a short reason ("missing", "wrong SHA-256 ...")."""
    if not path.is_file():
        return "missing"
    actual = sha256_of(path)
    if actual != expected_sha256:
        return f"wrong SHA-256 {actual}"
    return None


def _missing_files_error(
    directory: Path, files: Sequence[RemoteFile], problems: Mapping[str, str]
) -> FileNotFoundError:
    """The FileNotFoundError raised when download is off: names every expected file and the directory."""
    bad = ", ".join(
        name if reason == "missing" else f"{name} ({reason})" for name, reason in problems.items()
    )
    listing = "\n".join(
        f"  {file.name}  sha256={file.sha256}  [{problems.get(file.name, 'ok')}]  from {file.urls[0]}"
        for file in files
    )
    expected = ", ".join(file.name for file in files)
    message = (
        f"{directory.name}: missing {bad} in {directory}; set download: true (data.download=true) "
        f"or place the files there (expected files: {expected}; SHA-256 listed below):\n{listing}"
    )
    return FileNotFoundError(message)


def fetch(file: RemoteFile, directory: Path, download: bool) -> Path:
    """Return the verified local path of `file` in `directory`, downloading it if allowed and needed.

    A cached file whose SHA-256 matches is returned as is. Otherwise, with download False, raise
    FileNotFoundError; with download True, download it (see :func:`_download_verified`).
    """
    return fetch_dataset([file], directory, download)[0]


def fetch_dataset(files: Sequence[RemoteFile], directory: Path, download: bool) -> list[Path]:
    """:func:`fetch` for all files of one dataset; with download False, one error names every file."""
    directory = Path(directory)
    problems = {}
    for file in files:
        problem = _cache_problem(directory / file.name, file.sha256)
        if problem is not None:
            problems[file.name] = problem
    if problems and not download:
        raise _missing_files_error(directory, files, problems)
    for file in files:
        if file.name in problems:
            directory.mkdir(parents=True, exist_ok=True)
            _download_verified(file, directory / file.name)
    return [directory / file.name for file in files]


def _download_verified(file: RemoteFile, target: Path) -> None:
    """Download `file` into a temp file beside `target`, check its SHA-256, then os.replace it into place.

    URLs are tried in order. A network or I/O failure, or bytes whose digest is wrong, moves on to the next
    URL. If none succeeds, raise ValueError when some URL served wrong bytes (naming file, expected and
    actual digest), else DownloadError; both list every URL tried and why it failed. No partial file remains.
    """
    failures: list[str] = []
    mismatches: list[str] = []
    for url in file.urls:
        temp_path = _new_temp_path(target)
        try:
            actual = _download_to(url, temp_path, file.name)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            temp_path.unlink(missing_ok=True)
            failures.append(f"{url}: {type(error).__name__}: {error}")
            continue
        except BaseException:  # e.g. KeyboardInterrupt: leave no partial file behind
            temp_path.unlink(missing_ok=True)
            raise
        if actual != file.sha256:
            temp_path.unlink(missing_ok=True)
            mismatches.append(actual)
            failures.append(f"{url}: SHA-256 mismatch (expected {file.sha256}, got {actual})")
            continue
        os.replace(temp_path, target)
        return
    tried = "\n".join(f"  {line}" for line in failures)
    if mismatches:
        raise ValueError(
            f"{file.name}: SHA-256 mismatch: expected {file.sha256}, actual {mismatches[-1]}; "
            f"the download was deleted. URLs tried:\n{tried}"
        )
    raise DownloadError(f"{file.name}: every URL failed:\n{tried}")


def _new_temp_path(target: Path) -> Path:
    """A fresh, unique, empty file in the target's directory, so os.replace stays on one file system."""
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(handle)
    return Path(name)


def _download_to(url: str, destination: Path, label: str) -> str:
    """Stream `url` into `destination`, showing progress; return the hex SHA-256 of the bytes written."""
    log.info("downloading %s from %s", label, url)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    digest = hashlib.sha256()
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
        total = _content_length(response)
        with open(destination, "wb") as out, _progress_bar(label, total) as advance:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                advance(len(chunk))
    return digest.hexdigest()


def _content_length(response: Any) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def _show_progress() -> bool:
    """Progress bars only on an interactive terminal and never under CI."""
    under_ci = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
    return sys.stdout.isatty() and not under_ci


@contextlib.contextmanager
def _progress_bar(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield a callable that advances a rich download bar by n bytes (a no-op when quiet)."""
    if not _show_progress():
        yield lambda _n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


# ----------------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------------------------------------

# Type codes from LeCun's IDX description; all multi-byte values are big-endian.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzipped(path: Path) -> bytes:
    """The file's bytes, gunzipped if they start with the gzip magic number."""
    raw = path.read_bytes()
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: corrupt gzip stream ({error})") from error


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (plain or gzipped) into a native-endian array.

    Format (http://yann.lecun.com/exdb/mnist/): bytes 0-1 are zero, byte 2 is the type code, byte 3 the number
    of dimensions d, then d big-endian uint32 sizes, then exactly prod(sizes) big-endian values in C order.
    Raises ValueError if any of this does not hold.
    """
    path = Path(path)
    data = _read_maybe_gzipped(path)
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number {data[:4].hex()} does not start with 0000)")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares zero dimensions")
    header_bytes = 4 + 4 * ndim
    if len(data) < header_bytes:
        raise ValueError(
            f"{path}: IDX header truncated ({len(data)} bytes, {ndim} dimensions need {header_bytes})"
        )
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_bytes
    if actual != expected:
        raise ValueError(
            f"{path}: IDX payload is {actual} bytes but shape {shape} of {dtype.name} needs {expected}"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header_bytes).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def _idx_images(path: Path) -> np.ndarray:
    images = read_idx(path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{path}: expected uint8 images shaped (N, rows, cols), got {images.dtype} {images.shape}"
        )
    return images


def _idx_labels(path: Path, count: int) -> np.ndarray:
    labels = read_idx(path)
    if labels.shape != (count,) or labels.dtype != np.uint8:
        raise ValueError(f"{path}: expected {count} uint8 labels, got {labels.dtype} {labels.shape}")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{path}: label {labels.max()} is outside 0..{NUM_CLASSES - 1}")
    return labels.astype(np.int32)


def _scaled_images(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1]; grayscale (N, H, W) gains a trailing channel axis."""
    images = images_uint8.astype(np.float32)
    images /= np.float32(255.0)
    return images[..., None] if images.ndim == 3 else images


def _load_idx_dataset(name: str, files: Mapping[str, RemoteFile], data_dir, download: bool) -> RawSplit:
    """Fetch and parse one MNIST-format dataset (four IDX files) stored in `<data_dir>/<name>`."""
    directory = resolve_data_dir(data_dir) / name
    roles = ("train_images", "train_labels", "test_images", "test_labels")
    paths = dict(zip(roles, fetch_dataset([files[role] for role in roles], directory, download), strict=True))
    train_images = _idx_images(paths["train_images"])
    test_images = _idx_images(paths["test_images"])
    return RawSplit(
        x_train=_scaled_images(train_images),
        y_train=_idx_labels(paths["train_labels"], len(train_images)),
        x_test=_scaled_images(test_images),
        y_test=_idx_labels(paths["test_labels"], len(test_images)),
        num_classes=NUM_CLASSES,
    )


def load_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> RawSplit:
    """MNIST digits: x (60000, 28, 28, 1) / (10000, 28, 28, 1) float32 in [0, 1], y int32 in 0..9."""
    return _load_idx_dataset("mnist", MNIST_FILES, data_dir, download)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> RawSplit:
    """Fashion-MNIST (Xiao et al. 2017): same layout as MNIST, ten clothing classes."""
    return _load_idx_dataset("fashion_mnist", FASHION_MNIST_FILES, data_dir, download)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------------------

# The only globals a CIFAR batch pickle needs: numpy's array reconstruction (numpy 1.x and 2.x module paths)
# and, for pickles written by Python 3 at protocol <= 2, the bytes helper _codecs.encode.
_ALLOWED_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except those needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}, which is not allowed")
        return super().find_class(module, name)


def _batch_entry(batch: Mapping, key: str, source: str) -> Any:
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise ValueError(f"{source}: CIFAR batch has no {key!r} entry (keys: {sorted(map(str, batch))})")


def read_cifar_batch(fileobj_or_path: str | os.PathLike | IO[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR-10 python batch into (x uint8 (N, 32, 32, 3) NHWC, labels int32 (N,)).

    Format (https://www.cs.toronto.edu/~kriz/cifar.html): a pickled dict; b"data" is a (N, 3072) uint8 array
    whose rows hold 1024 red, 1024 green, then 1024 blue values, each a row-major 32x32 plane; b"labels" is a
    list of N ints in 0..9. Only numpy array globals may appear in the pickle.
    """
    if isinstance(fileobj_or_path, str | os.PathLike):
        source = str(fileobj_or_path)
        with open(fileobj_or_path, "rb") as stream:
            batch = _CifarUnpickler(stream, encoding="bytes").load()
    else:
        source = str(getattr(fileobj_or_path, "name", "<stream>"))
        batch = _CifarUnpickler(fileobj_or_path, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{source}: CIFAR batch should be a dict, got {type(batch).__name__}")
    data = np.asarray(_batch_entry(batch, "data", source))
    labels = np.asarray(_batch_entry(batch, "labels", source))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{source}: CIFAR data should be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"{source}: expected {len(data)} integer labels, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{source}: labels must lie in 0..{NUM_CLASSES - 1}")
    images = np.ascontiguousarray(data.reshape(len(data), 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int32)


def _read_cifar_member(archive: tarfile.TarFile, member_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse one batch straight out of the tar (nothing is extracted to disk, so no path traversal)."""
    try:
        member = archive.getmember(member_name)
    except KeyError:
        raise ValueError(f"{archive.name}: CIFAR-10 archive has no member {member_name}") from None
    stream = archive.extractfile(member)
    if stream is None:
        raise ValueError(f"{archive.name}: {member_name} is not a regular file")
    with stream:
        return read_cifar_batch(stream)


def load_cifar10(data_dir: str | os.PathLike | None = None, download: bool = True) -> RawSplit:
    """CIFAR-10: x (50000, 32, 32, 3) / (10000, 32, 32, 3) float32 in [0, 1] NHWC, y int32 in 0..9."""
    directory = resolve_data_dir(data_dir) / "cifar10"
    (archive_path,) = fetch_dataset([CIFAR10_ARCHIVE], directory, download)
    with tarfile.open(archive_path, "r:gz") as archive:
        train = [_read_cifar_member(archive, name) for name in CIFAR10_TRAIN_MEMBERS]
        test_images, test_labels = _read_cifar_member(archive, CIFAR10_TEST_MEMBER)
    return RawSplit(
        x_train=_scaled_images(np.concatenate([images for images, _ in train])),
        y_train=np.concatenate([labels for _, labels in train]),
        x_test=_scaled_images(test_images),
        y_test=test_labels,
        num_classes=NUM_CLASSES,
    )


LOADERS: dict[str, Callable[..., RawSplit]] = {
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
}
