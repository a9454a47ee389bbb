"""Data sources (their registry SOURCES; built-in digits-mosaic, DeepHash list files, the DSEH release's
HDF5 pair; Fashion-MNIST's in dseh/fashion.py) and the prepared dataset: one memory-mapped uint8 image array, labels, split indices and a manifest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import posixpath
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dseh import storage
from dseh.errors import DsehError, MissingObject
from dseh.fashion import fashion_mnist, fashion_mosaic
from dseh.images import BadImage, decode_image, decode_rgb, resize_batch, resize_device, resize_info
from dseh.listfile import parse_list_file
from dseh.source import Source, check_mosaic_sizes, mosaic_source

if TYPE_CHECKING:
    from dseh.config import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "query", "database")
FILES = {
    "images": "images.npy",
    "labels": "labels.npy",
    "train": "train.npy",
    "query": "query.npy",
    "database": "database.npy",
    "classes": "classes.json",
    "paths": "paths.json",
}
MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- digits-mosaic


def digits_mosaic(cfg: DataConfig, seed: int) -> Source:
    """2x2 mosaics of scikit-learn's 8x8 digits; label = the set of digits present.

    Source digits are split disjointly by seed (a third for query mosaics, the rest for
    train/database), so no digit image is shared between query and database.
    """
    from sklearn.datasets import load_digits

    if cfg.image_size % 16:
        raise DsehError(f"params key 'data.image_size': digits-mosaic needs a multiple of 16, got {cfg.image_size}")
    check_mosaic_sizes(cfg)
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(pixels))
    n_q_src = len(pixels) // 3
    q_src, db_src = perm[:n_q_src], perm[n_q_src:]
    describe = {
        "source": "digits-mosaic",
        "query_source_digits": sorted(int(i) for i in q_src),
        "database_source_digits": sorted(int(i) for i in db_src),
    }
    classes = [str(d) for d in range(10)]
    return mosaic_source(cfg, rng, pixels, digits.target.astype(np.int64), classes, (q_src, db_src), describe)


# --------------------------------------------------------------------------- file sources


def _merge_splits(
    parts: dict[str, tuple[list[str], np.ndarray]], sources: dict[str, str]
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Union of the splits' items, deduplicated by path; splits become index arrays."""
    widths = {split: lab.shape[1] for split, (_, lab) in parts.items()}
    if len(set(widths.values())) > 1:
        desc = ", ".join(f"{sources[s]} has {w}" for s, w in widths.items())
        raise DsehError(f"label width differs between splits: {desc}")
    index: dict[str, int] = {}
    paths: list[str] = []
    label_rows: list[np.ndarray] = []
    splits: dict[str, np.ndarray] = {}
    for split, (p_list, labels) in parts.items():
        ids = np.empty(len(p_list), dtype=np.int64)
        for j, (p, lab) in enumerate(zip(p_list, labels)):
            key = posixpath.normpath(p)
            i = index.get(key)
            if i is None:
                i = index[key] = len(paths)
                paths.append(p)
                label_rows.append(lab)
            elif not np.array_equal(label_rows[i], lab):
                raise DsehError(f"{sources[split]}: '{p}' appears with different labels elsewhere")
            ids[j] = i
        splits[split] = ids
    return paths, np.stack(label_rows), splits


def _file_loader(cfg: DataConfig, paths: Sequence[str], device=None) -> Callable:
    """A Source.load_chunk over image files. Without `device` each decoding thread resizes its image
    with Pillow (decode_image); with a torch device the threads decode at full size and the chunk's
    images are resized there in batches (resize_batch), so a chunk's decoded images are held at
    their own size until then."""

    def load_chunk(idx: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        out = np.zeros((len(idx), cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
        decoded: dict[int, np.ndarray] = {}

        def load_one(pos: int) -> str | None:
            """Decode item idx[pos] into out[pos] (or decoded[pos]); the reason it is bad, or None."""
            uri = storage.inside_root(cfg.image_root, paths[idx[pos]])  # a link out of the root: refused
            try:
                data = storage.read_bytes(uri, cfg.s3_timeout_s, cfg.s3_retries)
            except MissingObject:
                return "does not exist"
            try:
                if device is None:
                    out[pos] = decode_image(data, cfg.image_size, cfg.max_pixels)
                else:
                    decoded[pos] = decode_rgb(data, cfg.max_pixels)
            except BadImage as exc:
                return str(exc)
            except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt files
                return f"cannot be decoded: {exc}"
            return None

        # Each image is decoded straight into `out` (no other copy of results is held) by a pool
        # that lives for one chunk with no more threads than images in it: at most chunk_size
        # images are in flight however large data.workers is, each under data.max_pixels while
        # decoding. An error (a link out of the root) cancels those not yet started.
        with ThreadPoolExecutor(max_workers=max(1, min(cfg.workers, len(idx)))) as pool:
            reasons = list(pool.map(load_one, range(len(idx))))
        if decoded:
            good = sorted(decoded)
            out[good] = resize_batch([decoded.pop(p) for p in good], cfg.image_size, device)
        return out, {pos: why for pos, why in enumerate(reasons) if why is not None}

    return load_chunk


def list_files(cfg: DataConfig, seed: int) -> Source:
    """DeepHash list files (train.txt, test.txt = query, database.txt) and an image root."""
    if not cfg.image_root:
        raise DsehError("params key 'data.image_root' must be set for data.source=list-files")
    files = {"train": cfg.train_list, "query": cfg.query_list, "database": cfg.database_list}
    sources, parts, duplicates = {}, {}, {}
    for split, name in files.items():
        uri = storage.join(cfg.list_dir, name) if cfg.list_dir else name
        sources[split] = uri
        parsed = parse_list_file(storage.read_text(uri, cfg.s3_timeout_s, cfg.s3_retries), uri, cfg.image_root)
        parts[split] = (parsed.paths, parsed.labels)
        if parsed.duplicates:
            duplicates[uri] = parsed.duplicates
    describe = {"source": "list-files", "lists": sources, "image_root": cfg.image_root}
    if duplicates:  # only when there were any, so a clean collection's manifest is unchanged
        describe["duplicate_lines_dropped"] = duplicates
    return _file_source(cfg, seed, parts, sources, describe, with_train=False)


def _file_source(cfg: DataConfig, seed: int, parts: dict, sources: dict, describe: dict, with_train: bool) -> Source:
    """A Source over image files from per-split (paths, labels): items merged by path, the
    database in a seeded order (with the training items too when `with_train`, as in the DSEH
    release's HDF5 protocol)."""
    paths, labels, splits = _merge_splits(parts, sources)
    database = splits["database"]
    if with_train:
        database = np.unique(np.concatenate([splits["train"], database]))
    splits["database"] = database[np.random.default_rng(seed).permutation(len(database))]
    device = resize_device(cfg.device)
    return Source(
        name=describe["source"],
        labels=labels,
        classes=[str(i) for i in range(labels.shape[1])],
        splits=splits,
        paths=paths,
        load_chunk=_file_loader(cfg, paths, device),
        describe=describe,
        resize=resize_info(device),
    )


def hdf5_pair(cfg: DataConfig, seed: int) -> Source:
    """The DSEH release's Img.h5 (ImgTrain/ImgQuery/ImgDataBase paths) and Lab.h5 (labels).

    As in the release, the retrieval set is the training set plus the database.
    """
    import h5py

    if not cfg.img_h5 or not cfg.lab_h5 or not cfg.image_root:
        raise DsehError(
            "params keys 'data.img_h5', 'data.lab_h5' and 'data.image_root' must be set for data.source=hdf5"
        )
    names = {"train": "Train", "query": "Query", "database": "DataBase"}
    parts, sources = {}, {}
    with (
        storage.local_copy(cfg.img_h5, cfg.s3_timeout_s, cfg.s3_retries) as img_path,
        storage.local_copy(cfg.lab_h5, cfg.s3_timeout_s, cfg.s3_retries) as lab_path,
    ):
        try:
            with h5py.File(img_path, "r") as fi, h5py.File(lab_path, "r") as fl:
                for split, suffix in names.items():
                    for f, key, uri in ((fi, "Img" + suffix, cfg.img_h5), (fl, "Lab" + suffix, cfg.lab_h5)):
                        if key not in f:
                            raise DsehError(f"{uri}: dataset '{key}' is missing")
                    raw = fi["Img" + suffix][()]
                    labels = np.asarray(fl["Lab" + suffix][()])
                    paths = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in raw.ravel()]
                    if labels.ndim != 2 or labels.shape[0] != len(paths):
                        raise DsehError(
                            f"{cfg.lab_h5}: Lab{suffix} has shape {labels.shape}, "
                            f"expected ({len(paths)}, classes) to match Img{suffix}"
                        )
                    if len(paths) == 0:
                        raise DsehError(f"{cfg.img_h5}: Img{suffix} is empty")
                    if not np.isin(labels, (0, 1)).all():
                        raise DsehError(f"{cfg.lab_h5}: Lab{suffix} holds values other than 0 and 1")
                    for p in paths:
                        storage.join(cfg.image_root, p)
                    parts[split] = (paths, labels.astype(np.uint8))
                    sources[split] = f"{cfg.img_h5}:Img{suffix}"
        except OSError as exc:
            raise DsehError(f"cannot read HDF5 pair {cfg.img_h5} / {cfg.lab_h5}: {exc}") from exc
    describe = {"source": "hdf5", "img_h5": cfg.img_h5, "lab_h5": cfg.lab_h5, "image_root": cfg.image_root}
    return _file_source(cfg, seed, parts, sources, describe, with_train=True)


SOURCES = {
    "digits-mosaic": digits_mosaic,
    "list-files": list_files,
    "hdf5": hdf5_pair,
    "fashion-mnist": fashion_mnist,
    "fashion-mosaic": fashion_mosaic,
}


def open_source(cfg: DataConfig, seed: int) -> Source:
    if cfg.source not in SOURCES:
        raise DsehError(f"unknown data.source '{cfg.source}'; choose one of {', '.join(SOURCES)}")
    return SOURCES[cfg.source](cfg, seed)


# --------------------------------------------------------------------------- prepare


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _write_npy_header(f, shape: tuple[int, ...], pad_to: int = 0) -> int:
    """Write a version 1.0 .npy header for a C-ordered uint8 array; returns its length in bytes.

    The header is padded with spaces to `pad_to` (or to 64 bytes past its natural length), so a
    header for fewer rows can later be written over it in place."""
    text = repr({"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    body_len = len(text) + 1  # the trailing newline
    total = pad_to or (-(-(10 + body_len + 64) // 64) * 64)
    text = text + " " * (total - 10 - body_len) + "\n"
    f.write(b"\x93NUMPY\x01\x00" + (total - 10).to_bytes(2, "little") + text.encode("latin1"))
    return total


def write_prepared(src: Source, cfg: DataConfig, seed: int, out: Path, progress: bool = True) -> dict:
    """Stream the source's images into `out/images.npy` chunk by chunk (bounded memory) and
    write labels, splits, classes and the manifest. `out` is a fresh temporary directory."""
    from tqdm import tqdm

    n = len(src.labels)
    size = cfg.image_size
    keep = np.ones(n, dtype=bool)
    bad_paths: list[str] = []
    # Plain sequential writes after an .npy header (not a writable memmap): written pages are
    # page cache, not this process's memory, so peak RSS stays at a few chunks for any N.
    with open(out / FILES["images"], "wb") as f:
        header_len = _write_npy_header(f, (n, size, size, 3))
        chunks = range(0, n, cfg.chunk_size)
        for start in tqdm(chunks, desc="prepare", unit="chunk", leave=False, disable=not progress):
            idx = np.arange(start, min(n, start + cfg.chunk_size))
            chunk, reasons = src.load_chunk(idx)
            if reasons:
                bad = sorted(reasons)
                names = [src.paths[idx[b]] if src.paths else str(idx[b]) for b in bad]
                shown = ", ".join(f"{n} ({reasons[b]})" for n, b in zip(names[:5], bad))
                if not cfg.skip_bad_images:
                    raise DsehError(
                        f"{len(bad)} missing or unreadable image(s) under '{cfg.image_root}', first: {shown} "
                        "(set data.skip_bad_images=true to skip and count them)"
                    )
                log.warning("skipping %d bad image(s): %s", len(bad), shown)
                keep[idx[bad]] = False
                bad_paths += names
                chunk = np.delete(chunk, bad, axis=0)
            f.write(np.ascontiguousarray(chunk, dtype=np.uint8).data)  # the buffer itself, no bytes copy
        n_good = int(keep.sum())
        if n_good != n:
            f.seek(0)
            if _write_npy_header(f, (n_good, size, size, 3), pad_to=header_len) != header_len:
                raise AssertionError("npy header grew")  # cannot happen: fewer rows, same padding
    labels, splits, paths = src.labels, dict(src.splits), src.paths
    if n_good != n:
        log.warning("skipped %d bad images, first: %s", len(bad_paths), ", ".join(bad_paths[:5]))
        new_id = np.cumsum(keep) - 1
        labels = labels[keep]
        splits = {k: new_id[v[keep[v]]] for k, v in splits.items()}
        paths = [p for p, k in zip(paths, keep) if k] if paths else None
    for split in SPLITS:
        if len(splits[split]) == 0:
            raise DsehError(f"split '{split}' is empty after preparing {src.name}")
    np.save(out / FILES["labels"], labels.astype(np.uint8))
    for split in SPLITS:
        np.save(out / FILES[split], splits[split].astype(np.int64))
    (out / FILES["classes"]).write_text(json.dumps(src.classes))
    (out / FILES["paths"]).write_text(json.dumps(paths))
    hashes = {name: sha256_file(out / name) for name in sorted(FILES.values())}
    manifest = {
        "source": src.describe,
        "seed": seed,
        "image_size": size,
        "sizes": {
            "items": int(len(labels)),
            "classes": int(labels.shape[1]),
            **{split: int(len(splits[split])) for split in SPLITS},
        },
        "resize": src.resize,
        "skipped_images": len(bad_paths),
        "skipped_examples": bad_paths[:20],
        "files": hashes,
        "dataset_sha256": hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


class PreparedData:
    """A prepared dataset directory, read back (images memory-mapped, never loaded whole)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise DsehError(f"{self.root} is not a prepared dataset (no {MANIFEST}); run `dseh prepare`")
        self.manifest = json.loads(mpath.read_text())
        self.images = np.load(self.root / FILES["images"], mmap_mode="r")
        self.labels = np.load(self.root / FILES["labels"])
        self.splits = {s: np.load(self.root / FILES[s]) for s in SPLITS}
        self.classes = json.loads((self.root / FILES["classes"]).read_text())
        self.paths = json.loads((self.root / FILES["paths"]).read_text())

    def with_splits(self, tag: str, train: np.ndarray, query: np.ndarray, database: np.ndarray) -> PreparedData:
        """The same arrays under other splits (a validation protocol carved from the training set);
        its sha256 gains `tag`, so models trained on it are never mistaken for the real split's."""
        other = copy.copy(self)
        other.splits = {"train": np.asarray(train), "query": np.asarray(query), "database": np.asarray(database)}
        other.manifest = {**self.manifest, "dataset_sha256": f"{self.sha256}/{tag}"}
        return other

    @property
    def train(self) -> np.ndarray:
        return self.splits["train"]

    @property
    def query(self) -> np.ndarray:
        return self.splits["query"]

    @property
    def database(self) -> np.ndarray:
        return self.splits["database"]

    @property
    def n_classes(self) -> int:
        return int(self.labels.shape[1])

    @property
    def sha256(self) -> str:
        return self.manifest["dataset_sha256"]


def as_prepared(data: str | Path | PreparedData) -> PreparedData:
    """A PreparedData for a prepared dataset folder (or the object itself)."""
    return data if isinstance(data, PreparedData) else PreparedData(data)
