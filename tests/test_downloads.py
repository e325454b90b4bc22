"""Tests for heistlab.downloads on tiny files written here and served through file:// URLs (no network)."""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from heistlab import downloads
from heistlab.downloads import RemoteFile

IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array in LeCun's IDX format: 00 00 <type> <ndim>, big-endian sizes, big-endian payload."""
    header = bytes([0, 0, IDX_TYPE_CODES[array.dtype], array.ndim])
    sizes = np.asarray(array.shape, dtype=">u4").tobytes()
    return header + sizes + array.astype(array.dtype.newbyteorder(">")).tobytes()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def served(tmp_path: Path, name: str, data: bytes) -> RemoteFile:
    """Write `data` under tmp_path/server and describe it as a RemoteFile with a file:// URL."""
    source = write(tmp_path / "server" / name, data)
    return RemoteFile(name, (source.as_uri(),), sha256_hex(data))


def cifar_batch_bytes(data: np.ndarray, labels: list[int]) -> bytes:
    return pickle.dumps({b"batch_label": b"test", b"data": data, b"labels": labels, b"filenames": []})


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(downloads.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


# ---------------------------------------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_read_idx_round_trip(tmp_path, gzipped, dtype):
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    encoded = idx_bytes(array)
    path = write(tmp_path / "a.idx", gzip.compress(encoded) if gzipped else encoded)
    decoded = downloads.read_idx(path)
    assert decoded.dtype == np.dtype(dtype) and decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, array)
    decoded[0, 0, 0] = 1  # writable


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b"\x01" + b[1:], "not an IDX file"),
        (lambda b: b[:2] + b"\x07" + b[3:], "unknown IDX type code 0x07"),
        (lambda b: b[:3] + b"\x00", "zero dimensions"),
        (lambda b: b[:6], "header truncated"),
        (lambda b: b[:2], "too short"),
        (lambda b: b[:-1], "payload is 23 bytes"),
        (lambda b: b + b"\x00", "payload is 25 bytes"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, mangle, message):
    encoded = idx_bytes(np.zeros((2, 3, 4), np.uint8))
    path = write(tmp_path / "bad.idx", mangle(encoded))
    with pytest.raises(ValueError, match=message):
        downloads.read_idx(path)


def test_read_idx_rejects_truncated_gzip(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))
    path = write(tmp_path / "bad.gz", compressed[:-10])
    with pytest.raises(ValueError, match="corrupt gzip"):
        downloads.read_idx(path)


# ---------------------------------------------------------------------------------------------------------
# CIFAR batches
# ---------------------------------------------------------------------------------------------------------


def test_read_cifar_batch_is_nhwc_with_red_green_blue_planes(tmp_path):
    data = np.zeros((2, 3072), np.uint8)
    data[0, 0 * 1024 + 1 * 32 + 2] = 200  # red plane, row 1, column 2
    data[0, 1 * 1024 + 5 * 32 + 7] = 100  # green plane, row 5, column 7
    data[1, 2 * 1024 + 31 * 32 + 0] = 50  # blue plane, row 31, column 0
    path = write(tmp_path / "data_batch_1", cifar_batch_bytes(data, [3, 9]))

    images, labels = downloads.read_cifar_batch(path)

    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.tolist() == [3, 9]
    assert images[0, 1, 2, 0] == 200 and images[0, 5, 7, 1] == 100 and images[1, 31, 0, 2] == 50
    assert int(images.astype(np.int64).sum()) == 350
    np.testing.assert_array_equal(downloads.read_cifar_batch(io.BytesIO(path.read_bytes()))[0], images)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({b"labels": [0]}, "no 'data' entry"),
        ({b"data": np.zeros((1, 3072), np.uint8)}, "no 'labels' entry"),
        ({b"data": np.zeros((1, 3000), np.uint8), b"labels": [0]}, r"uint8 \(N, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "expected 2 integer labels"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, "labels must lie in"),
        ([1, 2], "should be a dict"),
    ],
)
def test_read_cifar_batch_validates(batch, message):
    with pytest.raises(ValueError, match=message):
        downloads.read_cifar_batch(io.BytesIO(pickle.dumps(batch)))


def test_read_cifar_batch_refuses_foreign_pickle_globals():
    with pytest.raises(pickle.UnpicklingError, match=r"collections\.OrderedDict"):
        downloads.read_cifar_batch(io.BytesIO(pickle.dumps(collections.OrderedDict(data=1))))


def test_read_cifar_batch_accepts_protocol_2_pickles():
    data = np.full((1, 3072), 7, np.uint8)
    stream = io.BytesIO(pickle.dumps({b"data": data, b"labels": [1]}, protocol=2))
    images, labels = downloads.read_cifar_batch(stream)
    assert (images == 7).all() and labels.tolist() == [1]


# ---------------------------------------------------------------------------------------------------------
# fetch
# ---------------------------------------------------------------------------------------------------------


def test_fetch_downloads_verifies_and_caches(tmp_path):
    remote = served(tmp_path, "blob.bin", b"hello heistlab")
    directory = tmp_path / "data" / "toy"

    first = downloads.fetch(remote, directory, download=True)
    assert first == directory / "blob.bin" and first.read_bytes() == b"hello heistlab"

    (tmp_path / "server" / "blob.bin").unlink()  # a second download would now fail
    assert downloads.fetch(remote, directory, download=True) == first
    assert downloads.fetch(remote, directory, download=False) == first
    assert sorted(p.name for p in directory.iterdir()) == ["blob.bin"]


def test_fetch_replaces_a_corrupt_cached_file(tmp_path):
    remote = served(tmp_path, "blob.bin", b"good bytes")
    directory = tmp_path / "data"
    write(directory / "blob.bin", b"bad bytes")
    assert downloads.fetch(remote, directory, download=True).read_bytes() == b"good bytes"


def test_fetch_digest_mismatch_raises_and_leaves_nothing(tmp_path):
    remote = served(tmp_path, "blob.bin", b"tampered")._replace(sha256="0" * 64)
    directory = tmp_path / "data"
    with pytest.raises(ValueError, match=r"blob\.bin") as caught:
        downloads.fetch(remote, directory, download=True)
    assert "0" * 64 in str(caught.value) and sha256_hex(b"tampered") in str(caught.value)
    assert list(directory.iterdir()) == []


def test_fetch_falls_back_to_the_next_mirror(tmp_path):
    good = served(tmp_path, "blob.bin", b"mirrored")
    missing_url = (tmp_path / "nowhere" / "blob.bin").as_uri()
    remote = good._replace(urls=(missing_url, *good.urls))
    path = downloads.fetch(remote, tmp_path / "data", download=True)
    assert path.read_bytes() == b"mirrored"


def test_fetch_lists_every_failed_url(tmp_path):
    urls = tuple((tmp_path / f"nowhere{i}" / "blob.bin").as_uri() for i in range(2))
    remote = RemoteFile("blob.bin", urls, "0" * 64)
    with pytest.raises(downloads.DownloadError) as caught:
        downloads.fetch(remote, tmp_path / "data", download=True)
    assert all(url in str(caught.value) for url in urls)
    assert list((tmp_path / "data").iterdir()) == []


def test_fetch_without_download_names_file_and_directory(tmp_path):
    remote = RemoteFile("blob.bin", ("https://example.invalid/blob.bin",), "ab" * 32)
    directory = tmp_path / "data" / "toy"
    with pytest.raises(FileNotFoundError) as caught:
        downloads.fetch(remote, directory, download=False)
    message = str(caught.value)
    assert f"toy: missing blob.bin in {directory}" in message
    assert "download: true" in message and "ab" * 32 in message
    assert not directory.exists()


# ---------------------------------------------------------------------------------------------------------
# Data directory
# ---------------------------------------------------------------------------------------------------------


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    assert downloads.resolve_data_dir(None) == tmp_path / "home" / ".cache" / "heistlab" / "data"
    assert downloads.resolve_data_dir(tmp_path / "configured") == tmp_path / "configured"
    monkeypatch.setenv(downloads.DATA_DIR_ENV, str(tmp_path / "from_env"))
    assert downloads.resolve_data_dir(tmp_path / "configured") == tmp_path / "from_env"
    assert downloads.resolve_data_dir(None) == tmp_path / "from_env"


# ---------------------------------------------------------------------------------------------------------
# Loaders end to end on fake files
# ---------------------------------------------------------------------------------------------------------


def fake_idx_table(tmp_path: Path, rng: np.random.Generator) -> tuple[dict[str, RemoteFile], dict]:
    """A four-file MNIST-format table served from tmp_path, and the arrays it holds."""
    arrays = {
        "train_images": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "train_labels": np.array([0, 1, 2, 3, 9], np.uint8),
        "test_images": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "test_labels": np.array([4, 5, 6], np.uint8),
    }
    table = {
        role: served(tmp_path, downloads.MNIST_FILES[role].name, gzip.compress(idx_bytes(array)))
        for role, array in arrays.items()
    }
    return table, arrays


@pytest.mark.parametrize(
    ("name", "table_attr"), [("mnist", "MNIST_FILES"), ("fashion_mnist", "FASHION_MNIST_FILES")]
)
def test_idx_loaders_end_to_end(tmp_path, monkeypatch, name, table_attr):
    table, arrays = fake_idx_table(tmp_path, np.random.default_rng(0))
    monkeypatch.setattr(downloads, table_attr, table)

    raw = downloads.LOADERS[name](data_dir=tmp_path / "data", download=True)

    assert raw.x_train.shape == (5, 28, 28, 1) and raw.x_test.shape == (3, 28, 28, 1)
    assert raw.x_train.dtype == np.float32 and raw.y_train.dtype == np.int32
    np.testing.assert_allclose(raw.x_train[..., 0] * 255, arrays["train_images"], atol=1e-4)
    np.testing.assert_array_equal(raw.y_test, [4, 5, 6])
    assert raw.num_classes == 10
    assert {p.name for p in (tmp_path / "data" / name).iterdir()} == {f.name for f in table.values()}


def test_load_mnist_without_download_names_every_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv(downloads.DATA_DIR_ENV, str(tmp_path / "env_data"))
    with pytest.raises(FileNotFoundError) as caught:
        downloads.load_mnist(data_dir=tmp_path / "ignored", download=False)
    message = str(caught.value)
    directory = tmp_path / "env_data" / "mnist"
    assert message.startswith("mnist: missing train-images-idx3-ubyte.gz, ") and f"in {directory};" in message
    for file in downloads.MNIST_FILES.values():
        assert file.name in message and file.sha256 in message
    assert "data.download=true" in message


def test_load_mnist_reports_a_corrupt_cached_file(tmp_path, monkeypatch):
    table, _ = fake_idx_table(tmp_path, np.random.default_rng(1))
    monkeypatch.setattr(downloads, "MNIST_FILES", table)
    downloads.load_mnist(data_dir=tmp_path / "data", download=True)
    write(tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz", b"garbage")
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.gz \(wrong SHA-256"):
        downloads.load_mnist(data_dir=tmp_path / "data", download=False)


def fake_cifar_archive(images_per_batch: int, rng: np.random.Generator) -> tuple[bytes, dict]:
    """A cifar-10-python.tar.gz look-alike with five training batches and a test batch."""
    batches = {}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member in (*downloads.CIFAR10_TRAIN_MEMBERS, downloads.CIFAR10_TEST_MEMBER):
            data = rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, images_per_batch).tolist()
            payload = cifar_batch_bytes(data, labels)
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
            batches[member] = (data, labels)
    return buffer.getvalue(), batches


def test_load_cifar10_end_to_end(tmp_path, monkeypatch):
    archive_bytes, batches = fake_cifar_archive(2, np.random.default_rng(2))
    monkeypatch.setattr(
        downloads, "CIFAR10_ARCHIVE", served(tmp_path, "cifar-10-python.tar.gz", archive_bytes)
    )

    raw = downloads.load_cifar10(data_dir=tmp_path / "data")

    assert raw.x_train.shape == (10, 32, 32, 3) and raw.x_test.shape == (2, 32, 32, 3)
    assert raw.x_train.dtype == np.float32 and raw.x_train.min() >= 0.0 and raw.x_train.max() <= 1.0
    last_data, last_labels = batches["cifar-10-batches-py/data_batch_5"]
    red_plane = last_data[1, :1024].reshape(32, 32)
    np.testing.assert_allclose(raw.x_train[9, :, :, 0] * 255, red_plane, atol=1e-4)
    assert raw.y_train[8:].tolist() == last_labels
    assert raw.y_test.tolist() == batches[downloads.CIFAR10_TEST_MEMBER][1]
    assert (tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz").is_file()


def test_load_cifar10_rejects_an_archive_missing_batches(tmp_path, monkeypatch):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz"):
        pass
    monkeypatch.setattr(
        downloads, "CIFAR10_ARCHIVE", served(tmp_path, "cifar-10-python.tar.gz", buffer.getvalue())
    )
    with pytest.raises(ValueError, match="no member cifar-10-batches-py/data_batch_1"):
        downloads.load_cifar10(data_dir=tmp_path / "data")


def test_loader_table_and_pinned_digests():
    assert set(downloads.LOADERS) == {"mnist", "fashion_mnist", "cifar10"}
    tables = (
        *downloads.MNIST_FILES.values(),
        *downloads.FASHION_MNIST_FILES.values(),
        downloads.CIFAR10_ARCHIVE,
    )
    for file in tables:
        assert len(file.sha256) == 64 and int(file.sha256, 16) >= 0
        assert all(url.endswith(file.name) for url in file.urls)
    assert downloads.MNIST_FILES["train_images"].urls[0].startswith("http://yann.lecun.com/")


def test_progress_is_quiet_under_ci(monkeypatch):
    monkeypatch.setattr(downloads.sys, "stdout", io.StringIO())
    monkeypatch.setattr(downloads.sys.stdout, "isatty", lambda: True)
    assert downloads._show_progress() is False
    monkeypatch.setenv("CI", "false")
    assert downloads._show_progress() is True
