"""Preparation's resize on a torch device (`data.device`): the batched torch resize against Pillow's, the
device path of `prepare` run on the CPU (bad images, the manifest), and on CUDA where present."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from dseh import data as data_mod
from dseh import stages
from dseh.config import from_dict
from dseh.data import PreparedData
from dseh.errors import DsehError
from dseh.images import decode_image, decode_rgb, resize_batch
from tests.helpers import make_list_collection, tiny_raw

# (height, width) of test images: smaller and larger than the prepared size, square and not, repeated
SHAPES = [(12, 12), (40, 30), (12, 12), (75, 100), (16, 16), (40, 30), (9, 23)]


def _encoded(shape: tuple[int, int], seed: int, fmt: str = "PNG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (shape[0] // 3 + 2, shape[1] // 3 + 2, 3), dtype=np.uint8)
    im = Image.fromarray(smooth).resize(shape[::-1], Image.BICUBIC)  # textures, not pure noise
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_resize_batch_within_one_level_of_pillow_in_order():
    blobs = [_encoded(s, i) for i, s in enumerate(SHAPES)]
    size = 16
    ref = np.stack([decode_image(b, size) for b in blobs])
    got = resize_batch([decode_rgb(b) for b in blobs], size, torch.device("cpu"))
    assert got.shape == ref.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1  # the stated tolerance (docs/data.md)
    assert np.array_equal(got[4], ref[4])  # already at the size: unchanged, as Pillow's path leaves it
    # each image's own result, whatever else was in the batch (grouping by size keeps the order)
    alone = resize_batch([decode_rgb(blobs[3])], size, torch.device("cpu"))
    assert np.array_equal(alone[0], got[3])


def _cfg(col, **data):
    return from_dict(tiny_raw(data={"source": "list-files", "image_root": str(col / "images"),
                                    "list_dir": str(col), "image_size": 16, **data}))  # fmt: skip


def test_prepare_cpu_path_is_pillows_and_recorded(tmp_path):
    col = tmp_path / "col"
    make_list_collection(col)
    stages.prepare(_cfg(col, device="cpu"), tmp_path / "out", progress=False)
    d = PreparedData(tmp_path / "out")
    assert d.manifest["resize"] == {"method": "Pillow bilinear, per image", "device": "cpu"}
    for i, p in enumerate(d.paths):
        assert np.array_equal(d.images[i], decode_image((col / "images" / p).read_bytes(), 16))


def test_prepare_device_path_on_the_cpu(tmp_path, monkeypatch):
    """The batched path (decode in threads, resize the chunk on the device) run with the CPU as its
    device: the same rows as the Pillow path within one level, bad images skipped alike."""
    col = tmp_path / "col"
    make_list_collection(col, n=14)
    for i, shape in enumerate(SHAPES):  # images of several sizes, larger and smaller than 16
        (col / "images" / f"img/{i:03d}.png").write_bytes(_encoded(shape, i))
    (col / "images/img/008.png").write_bytes(b"not a png")
    stages.prepare(_cfg(col, device="cpu", skip_bad_images=True, chunk_size=5), tmp_path / "pil", progress=False)
    monkeypatch.setattr(data_mod, "resize_device", lambda name: torch.device("cpu"))
    stages.prepare(_cfg(col, skip_bad_images=True, chunk_size=5), tmp_path / "dev", progress=False)
    pil, dev = PreparedData(tmp_path / "pil"), PreparedData(tmp_path / "dev")
    assert dev.manifest["resize"]["method"] == "torch bilinear antialias, batched"
    assert dev.manifest["resize"]["device"] == "cpu"
    assert dev.manifest["skipped_images"] == pil.manifest["skipped_images"] == 1
    assert dev.paths == pil.paths and dev.images.shape == pil.images.shape
    assert np.abs(dev.images.astype(int) - pil.images.astype(int)).max() <= 1
    for split in ("train", "query", "database"):
        assert np.array_equal(dev.splits[split], pil.splits[split])


def test_a_cuda_device_without_cuda_names_the_key(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    col = tmp_path / "col"
    make_list_collection(col)
    with pytest.raises(DsehError, match="data.device"):
        stages.prepare(_cfg(col, device="cuda"), tmp_path / "out", progress=False)
    with pytest.raises(DsehError, match="data.device"):
        stages.prepare(_cfg(col, device="gpu0"), tmp_path / "out", progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resize_batch_on_cuda_equals_the_cpu_to_rounding():
    images = [decode_rgb(_encoded(s, i)) for i, s in enumerate(SHAPES * 20)]
    cpu = resize_batch(images, 16, torch.device("cpu"))
    gpu = resize_batch(images, 16, torch.device("cuda"))
    diff = np.abs(cpu.astype(int) - gpu.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2  # only values within float rounding of .5
