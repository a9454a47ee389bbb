"""What a data source yields (Source), and what the sources built from small grayscale images share:
nearest-neighbour conversion to RGB at the prepared size and 2x2 mosaics labelled with the classes present.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from dseh.errors import DsehError

if TYPE_CHECKING:
    from dseh.config import DataConfig


@dataclass
class Source:
    """What a source yields before decoding: item paths (or None), labels, classes and splits."""

    name: str
    labels: np.ndarray  # (N, c) uint8
    classes: list[str]
    splits: dict[str, np.ndarray]  # split -> item indices
    paths: list[str] | None  # per item, relative to the image root; None for built-in data
    load_chunk: Callable[[np.ndarray], tuple[np.ndarray, dict[int, str]]]
    # load_chunk(indices) -> (uint8 images (n, H, W, 3), {position within the chunk: why it failed})
    describe: dict
    # how and where images were brought to data.image_size (the manifest's `resize`)
    resize: dict = field(default_factory=lambda: {"method": "nearest-neighbour sampling (numpy)", "device": "cpu"})


def gray_to_rgb(gray: np.ndarray, size: int) -> np.ndarray:
    """(n, h, w) uint8 -> (n, size, size, 3) uint8 by nearest-neighbour sampling at pixel centres:
    at a whole multiple of h and w each pixel becomes a size/h x size/w block (np.repeat's result)."""
    _, h, w = gray.shape
    rows = ((2 * np.arange(size) + 1) * h) // (2 * size)
    cols = ((2 * np.arange(size) + 1) * w) // (2 * size)
    img = gray[:, rows][:, :, cols]
    return np.repeat(img[..., None], 3, axis=3)


def gray_loader(gray: np.ndarray, size: int) -> Callable[[np.ndarray], tuple[np.ndarray, dict[int, str]]]:
    """A Source.load_chunk over in-memory grayscale images (which never fail to load)."""

    def load_chunk(idx: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        return gray_to_rgb(gray[idx], size), {}

    return load_chunk


def check_mosaic_sizes(cfg: DataConfig) -> None:
    if not 0 < cfg.n_train <= cfg.n_database or cfg.n_query < 1:
        raise DsehError(
            "params keys 'data.n_train/n_database/n_query': need 0 < n_train <= n_database "
            f"and n_query >= 1, got {cfg.n_train}/{cfg.n_database}/{cfg.n_query}"
        )


def _mosaics(
    rng: np.random.Generator, tiles: np.ndarray, targets: np.ndarray, n_classes: int, n: int, pool: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """n 2x2 mosaics of tiles drawn from `pool` (each cell kept with probability 1/2, at least one
    per mosaic, the others black) and their multi-hot labels: the set of classes present."""
    present = rng.random((n, 4)) < 0.5
    empty = ~present.any(axis=1)
    present[np.flatnonzero(empty), rng.integers(0, 4, size=int(empty.sum()))] = True
    chosen = pool[rng.integers(0, len(pool), size=(n, 4))]
    cells = tiles[chosen] * present[:, :, None, None]  # (n, 4, h, w)
    top = np.concatenate([cells[:, 0], cells[:, 1]], axis=2)
    bottom = np.concatenate([cells[:, 2], cells[:, 3]], axis=2)
    labels = np.zeros((n, n_classes), dtype=np.uint8)
    rows = np.repeat(np.arange(n), 4)
    keep = present.ravel()
    labels[rows[keep], targets[chosen].ravel()[keep]] = 1
    return np.concatenate([top, bottom], axis=1), labels  # (n, 2h, 2w)


def mosaic_source(
    cfg: DataConfig,
    rng: np.random.Generator,
    tiles: np.ndarray,
    targets: np.ndarray,
    classes: list[str],
    pools: tuple[np.ndarray, np.ndarray],
    describe: dict,
) -> Source:
    """A multi-label source of 2x2 mosaics of grayscale `tiles` (N, h, w) with class ids `targets`:
    data.n_query query mosaics from the tiles in pools[0], data.n_database database mosaics (in a
    seeded order, the first data.n_train of them the training set) from those in pools[1]."""
    q_gray, q_lab = _mosaics(rng, tiles, targets, len(classes), cfg.n_query, pools[0])
    db_gray, db_lab = _mosaics(rng, tiles, targets, len(classes), cfg.n_database, pools[1])
    query = np.arange(cfg.n_query)
    database = cfg.n_query + rng.permutation(cfg.n_database)
    return Source(
        name=describe["source"],
        labels=np.concatenate([q_lab, db_lab]),
        classes=classes,
        splits={"train": database[: cfg.n_train].copy(), "query": query, "database": database},
        paths=None,
        load_chunk=gray_loader(np.concatenate([q_gray, db_gray]), cfg.image_size),
        describe=describe,
    )
