"""Reading MNIST-format idx files (gzipped or plain): magic number, dtype code, dimensions, data;
every malformed file is one DsehError naming it."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from dseh.errors import DsehError

# the idx format's third magic byte -> the (big-endian) element type
DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzipped (told by its first two bytes, not its name)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DsehError(f"{path}: cannot read idx file ({exc.strerror or exc})") from exc
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DsehError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """The array an idx file holds, in native byte order, with the dimensions of its header.

    Header: two zero bytes, a dtype code (DTYPES), the number of dimensions, then one big-endian
    uint32 per dimension; the data follow, big-endian, exactly as many bytes as the dimensions say."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in DTYPES or data[3] == 0:
        raise DsehError(f"{path}: not an idx file (magic number {data[:4].hex() or 'missing'})")
    dtype, ndim = np.dtype(DTYPES[data[2]]), data[3]
    head = 4 + 4 * ndim
    if len(data) < head:
        raise DsehError(f"{path}: truncated idx file (header of {ndim} dimensions needs {head} bytes, has {len(data)})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    need = head + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) < need:
        raise DsehError(f"{path}: truncated idx file ({dims} of {dtype.name} need {need} bytes, has {len(data)})")
    if len(data) > need:
        raise DsehError(f"{path}: {len(data) - need} bytes past the end of its {dims} idx data")
    return np.frombuffer(data, dtype=dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


def read_images_labels(images: str | Path, labels: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An MNIST-style pair: (N, H, W) uint8 images and (N,) int64 labels, N the same in both."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DsehError(f"{images}: expected (N, height, width) unsigned bytes, got {x.shape} of {x.dtype}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DsehError(f"{labels}: expected (N,) integer labels, got {y.shape} of {y.dtype}")
    if len(x) != len(y):
        raise DsehError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    return x, y.astype(np.int64)
