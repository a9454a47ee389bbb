"""Fashion-MNIST: the idx reader on small files written here, the fashion-mnist and fashion-mosaic
sources on a tiny idx folder, and (where Debian's dataset-fashion-mnist is installed) the real data."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from dseh.errors import DsehError
from dseh.idx import read_idx, read_images_labels

CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C}
CODES |= {np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """The idx encoding of `arr` (big-endian, as MNIST's files)."""
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    head = bytes([0, 0, CODES[big.dtype], arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return head + big.tobytes()


def write_idx(path: Path, arr: np.ndarray) -> Path:
    """`arr` as an idx file at `path`, gzipped when the name ends in .gz."""
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# --------------------------------------------------------------------------- idx reader


@pytest.mark.parametrize("name", ["a-idx3-ubyte.gz", "a-idx3-ubyte"])
def test_idx_reads_gzipped_and_plain(tmp_path, name):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(write_idx(tmp_path / name, arr))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4) and np.array_equal(out, arr)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_dtype_codes_in_native_order(tmp_path, dtype):
    arr = (np.arange(6) - 3).astype(dtype).reshape(3, 2)
    out = read_idx(write_idx(tmp_path / "x.idx", arr))
    assert out.dtype == np.dtype(dtype) and np.array_equal(out, arr)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x00\x00\x08", "not an idx file"),
        (b"\x01\x00\x08\x01" + bytes(8), "not an idx file"),  # first bytes not zero
        (b"\x00\x00\x07\x01" + bytes(8), "not an idx file"),  # unknown dtype code
        (b"\x00\x00\x08\x03\x00\x00", "truncated idx file"),  # header cut short
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "truncated idx file"),  # 3 of 5 bytes
        (b"\x00\x00\x08\x01\x00\x00\x00\x02abc", "1 bytes past the end"),
    ],
)
def test_idx_malformed_files_name_the_file(tmp_path, data, match):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(DsehError, match=match) as exc:
        read_idx(path)
    assert str(path) in str(exc.value)


def test_idx_truncated_gzip_names_the_file(tmp_path):
    path = write_idx(tmp_path / "t-idx3-ubyte.gz", np.zeros((50, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DsehError, match="truncated") as exc:
        read_idx(path)
    assert str(path) in str(exc.value)


def test_idx_wrong_magic_of_a_gzipped_file(tmp_path):
    path = tmp_path / "notidx.gz"
    path.write_bytes(gzip.compress(b"PK\x03\x04 a zip, not an idx file"))
    with pytest.raises(DsehError, match=f"{path}: not an idx file"):
        read_idx(path)


def test_idx_images_and_labels_counts_must_agree(tmp_path):
    images = write_idx(tmp_path / "i-idx3-ubyte.gz", np.zeros((5, 4, 4), dtype=np.uint8))
    labels = write_idx(tmp_path / "l-idx1-ubyte.gz", np.arange(4, dtype=np.uint8))
    with pytest.raises(DsehError, match="holds 5 images but .* holds 4 labels") as exc:
        read_images_labels(images, labels)
    assert str(images) in str(exc.value) and str(labels) in str(exc.value)
    x, y = read_images_labels(images, write_idx(tmp_path / "l5-idx1-ubyte.gz", np.arange(5, dtype=np.uint8)))
    assert x.shape == (5, 4, 4) and y.dtype == np.int64 and list(y) == [0, 1, 2, 3, 4]


def test_idx_pair_shapes_checked(tmp_path):
    flat = write_idx(tmp_path / "i-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    labels = write_idx(tmp_path / "l-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DsehError, match="expected \\(N, height, width\\)"):
        read_images_labels(flat, labels)
