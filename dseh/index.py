"""Search over large databases of packed codes (millions of rows):

- the exact scan, streamed over a memory-mapped codes file in chunks of rows, each chunk's top-k
  merged into a running top-k by (distance, database index): the same ranking as one full scan,
  with memory bounded by the chunk, not the database;
- optional faiss binary indexes for sub-linear search, an inverted file over Hamming k-means
  cells (`ivf`) or multi-index hashing (`mih`). They are approximate: their quality is their
  recall@k against the exact scan, measured and reported beside their speed, never as mAP.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from dseh.errors import DsehError
from dseh.evaluation import hamming_topk_packed
from dseh.storage import atomic_file

log = logging.getLogger(__name__)

CHUNK_ROWS = 1 << 20  # database rows scanned at once (8 MiB of 64-bit codes)
KINDS = ("ivf", "mih")


def merge_topk(
    ids_a: np.ndarray, dist_a: np.ndarray, ids_b: np.ndarray, dist_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two per-query candidate lists by (distance, index), as one scan ranks them."""
    ids = np.concatenate([ids_a, ids_b], axis=1)
    dist = np.concatenate([dist_a, dist_b], axis=1)
    order = np.lexsort((ids, dist), axis=1)[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(dist, order, axis=1)


def exact_topk(
    q_packed: np.ndarray,
    db_packed: np.ndarray,
    k: int,
    chunk_rows: int = CHUNK_ROWS,
    backend: str = "auto",
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by Hamming distance (ties by database position) over `db_packed`, which may be
    a memory-mapped file of any size: it is read `chunk_rows` rows at a time. With `rows`, the
    database is those rows of `db_packed` in that order, and results are positions in `rows`."""
    n = len(db_packed) if rows is None else len(rows)
    k = min(k, n)
    ids = np.zeros((len(q_packed), 0), dtype=np.int64)
    dist = np.zeros((len(q_packed), 0), dtype=np.int32)
    for s in range(0, n, chunk_rows):
        part = db_packed[s : s + chunk_rows] if rows is None else db_packed[np.asarray(rows[s : s + chunk_rows])]
        block = np.ascontiguousarray(part)
        b_ids, b_dist = hamming_topk_packed(q_packed, block, k, backend)
        ids, dist = merge_topk(ids, dist, b_ids + s, b_dist, k)
    return ids, dist


def _faiss():
    try:
        import faiss  # type: ignore
    except ImportError as exc:  # pragma: no cover - faiss is a dependency
        raise DsehError("the approximate index needs faiss (faiss-cpu)") from exc
    return faiss


def build_index(
    db_packed: np.ndarray,
    kind: str = "ivf",
    nlist: int = 0,
    nhash: int = 0,
    train_size: int = 0,
    seed: int = 0,
    chunk_rows: int = CHUNK_ROWS,
):
    """A faiss binary index over every row of `db_packed` (added in chunks, ids = row numbers).

    ivf: `nlist` Hamming k-means cells (default about sqrt(n)), trained on `train_size` sampled
    rows (default 40 per cell); mih: `nhash` hash tables over disjoint substrings of the code
    (default bits / 16)."""
    faiss = _faiss()
    n, nbytes = db_packed.shape
    bits = nbytes * 8
    if kind == "ivf":
        nlist = nlist or int(max(1, min(65536, np.sqrt(n))))
        quantizer = faiss.IndexBinaryFlat(bits)
        index = faiss.IndexBinaryIVF(quantizer, bits, nlist)
        index.own_fields = True
        quantizer.this.disown()
        m = min(n, train_size or 40 * nlist)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
        index.train(np.ascontiguousarray(db_packed[rows]))
    elif kind == "mih":
        nhash = nhash or max(1, bits // 16)
        if bits % nhash or (bits // nhash) > 32:
            raise DsehError(f"multi-index hashing needs {bits} bits split into equal substrings of at most 32 bits")
        index = faiss.IndexBinaryMultiHash(bits, nhash, bits // nhash)
    else:
        raise DsehError(f"unknown index kind '{kind}': one of {', '.join(KINDS)}")
    for s in range(0, n, chunk_rows):
        index.add(np.ascontiguousarray(db_packed[s : s + chunk_rows]))
    return index


def set_search_effort(index, nprobe: int = 0, nflip: int = 0) -> None:
    """ivf: cells visited per query; mih: bits flipped per substring when probing the tables."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexBinaryIVF):
        index.nprobe = nprobe or max(1, index.nlist // 64)
    elif isinstance(index, faiss.IndexBinaryMultiHash):
        index.nflip = nflip or 1


def index_topk(index, q_packed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist, ids = index.search(np.ascontiguousarray(q_packed, dtype=np.uint8), k)
    return ids.astype(np.int64), dist.astype(np.int32)


def recall_at_k(approx: tuple[np.ndarray, np.ndarray], exact: tuple[np.ndarray, np.ndarray]) -> dict:
    """Two recalls of an approximate top-k against the exact one:
    - `ids`: the share of the exact top-k item ids that were returned (the usual recall@k; with
      Hamming ties, an equally near item outside the exact list counts as a miss);
    - `distance`: the share of returned items at most as far as the exact k-th neighbour (ties
      count as hits)."""
    a_ids, a_dist = approx
    e_ids, e_dist = exact
    k = e_ids.shape[1]
    hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(a_ids, e_ids)]
    kth = e_dist[:, -1:]
    within = ((a_dist <= kth) & (a_ids >= 0)).sum(axis=1)
    return {"ids": float(np.mean(hits) / k), "distance": float(np.mean(within) / k)}


def save_index(index, path: str | Path, report: dict | None = None) -> None:
    """The index at `path` and, when given, its measurement `report` beside it at PATH.json; both
    written in full before either replaces what was there."""
    faiss = _faiss()
    path = Path(path)
    with atomic_file(path) as tmp:
        faiss.write_index_binary(index, str(tmp))
        if report is not None:
            with atomic_file(path.with_name(path.name + ".json")) as tmp_json:
                tmp_json.write_text(json.dumps(report, indent=2))


def load_index(path: str | Path):
    faiss = _faiss()
    if not Path(path).is_file():
        raise DsehError(f"index {path} does not exist: build it with `dseh index`")
    try:
        return faiss.read_index_binary(str(path))
    except RuntimeError as exc:
        raise DsehError(f"{path} is not a faiss binary index: {exc}") from exc


def measure_index(index, q_packed: np.ndarray, k: int, exact: tuple[np.ndarray, np.ndarray], exact_s: float) -> dict:
    """An index measured on the queries `q_packed` against the exact scan's top-k `exact` (which
    took `exact_s` seconds): query latency of both, speed-up, recall@k, and the search effort."""
    t0 = time.perf_counter()
    approx = index_topk(index, q_packed, k)
    index_s = time.perf_counter() - t0
    rec = recall_at_k(approx, exact)
    nq = max(1, len(q_packed))
    report = {
        "index_ms_per_query": round(1000 * index_s / nq, 3),
        "exact_ms_per_query": round(1000 * exact_s / nq, 3),
        "speedup": round(exact_s / max(index_s, 1e-9), 1),
        f"recall_at_{k}_ids": round(rec["ids"], 4),
        f"recall_at_{k}_distance": round(rec["distance"], 4),
    }
    if isinstance(index, _faiss().IndexBinaryIVF):
        report.update({"nlist": int(index.nlist), "nprobe": int(index.nprobe)})
    else:
        report.update({"nhash": int(index.nhash), "nflip": int(index.nflip)})
    return report


def build_and_measure(
    db_packed: np.ndarray,
    q_packed: np.ndarray,
    k: int,
    kind: str = "ivf",
    nlist: int = 0,
    nprobe: int = 0,
    nflip: int = 0,
    chunk_rows: int = CHUNK_ROWS,
    bits: int | None = None,
) -> tuple[object, dict]:
    """Build an index and measure it on the queries `q_packed` (measure_index) against the exact
    chunked scan; the report adds the build time. `bits`: the code length, when it is not a
    multiple of 8 (the index itself works on the padded bytes; padding bits are equal in every code)."""
    t0 = time.perf_counter()
    exact = exact_topk(q_packed, db_packed, k, chunk_rows)
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = build_index(db_packed, kind, nlist, chunk_rows=chunk_rows)
    set_search_effort(index, nprobe, nflip)
    report = {
        "kind": kind,
        "n_database": int(len(db_packed)),
        "bits": int(bits or db_packed.shape[1] * 8),
        "index_bits": int(db_packed.shape[1] * 8),
        "queries": int(len(q_packed)),
        "k": int(k),
        "build_s": round(time.perf_counter() - t0, 3),
    }
    return index, {**report, **measure_index(index, q_packed, k, exact, exact_s)}
