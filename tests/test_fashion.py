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


# --------------------------------------------------------------------------- the sources


def make_fashion_dir(folder: Path, train_per_class: int = 25, test_per_class: int = 8, gz: bool = True) -> Path:
    """A tiny Fashion-MNIST folder: the four idx files, 28x28 images, classes interleaved. Training
    images' pixels lie in 1..127, test images' in 128..255, so a mosaic tells which split it is tiled from."""
    from dseh.fashion import FILES

    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    for (images, labels), per_class, lo in zip(FILES.values(), (train_per_class, test_per_class), (1, 128)):
        y = np.tile(np.arange(10, dtype=np.uint8), per_class)
        x = rng.integers(lo, lo + 127, size=(len(y), 28, 28), dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{images}{suffix}", x)
        write_idx(folder / f"{labels}{suffix}", y)
    return folder


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    return make_fashion_dir(tmp_path_factory.mktemp("fashion"))


def _source(fashion_dir, source, seed=0, **data):
    from dseh.config import from_dict
    from dseh.data import open_source
    from tests.helpers import tiny_raw

    cfg = from_dict(tiny_raw(seed=seed, data={"source": source, "fashion_dir": str(fashion_dir), **data}))
    return open_source(cfg.data, cfg.seed)


def _per_class(labels: np.ndarray) -> list[int]:
    return np.bincount(labels.argmax(1), minlength=10).tolist()


def test_fashion_mnist_protocol_on_a_tiny_folder(fashion_dir):
    src = _source(fashion_dir, "fashion-mnist")  # n_query 60, n_train 200 (tiny_raw)
    n_train_images, n = 250, 330
    query, train, database = src.splits["query"], src.splits["train"], src.splits["database"]
    assert src.labels.shape == (n, 10) and len(query) == 60 and len(train) == 200 and len(database) == n - 60
    assert (src.labels.sum(1) == 1).all() and set(np.unique(src.labels)) == {0, 1}  # one-hot
    assert _per_class(src.labels[query]) == [6] * 10 and _per_class(src.labels[train]) == [20] * 10
    assert (query >= n_train_images).all() and (train < n_train_images).all()  # test set / training set
    assert not set(query) & set(database) and set(query) | set(database) == set(range(n))
    assert set(train) <= set(database) and len(set(train)) == 200 and len(set(query)) == 60
    assert src.classes[0] == "T-shirt/top" and src.classes[9] == "Ankle boot"


@pytest.mark.parametrize("source", ["fashion-mnist", "fashion-mosaic"])
def test_fashion_sources_are_seeded(fashion_dir, source):
    a, b, c = (_source(fashion_dir, source, seed=s) for s in (0, 0, 1))
    for split in ("train", "query", "database"):
        assert np.array_equal(a.splits[split], b.splits[split])
    assert np.array_equal(a.labels, b.labels)
    assert any(not np.array_equal(a.splits[s], c.splits[s]) for s in ("train", "query"))
    idx = np.arange(len(a.labels))
    assert np.array_equal(a.load_chunk(idx)[0], b.load_chunk(idx)[0])
    if source == "fashion-mosaic":
        assert not np.array_equal(a.load_chunk(idx)[0], c.load_chunk(idx)[0])


def test_fashion_mosaic_protocol_on_a_tiny_folder(fashion_dir):
    src = _source(fashion_dir, "fashion-mosaic", image_size=56)  # n_database 400, n_train 200, n_query 60
    query, train, database = src.splits["query"], src.splits["train"], src.splits["database"]
    assert src.labels.shape == (460, 10) and (len(query), len(train), len(database)) == (60, 200, 400)
    assert set(train) <= set(database) and not set(query) & set(database)
    counts = src.labels.sum(1)
    assert set(np.unique(src.labels)) == {0, 1} and counts.min() >= 1 and counts.max() <= 4 and (counts > 1).any()
    images, failed = src.load_chunk(np.arange(460))
    assert images.shape == (460, 56, 56, 3) and images.dtype == np.uint8 and not failed
    # query mosaics are tiled from test images only (pixels 128..255), the others from training images
    q, db = images[query], images[database]
    assert q[q > 0].min() >= 128 and db.max() <= 127
    # each mosaic's labels are the classes of its non-empty cells: a mosaic has as many non-empty cells
    cells = images[:, :, :, 0].reshape(460, 2, 28, 2, 28).transpose(0, 1, 3, 2, 4).reshape(460, 4, -1)
    assert ((cells > 0).all(2).sum(1) >= counts).all()


def test_fashion_prepare_writes_the_files_pixels(fashion_dir, tmp_path):
    from dseh import stages
    from dseh.config import from_dict
    from dseh.data import PreparedData
    from dseh.idx import read_idx
    from tests.helpers import tiny_raw

    cfg = from_dict(tiny_raw(data={"source": "fashion-mnist", "fashion_dir": str(fashion_dir), "image_size": 28}))
    stages.prepare(cfg, tmp_path / "data", progress=False)
    d = PreparedData(tmp_path / "data")
    train = read_idx(fashion_dir / "train-images-idx3-ubyte.gz")
    test = read_idx(fashion_dir / "t10k-images-idx3-ubyte.gz")
    assert d.images.shape == (330, 28, 28, 3)
    assert np.array_equal(d.images[:250, :, :, 1], train) and np.array_equal(d.images[250:, :, :, 2], test)
    assert d.classes[1] == "Trouser" and d.manifest["sizes"]["query"] == 60
    assert d.manifest["source"]["source"] == "fashion-mnist"


def test_fashion_reads_plain_idx_files_too(tmp_path):
    folder = make_fashion_dir(tmp_path / "plain", gz=False)
    assert len(_source(folder, "fashion-mnist").labels) == 330


def test_missing_fashion_folder_says_how_to_install(tmp_path):
    with pytest.raises(DsehError, match="apt-get install dataset-fashion-mnist") as exc:
        _source(tmp_path / "nowhere", "fashion-mosaic")
    assert "data.fashion_dir" in str(exc.value) and "does not exist" in str(exc.value)
    folder = make_fashion_dir(tmp_path / "partial")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DsehError, match="lacks t10k-labels-idx1-ubyte .*apt-get install dataset-fashion-mnist"):
        _source(folder, "fashion-mnist")


@pytest.mark.parametrize(
    "data, match",
    [
        ({"n_query": 65}, "'data.n_query'.* positive multiple of 10, got 65"),
        ({"n_train": 0}, "'data.n_train'.* positive multiple of 10, got 0"),
        ({"n_query": 100}, "asks 10 images per class, but the test set holds 8 of class 0 \\(T-shirt/top\\)"),
    ],
)
def test_fashion_mnist_sizes_checked(fashion_dir, data, match):
    with pytest.raises(DsehError, match=match):
        _source(fashion_dir, "fashion-mnist", **data)


def test_fashion_folder_is_a_dependency_of_prepare():
    from dseh.config import from_dict
    from dseh.dvcfile import source_deps

    for source in ("fashion-mnist", "fashion-mosaic"):
        assert source_deps(from_dict({"data": {"source": source, "fashion_dir": "/data/fm"}})) == ["/data/fm"]
    assert source_deps(from_dict({})) == []


REAL = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not REAL.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_prepares(tmp_path):
    from dseh import stages
    from dseh.config import from_dict
    from dseh.data import PreparedData

    cfg = from_dict({"data": {"source": "fashion-mnist", "image_size": 28}, "tracking": {"enabled": False}})
    stages.prepare(cfg, tmp_path / "data", progress=False)
    d = PreparedData(tmp_path / "data")
    assert d.images.shape == (70000, 28, 28, 3) and d.labels.shape == (70000, 10)
    assert (len(d.query), len(d.train), len(d.database)) == (1000, 5000, 69000)
    assert _per_class(d.labels[d.query]) == [100] * 10 and _per_class(d.labels[d.train]) == [500] * 10
    assert _per_class(d.labels) == [7000] * 10 and (d.query >= 60000).all() and (d.train < 60000).all()
    assert not set(d.query) & set(d.database)
