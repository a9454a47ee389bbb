"""Sources and `prepare`: built-in mosaics, list files, the HDF5 pair, S3, bad input, atomic writes."""

import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from dseh import stages, storage
from dseh.config import from_dict
from dseh.data import FILES, MANIFEST, PreparedData, digits_mosaic, parse_list_file
from dseh.errors import DsehError
from tests.helpers import make_list_collection, tiny_raw, write_h5_pair


def _prep(tmp_path, name="data", **sections):
    cfg = from_dict(tiny_raw(**sections))
    stages.prepare(cfg, tmp_path / name, progress=False)
    return PreparedData(tmp_path / name)


def test_digits_mosaic_shapes_labels_and_manifest(tmp_path):
    d = _prep(tmp_path)
    assert d.images.shape == (460, 32, 32, 3) and d.images.dtype == np.uint8
    assert d.labels.shape == (460, 10) and set(np.unique(d.labels)) <= {0, 1}
    assert (d.labels.sum(1) >= 1).all() and (d.labels.sum(1) <= 4).all()
    assert len(d.query) == 60 and len(d.database) == 400 and len(d.train) == 200
    assert set(d.train) <= set(d.database) and not set(d.query) & set(d.database)
    m = json.loads((tmp_path / "data" / MANIFEST).read_text())
    assert m["seed"] == 0 and m["sizes"]["items"] == 460
    assert set(m["files"]) == set(FILES.values())
    assert isinstance(d.images, np.memmap)
    # the database order is shuffled, not sorted by label or index
    assert not np.all(np.diff(d.database) > 0)


def test_digits_mosaic_determinism_same_seed_same_sha(tmp_path):
    a = _prep(tmp_path, "a")
    b = _prep(tmp_path, "b")
    c = _prep(tmp_path, "c", seed=1)
    assert a.manifest["files"] == b.manifest["files"]
    assert a.manifest["files"]["images.npy"] != c.manifest["files"]["images.npy"]


def test_query_mosaics_share_no_source_digit_with_database():
    cfg = from_dict(tiny_raw()).data
    src = digits_mosaic(cfg, seed=3)
    q = set(src.describe["query_source_digits"])
    db = set(src.describe["database_source_digits"])
    assert q and db and not q & db and len(q | db) == 1797


def test_prepare_is_atomic_and_keeps_existing_output(tmp_path, monkeypatch):
    good = _prep(tmp_path)
    before = (tmp_path / "data" / MANIFEST).read_text()
    import dseh.data as data_mod

    def boom(*a, **k):
        raise DsehError("disk full")

    monkeypatch.setattr(data_mod, "sha256_file", boom)
    with pytest.raises(DsehError, match="disk full"):
        stages.prepare(from_dict(tiny_raw(seed=5)), tmp_path / "data", progress=False)
    assert (tmp_path / "data" / MANIFEST).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temp dir left
    assert len(good.labels) == 460


def _list_cfg(root, **extra):
    data = {"source": "list-files", "image_root": str(root / "images"), "list_dir": str(root), "image_size": 16}
    data.update(extra)
    return from_dict(tiny_raw(data=data))


def test_list_files_prepare(tmp_path):
    make_list_collection(tmp_path / "col")
    cfg = _list_cfg(tmp_path / "col")
    stages.prepare(cfg, tmp_path / "out", progress=False)
    d = PreparedData(tmp_path / "out")
    assert d.images.shape == (12, 16, 16, 3)
    assert len(d.query) == 3 and len(d.database) == 9 and len(d.train) == 6
    assert set(d.train) <= set(d.database)
    assert d.paths[int(d.query[0])] == "img/000.png"
    from PIL import Image

    ref = np.asarray(Image.open(tmp_path / "col/images/img/000.png").convert("RGB").resize((16, 16), Image.BILINEAR))
    assert np.array_equal(d.images[int(d.query[0])], ref)


def test_label_width_mismatch_names_file_and_line(tmp_path):
    with pytest.raises(DsehError, match=r"train.txt:3: 3 labels, but line 1 has 4"):
        parse_list_file("a.jpg 0 1 0 0\nb.jpg 1 0 0 0\nc.jpg 1 0 0\n", "train.txt")


def test_label_values_must_be_binary():
    with pytest.raises(DsehError, match="train.txt:1"):
        parse_list_file("a.jpg 0 2 0\n", "train.txt")


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.jpg", "a/../../outside.jpg"])
def test_paths_escaping_the_root_are_rejected(bad):
    with pytest.raises(DsehError, match="absolute|escapes"):
        parse_list_file(f"{bad} 0 1\n", "test.txt")
    with pytest.raises(DsehError, match="absolute|escapes"):
        storage.join("/data/images", bad)


def test_missing_and_corrupt_images_named_or_skipped(tmp_path):
    col = tmp_path / "col"
    make_list_collection(col)
    (col / "images/img/004.png").unlink()
    (col / "images/img/005.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DsehError) as e:
        stages.prepare(_list_cfg(col), tmp_path / "out", progress=False)
    assert "img/004.png" in str(e.value) and "img/005.jpg" in str(e.value) and "skip_bad_images" in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [col]
    stages.prepare(_list_cfg(col, skip_bad_images=True), tmp_path / "out", progress=False)
    d = PreparedData(tmp_path / "out")
    assert d.manifest["skipped_images"] == 2 and len(d.labels) == 10 and len(d.database) == 7
    assert "img/004.png" not in d.paths and d.images.shape[0] == 10
    for i, p in enumerate(d.paths):  # rows still line up with their paths after compaction
        assert d.paths.index(p) == i


def test_empty_split_is_an_error(tmp_path):
    col = tmp_path / "col"
    make_list_collection(col)
    (col / "test.txt").write_text("\n")
    with pytest.raises(DsehError, match="test.txt: no items"):
        stages.prepare(_list_cfg(col), tmp_path / "out", progress=False)


def test_unknown_source(tmp_path):
    with pytest.raises(DsehError, match="data.source"):
        from_dict({"data": {"source": "imagenet"}})


def test_hdf5_pair(tmp_path):
    write_h5_pair(tmp_path)
    cfg = from_dict(
        tiny_raw(
            data={
                "source": "hdf5",
                "img_h5": str(tmp_path / "Img.h5"),
                "lab_h5": str(tmp_path / "Lab.h5"),
                "image_root": str(tmp_path / "images"),
                "image_size": 8,
            }
        )
    )
    stages.prepare(cfg, tmp_path / "out", progress=False)
    d = PreparedData(tmp_path / "out")
    assert len(d.train) == 5 and len(d.query) == 2
    assert len(d.database) == 9  # the release's retrieval set: training set plus database
    assert set(d.train) <= set(d.database)
    assert d.paths[int(d.query[0])] == "im/5.png"


def test_hdf5_missing_dataset_named(tmp_path):
    write_h5_pair(tmp_path)
    with h5py.File(tmp_path / "Lab.h5", "a") as f:
        del f["LabQuery"]
    cfg = from_dict(
        tiny_raw(
            data={
                "source": "hdf5",
                "img_h5": str(tmp_path / "Img.h5"),
                "lab_h5": str(tmp_path / "Lab.h5"),
                "image_root": str(tmp_path / "images"),
                "image_size": 8,
            }
        )
    )
    with pytest.raises(DsehError, match="LabQuery"):
        stages.prepare(cfg, tmp_path / "out", progress=False)


# --------------------------------------------------------------------------- S3 (real SeaweedFS)


def _upload_collection(client, bucket, local: Path, prefix: str):
    client.create_bucket(Bucket=bucket)
    for p in local.rglob("*"):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")


def test_list_files_from_s3(tmp_path, s3_env):
    col = tmp_path / "col"
    make_list_collection(col)
    _upload_collection(s3_env.client(), "dseh-lists", col, "nus")
    cfg = from_dict(
        tiny_raw(
            data={
                "source": "list-files",
                "image_root": "s3://dseh-lists/nus/images",
                "list_dir": "s3://dseh-lists/nus",
                "image_size": 16,
            }
        )
    )
    stages.prepare(cfg, tmp_path / "s3out", progress=False)
    local = _list_cfg(col)
    stages.prepare(local, tmp_path / "localout", progress=False)
    a, b = PreparedData(tmp_path / "s3out"), PreparedData(tmp_path / "localout")
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    assert np.array_equal(a.labels, b.labels)


def test_s3_missing_object_names_bucket_and_key(tmp_path, s3_env):
    s3_env.client().create_bucket(Bucket="dseh-empty")
    with pytest.raises(DsehError, match=r"s3://dseh-empty/none/train.txt does not exist"):
        storage.read_text("s3://dseh-empty/none/train.txt")


@pytest.mark.parametrize("wrong", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_s3_wrong_credentials_end_in_access_denied(tmp_path, s3_env, monkeypatch, wrong):
    col = tmp_path / "col"
    make_list_collection(col)
    bucket = "dseh-private-" + ("secret" if "SECRET" in wrong else "keyid")
    _upload_collection(s3_env.client(), bucket, col, "nus")
    monkeypatch.setenv(wrong, "not-the-key")
    storage._local.__dict__.clear()
    with pytest.raises(DsehError, match=rf"access denied to s3://{bucket}/nus/train.txt \(\w+\): check AWS"):
        storage.read_text(f"s3://{bucket}/nus/train.txt")
    raw = tiny_raw(data={"source": "list-files", "image_root": f"s3://{bucket}/nus/images"})
    raw["data"]["list_dir"] = f"s3://{bucket}/nus"
    out = tmp_path / "out"
    with pytest.raises(DsehError, match="access denied"):
        stages.prepare(from_dict(raw), out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written


def test_s3_unreachable_server_fails_fast(tmp_path, monkeypatch):
    from tests.servers import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    storage._local.__dict__.clear()
    t0 = time.time()
    with pytest.raises(DsehError, match="unreachable"):
        storage.read_bytes("s3://bucket/key.txt", timeout_s=1.0, retries=1)
    assert time.time() - t0 < 30
    storage._local.__dict__.clear()


def test_s3_server_that_does_not_answer_times_out(monkeypatch):
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)  # accepts connections, never answers
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    storage._local.__dict__.clear()
    t0 = time.time()
    try:
        with pytest.raises(DsehError, match=r"s3://bucket/list/train.txt"):
            storage.read_bytes("s3://bucket/list/train.txt", timeout_s=1.0, retries=1)
        assert time.time() - t0 < 20
    finally:
        silent.close()
        storage._local.__dict__.clear()
