"""`dseh search`: encode query image files with a trained ImgNet and rank the database codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dseh.codes import pack
from dseh.data import PreparedData, _decode
from dseh.errors import DsehError
from dseh.evaluation import hamming_topk_packed
from dseh.stages import CODES, load_imgnet


def load_query_images(paths: list[str], size: int) -> np.ndarray:
    """Decode files to uint8 (n, size, size, 3) as `prepare` does; a bad file is a clear error."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        f = Path(p)
        if not f.is_file():
            raise DsehError(f"query image {p} does not exist")
        try:
            out[i] = _decode(f.read_bytes(), size)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types
            raise DsehError(f"query image {p} cannot be decoded: {exc}") from exc
    return out


def search(model_dir: str, data_dir: str, images: list[str], k: int = 10, weights: str | None = None) -> list[dict]:
    """Top-k database items per query image: index, source path, Hamming distance, labels."""
    data = PreparedData(data_dir)
    model, state = load_imgnet(model_dir, weights)
    codes_file = Path(model_dir) / CODES
    if not codes_file.is_file():
        raise DsehError(f"{codes_file} does not exist: {model_dir} is not an ImgNet step output")
    db_codes = np.load(codes_file, mmap_mode="r")
    if db_codes.shape[1] * 8 < state["bits"] or db_codes.shape[1] != (state["bits"] + 7) // 8:
        raise DsehError(f"{codes_file} holds {db_codes.shape[1] * 8}-bit rows but the model emits {state['bits']} bits")
    if len(db_codes) != len(data.labels):
        raise DsehError(
            f"{codes_file} has {len(db_codes)} codes but {data_dir} has {len(data.labels)} items: another dataset?"
        )
    x = load_query_images(images, int(state["image_size"]))
    with torch.no_grad():
        _, u = model(torch.from_numpy(x))
    q = pack(u.numpy())
    if q.shape[1] != db_codes.shape[1]:
        raise DsehError(f"model emits {u.shape[1]} bits but the database codes have {db_codes.shape[1] * 8}")
    db_items = data.database
    ids, dist = hamming_topk_packed(q, np.asarray(db_codes[db_items]), k)
    results = []
    for img, row_ids, row_d in zip(images, ids, dist):
        rows = []
        for rank, (j, d) in enumerate(zip(row_ids, row_d), start=1):
            item = int(db_items[j])
            rows.append(
                {
                    "rank": rank,
                    "index": item,
                    "path": data.paths[item] if data.paths else None,
                    "distance": int(d),
                    "labels": [data.classes[c] for c in np.flatnonzero(data.labels[item])],
                }
            )
        results.append({"image": img, "results": rows})
    return results
