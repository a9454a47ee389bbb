"""Fashion-MNIST's 70,000 real 28x28 images from its four idx files (Debian's dataset-fashion-mnist):
the single-label `fashion-mnist` protocol, and `fashion-mosaic`, multi-label 2x2 mosaics of them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dseh.errors import DsehError
from dseh.idx import read_images_labels
from dseh.source import Source, check_mosaic_sizes, gray_loader, mosaic_source

if TYPE_CHECKING:
    from dseh.config import DataConfig

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# split -> (images file, labels file), each read as <name>.gz or, failing that, <name>
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
INSTALL = "install Debian's package (apt-get install dataset-fashion-mnist) or point data.fashion_dir at a folder"


def _find(folder: Path, name: str) -> Path | None:
    return next((p for p in (folder / f"{name}.gz", folder / name) if p.is_file()), None)


def load_fashion(folder: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (60000, 28, 28) uint8 images and (60000,) class ids, 'test': the same for 10,000}."""
    root = Path(folder)
    found = {name: _find(root, name) for pair in FILES.values() for name in pair}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        if not root.is_dir():
            names = ", ".join(found)
            what = f"does not exist; {INSTALL} holding Fashion-MNIST's four idx files ({names}, each .gz or plain)"
        else:
            what = f"lacks {', '.join(missing)} (.gz or plain); {INSTALL} holding all four idx files"
        raise DsehError(f"params key 'data.fashion_dir': Fashion-MNIST folder {root} {what}")
    parts = {}
    for split, (images, labels) in FILES.items():
        x, y = read_images_labels(found[images], found[labels])
        if len(y) == 0:
            raise DsehError(f"{found[images]}: holds no images")
        if not 0 <= y.min() <= y.max() < len(CLASSES):
            raise DsehError(f"{found[labels]}: class ids must lie in 0..{len(CLASSES) - 1}, got {y.min()}..{y.max()}")
        parts[split] = (x, y)
    if parts["train"][0].shape[1:] != parts["test"][0].shape[1:]:
        raise DsehError(f"{root}: training and test images differ in size")
    return parts


def _per_class(rng: np.random.Generator, targets: np.ndarray, k: int, key: str, where: str) -> np.ndarray:
    """k indices of each class drawn without replacement, in a seeded order."""
    picked = []
    for c, name in enumerate(CLASSES):
        pool = np.flatnonzero(targets == c)
        if len(pool) < k:
            raise DsehError(
                f"params key '{key}' asks {k} images per class, but the {where} set holds "
                f"{len(pool)} of class {c} ({name})"
            )
        picked.append(rng.choice(pool, size=k, replace=False))
    return rng.permutation(np.concatenate(picked))


def fashion_mnist(cfg: DataConfig, seed: int) -> Source:
    """The single-label protocol: data.n_query queries (n / 10 per class) from the test set,
    data.n_train training images (n / 10 per class) from the training set, and the database every
    image but the queries (the training images included), in a seeded order. Items are the 60,000
    training images, then the 10,000 test images, in the files' order."""
    n_classes = len(CLASSES)
    for key, n in (("data.n_query", cfg.n_query), ("data.n_train", cfg.n_train)):
        if n < n_classes or n % n_classes:
            raise DsehError(
                f"params key '{key}': fashion-mnist samples it evenly over its {n_classes} classes, "
                f"so it must be a positive multiple of {n_classes}, got {n}"
            )
    parts = load_fashion(cfg.fashion_dir)
    (x_train, y_train), (x_test, y_test) = parts["train"], parts["test"]
    rng = np.random.default_rng(seed)
    query = len(x_train) + _per_class(rng, y_test, cfg.n_query // n_classes, "data.n_query", "test")
    train = _per_class(rng, y_train, cfg.n_train // n_classes, "data.n_train", "training")
    n = len(x_train) + len(x_test)
    rest = np.setdiff1d(np.arange(n), query)
    targets = np.concatenate([y_train, y_test])
    return Source(
        name="fashion-mnist",
        labels=np.eye(n_classes, dtype=np.uint8)[targets],
        classes=list(CLASSES),
        splits={"train": train, "query": query, "database": rest[rng.permutation(len(rest))]},
        paths=None,
        load_chunk=gray_loader(np.concatenate([x_train, x_test]), cfg.image_size),
        describe={
            "source": "fashion-mnist",
            "fashion_dir": cfg.fashion_dir,
            "items": f"{len(x_train)} training images, then {len(x_test)} test images",
            "query": f"{cfg.n_query // n_classes} per class from the test images",
            "train": f"{cfg.n_train // n_classes} per class from the training images",
        },
    )


def fashion_mosaic(cfg: DataConfig, seed: int) -> Source:
    """2x2 mosaics of Fashion-MNIST images, multi-label like NUS-WIDE (labels: the set of classes
    present), with digits-mosaic's protocol: data.n_query query mosaics, data.n_database database
    mosaics of which the first data.n_train (in a seeded order) are the training set.

    Where digits-mosaic splits its one pool of source digits by seed (a third for the queries),
    Fashion-MNIST comes with two: query mosaics are tiled from the 10,000 test images only, database
    and training mosaics from the 60,000 training images only, so no source image is shared between
    query and database and the split is the dataset's own, the same for every seed. Mosaics are
    56x56, brought to data.image_size by nearest-neighbour sampling (any size; 56 or 224 is exact)."""
    check_mosaic_sizes(cfg)
    parts = load_fashion(cfg.fashion_dir)
    (x_train, y_train), (x_test, y_test) = parts["train"], parts["test"]
    tiles = np.concatenate([x_train, x_test])
    targets = np.concatenate([y_train, y_test])
    pools = (len(x_train) + np.arange(len(x_test)), np.arange(len(x_train)))
    describe = {
        "source": "fashion-mosaic",
        "fashion_dir": cfg.fashion_dir,
        "query_tiles": f"the {len(x_test)} test images",
        "database_tiles": f"the {len(x_train)} training images",
    }
    return mosaic_source(cfg, np.random.default_rng(seed), tiles, targets, list(CLASSES), pools, describe)
