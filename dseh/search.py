"""`dseh search`: encode query image files with a trained ImgNet, or label sets with the round's
LabNet (DSEH's cross-modal search), and rank the database's ImgNet codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dseh.artifacts import CODES
from dseh.codes import pack
from dseh.data import PreparedData, decode_image
from dseh.encoder import encode_images
from dseh.errors import DsehError
from dseh.models.factory import load_imgnet
from dseh.retrieval import label_codes, label_names, label_vector


def load_query_images(paths: list[str], size: int) -> np.ndarray:
    """Decode files to uint8 (n, size, size, 3) as `prepare` does; a bad file is a clear error."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        f = Path(p)
        if f.is_dir():
            raise DsehError(f"query image {p} is a directory; give image files")
        if not f.is_file():
            raise DsehError(f"query image {p} does not exist")
        try:
            out[i] = decode_image(f.read_bytes(), size)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types
            raise DsehError(f"query image {p} cannot be decoded: {exc}") from exc
    return out


def _encode_with_mlflow(model_uri: str, images: list[str], timeout_s: float) -> np.ndarray:
    """+-1 codes of image files from a registered pyfunc model (models:/name@alias, runs:/...); the
    tracking server must answer within timeout_s, and every registry call is bounded by it."""
    import mlflow

    from dseh import tracking

    uri = tracking.tracking_uri()
    tracking.check_server(uri, timeout_s, "")
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI
        raise DsehError(f"cannot load MLflow model {model_uri}: {exc}") from exc
    shape = model.metadata.get_input_schema().inputs[0].shape  # (-1, H, W, 3)
    return np.asarray(model.predict(load_query_images(images, int(shape[1]))))


def item_codes(codes_file: Path, data: PreparedData, data_dir: str | Path) -> np.ndarray:
    """The packed codes of every item of `data`, memory-mapped from `codes_file`; a missing file, or
    the codes of another dataset, is one clear error."""
    if not codes_file.is_file():
        raise DsehError(f"{codes_file} does not exist: pass the packed database codes of this model")
    try:
        codes = np.load(codes_file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DsehError(f"{codes_file} is not a .npy array of packed codes ({exc})") from None
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise DsehError(f"{codes_file} holds {codes.dtype} {codes.shape}, not packed uint8 codes (items, bytes)")
    if len(codes) != len(data.labels):
        raise DsehError(
            f"{codes_file} has {len(codes)} codes but {data_dir} has {len(data.labels)} items: another dataset?"
        )
    return codes


def round_labnet(model_dir: str | Path) -> Path:
    """The LabNet output of an ImgNet output's round: ROOT/imgnet/roundR -> ROOT/labnet/roundR."""
    m = Path(model_dir)
    return m.parent.parent / "labnet" / m.name


def search(
    model_dir: str,
    data_dir: str,
    images: list[str],
    k: int = 10,
    weights: str | None = None,
    codes_path: str | None = None,
    index_path: str | None = None,
    nprobe: int = 0,
    timeout_s: float = 10.0,
    labels: list[str] | None = None,
    labnet_dir: str | None = None,
) -> list[dict]:
    """Top-k database items per query image or label set: index, source path, Hamming distance, labels.

    `model_dir` is an ImgNet step output, or an MLflow model URI (models:/dseh-imgnet@champion) with
    `codes_path` naming the packed database codes that model produced (an ImgNet output's codes.npy).
    `labels` are label sets ("a,b": class names of the dataset), encoded by the round's LabNet
    (`labnet_dir`, default the LabNet output of the ImgNet's round). The exact search streams the
    memory-mapped codes in chunks; `index_path` (from `dseh index`) searches an approximate faiss
    index instead, `nprobe` cells per query for ivf."""
    if k < 1:
        raise DsehError(f"-k must be at least 1, got {k}")
    names = [*images, *(labels or [])]
    if not names:
        raise DsehError("give query image files or --labels")
    data = PreparedData(data_dir)
    parts = []
    if model_dir.startswith(("models:/", "runs:/")):
        if not codes_path:
            raise DsehError(
                "searching with an MLflow model needs --codes: the packed codes.npy of that model's database"
            )
        if labels:
            raise DsehError("label sets are searched with step outputs (--model ROOT/imgnet/roundR), not MLflow URIs")
        codes_file = Path(codes_path)
        parts.append(pack(_encode_with_mlflow(model_dir, images, timeout_s)))
    else:
        model, state = load_imgnet(model_dir, weights)
        if state.dataset_sha256 != data.sha256:
            raise DsehError(f"{model_dir} was trained on another prepared dataset than {data_dir}: give its --data")
        codes_file = Path(codes_path) if codes_path else Path(model_dir) / CODES
        if images:
            x = load_query_images(images, state.image_size)
            parts.append(pack(encode_images(model, x, None, state.config.imgnet.encode_batch_size)[1]))
        if labels:
            parts.append(_labnet_queries(labnet_dir or round_labnet(model_dir), state.bits, data, labels))
    q = np.concatenate(parts)
    db_codes = item_codes(codes_file, data, data_dir)
    if q.shape[1] != db_codes.shape[1]:
        raise DsehError(
            f"the model emits {q.shape[1] * 8}-bit (padded) codes but {codes_file} holds {db_codes.shape[1] * 8}-bit rows"
        )
    return _describe(data, names, len(images), *_rank(q, db_codes, data.database, k, index_path, nprobe))


def _labnet_queries(labnet_dir: str | Path, bits: int, data: PreparedData, labels: list[str]) -> np.ndarray:
    """Packed LabNet codes of label sets, from the LabNet step output that trained with the ImgNet."""
    from dseh.models.factory import load_labnet

    labnet, lstate = load_labnet(labnet_dir)
    if lstate.dataset_sha256 != data.sha256 or lstate.bits != bits:
        raise DsehError(f"{labnet_dir} is not the LabNet of this model (another dataset or code length): give --labnet")
    return label_codes(labnet, np.stack([label_vector(s, data.classes) for s in labels]))


def _rank(q: np.ndarray, db_codes: np.ndarray, db_items: np.ndarray, k: int, index_path: str | None, nprobe: int):
    """(ids, distances, search kind): positions in db_items by the exact scan or a faiss index."""
    from dseh import index as ix

    if not index_path:
        return (*ix.exact_topk(q, db_codes, k, rows=db_items), "exact")
    idx = ix.load_index(index_path)
    if idx.ntotal != len(db_items) or idx.d != q.shape[1] * 8:
        raise DsehError(
            f"index {index_path} holds {idx.ntotal} codes of {idx.d} bits, the database {len(db_items)} "
            f"of {q.shape[1] * 8}: build it again with `dseh index`"
        )
    side = Path(index_path + ".json")  # the build's report: its search effort is the default
    built = json.loads(side.read_text()) if side.is_file() else {}
    ix.set_search_effort(idx, nprobe or built.get("nprobe", 0), built.get("nflip", 0))
    return (*ix.index_topk(idx, q, k), f"approximate ({type(idx).__name__})")


def _describe(data: PreparedData, names: list[str], n_images: int, ids, dist, search_kind: str) -> list[dict]:
    """One result per query (the first n_images are image files, the rest label sets)."""
    db_items = data.database
    results = []
    for qi, (name, row_ids, row_d) in enumerate(zip(names, ids, dist)):
        rows = []
        for rank, (j, d) in enumerate(zip(row_ids, row_d), start=1):
            if j < 0:  # an approximate index found fewer than k
                break
            item = int(db_items[j])
            rows.append({
                "rank": rank,
                "index": item,
                "path": data.paths[item] if data.paths else None,
                "distance": int(d),
                "labels": [data.classes[c] for c in np.flatnonzero(data.labels[item])],
            })  # fmt: skip
        query = {"image": name} if qi < n_images else {"labels": label_names(name)}
        results.append({**query, "search": search_kind, "results": rows})
    return results


def request_body(data_dir: str, images: list[str], labels: list[str] | None, k: int) -> dict:
    """The served retrieval model's request for these queries: one row per image file (decoded at
    the dataset's image size, as `dseh search` does; its H * W * 3 values in row-major order) or
    label set, and the param k."""
    data = PreparedData(data_dir)
    # both keys in every row: a missing one would reach the server as NaN, not as an absent value
    decoded = load_query_images(images, data.images.shape[1])
    rows: list[dict] = [{"image": x.ravel().tolist(), "labels": None} for x in decoded]  # flat (H, W, 3) values
    rows += [{"image": None, "labels": label_names(s)} for s in labels or []]
    for s in labels or []:
        label_vector(s, data.classes)  # an unknown class is named here, not by the server
    if not rows:
        raise DsehError("give query image files or --labels")
    return {"dataframe_records": rows, "params": {"k": k}}
