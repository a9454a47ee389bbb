"""Shared test helpers: the tiny params (TINY, LEARNING, tiny_raw) and small input files on disk
(images, a list-files collection, the HDF5 pair)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 0,
    "bits": 16,
    # data.device cpu: Pillow's resize on any machine, so tests that compare with Pillow hold on a GPU one too
    "data": {"n_database": 400, "n_train": 200, "n_query": 60, "chunk_size": 128, "device": "cpu"},
    "labnet": {"hidden": 128, "batch_size": 32, "epochs": [2]},
    "imgnet": {"batch_size": 64, "epochs": [2], "encode_batch_size": 256},
    "train": {"rounds": 1, "threads": 1, "loader_workers": 1},
    "evaluate": {"topk": 100, "precision_at": [10, 50, 100], "heatmap_items": 20},
    "tracking": {"enabled": False},
}
# enough LabNet steps (~400) for codes to form on 200 training items; still seconds
LEARNING = {
    "bits": 32,
    "labnet": {"epochs": [30], "batch_size": 16, "hidden": 512},
    "train": {"step_epochs": 100},
    "imgnet": {"epochs": [6], "batch_size": 32, "lr_exp": 3.5},
}


def tiny_raw(**sections) -> dict:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return raw


def write_image(path: Path, seed: int, size: int = 12, fmt: str = "PNG") -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, format=fmt)


def make_list_collection(root: Path, n: int = 12, classes: int = 4) -> dict[str, list[str]]:
    """Images under root/images, list files train.txt/test.txt/database.txt under root."""
    rng = np.random.default_rng(1)
    lines = []
    for i in range(n):
        rel = f"img/{i:03d}.{'jpg' if i % 2 else 'png'}"
        write_image(root / "images" / rel, i, fmt="JPEG" if i % 2 else "PNG")
        lab = (rng.random(classes) < 0.4).astype(int)
        lab[i % classes] = 1
        lines.append(rel + " " + " ".join(map(str, lab)))
    splits = {"test.txt": lines[:3], "database.txt": lines[3:], "train.txt": lines[3:9]}
    for name, rows in splits.items():
        (root / name).write_text("\n".join(rows) + "\n")
    return splits


def write_h5_pair(root: Path, n_classes: int = 3, lab_width: int | None = None) -> None:
    """The release's HDF5 pair under root: Img.h5 (image paths per split), Lab.h5 (label rows per
    split, class 0 always set) and the images under root/images; 5 train, 2 query, 4 database items."""
    import h5py

    rng = np.random.default_rng(0)
    names = {"Train": 5, "Query": 2, "DataBase": 4}
    with h5py.File(root / "Img.h5", "w") as fi, h5py.File(root / "Lab.h5", "w") as fl:
        k = 0
        for split, n in names.items():
            paths = []
            for _ in range(n):
                rel = f"im/{k}.png"
                write_image(root / "images" / rel, k)
                paths.append(rel.encode())
                k += 1
            fi.create_dataset("Img" + split, data=np.array(paths, dtype="S"))
            lab = (rng.random((n, lab_width or n_classes)) < 0.5).astype(np.uint8)
            lab[:, 0] = 1
            fl.create_dataset("Lab" + split, data=lab)
