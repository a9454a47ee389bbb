"""The version of the data a pipeline run reads (its `data_version` parameter, with the config the
cache key of the data steps), computed from what DVC or the input files say: the list files' digest,
the md5 DVC recorded for an HDF5 file, or the digest of the files themselves."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from dseh import storage
from dseh.config import DataConfig
from dseh.data import sha256_file
from dseh.errors import DsehError

FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")  # fmt: skip


def _dvc_md5(path: str, root: Path) -> str | None:
    """The md5 DVC recorded for `path`: in `path.dvc` beside it, else as an out or dep in root/dvc.lock."""
    side = Path(f"{path}.dvc")
    if side.is_file():
        outs = (yaml.safe_load(side.read_text()) or {}).get("outs", [])
        if outs and outs[0].get("md5"):
            return outs[0]["md5"]
    lock = root / "dvc.lock"
    if lock.is_file():
        for stage in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).values():
            for entry in [*stage.get("deps", []), *stage.get("outs", [])]:
                if entry.get("md5") and Path(root / entry.get("path", "")).resolve() == Path(path).resolve():
                    return entry["md5"]
    return None


def file_version(uri: str, root: Path, cfg: DataConfig) -> str:
    """One input file's version: DVC's md5 of it, else the sha256 of a local file, else an S3 object's ETag."""
    if not storage.is_s3(uri):
        if (md5 := _dvc_md5(uri, root)) is not None:
            return f"md5:{md5}"
        if not Path(uri).is_file():
            raise DsehError(f"{uri} does not exist: give the run's data version with -S data_version=...")
        return f"sha256:{sha256_file(Path(uri))}"
    return f"etag:{storage.etag(uri, cfg.s3_timeout_s, cfg.s3_retries)}"


def data_version(cfg: DataConfig, root: str | Path = ".") -> str:
    """`<source>-<16 hex>` for the data `prepare` would read with this config. list-files: the list
    files' contents and the image root (the images are named by the lists; a changed image under an
    unchanged name is not seen: then give the version yourself); hdf5: the two files' versions
    (file_version); fashion-*: the idx files when present here; digits-mosaic is made from the seed
    and sizes, which are in the config already."""
    root = Path(root)
    digest = hashlib.sha256(cfg.source.encode())
    if cfg.source == "list-files":
        for name in (cfg.train_list, cfg.query_list, cfg.database_list):
            uri = storage.join(cfg.list_dir, name) if cfg.list_dir else name
            digest.update(hashlib.sha256(storage.read_bytes(uri, cfg.s3_timeout_s, cfg.s3_retries)).digest())
        digest.update(cfg.image_root.encode())
    elif cfg.source == "hdf5":
        for uri in (cfg.img_h5, cfg.lab_h5):
            digest.update(file_version(uri, root, cfg).encode())
    elif cfg.source.startswith("fashion-"):
        for name in FASHION_FILES:
            path = Path(cfg.fashion_dir) / name
            digest.update(file_version(str(path), root, cfg).encode() if path.is_file() else name.encode())
    return f"{cfg.source}-{digest.hexdigest()[:16]}"
