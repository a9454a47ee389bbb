"""Hamming ranking and retrieval metrics (definitions in docs/evaluation.md).

- Ranking: ascending Hamming distance, ties broken by database index ascending.
- Relevant: shares at least one label with the query.
- AP@K = sum_{k<=K} P(k) rel(k) / sum_{k<=K} rel(k); a query with no relevant item in its top K
  has AP 0 and stays in the mean. mAP@ALL is K = database size.
- Tie-aware AP (He et al., CVPR 2018): the expectation of AP over orders inside tie groups.
- PR by radius r: precision and recall of {d <= r}, averaged over queries; a query that
  retrieves nothing has precision 0, a query with no relevant item has recall 0.

Everything works in query chunks, or query by query (the report's compiled path,
dseh.evaluation_compiled): memory stays bounded for any database size and no dense queries x
database float matrix is built. Public functions take {-1,+1} codes; the `*_packed`
forms take the packed uint8 rows of dseh.codes.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

import numpy as np

from dseh.codes import pack, to_words
from dseh.retrieval_metrics import (  # noqa: F401 - re-exported: dseh.evaluation's API
    ChunkParts,
    RetrievalReport,
    check_report_inputs,
    label_words,
    report_from_parts,
    tie_aware_ap_from_histograms,
)

log = logging.getLogger(__name__)

try:  # faiss is optional: the numpy path gives the same rankings
    import faiss  # type: ignore
except ImportError:  # pragma: no cover - exercised where faiss is absent
    faiss = None

_CHUNK_ELEMENTS = 1 << 22  # query rows x database rows handled at once
_REPORT_ELEMENTS = 1 << 19  # the same for retrieval_report: its arrays of a chunk stay in the CPU's caches


def _rows_per_chunk(n_db: int, requested: int | None = None, elements: int = _CHUNK_ELEMENTS) -> int:
    rows = max(1, elements // max(1, n_db))
    return min(rows, requested) if requested else rows


def _relevance(q_words: np.ndarray, db_words: np.ndarray) -> np.ndarray:
    """q_words (nq, W) against db_words (nq, k, W) or (ndb, W) -> bool relevance matrix."""
    if db_words.ndim == 2:
        rel = (q_words[:, None, 0] & db_words[None, :, 0]) != 0
        for w in range(1, q_words.shape[1]):
            rel |= (q_words[:, None, w] & db_words[None, :, w]) != 0
        return rel
    return ((q_words[:, None, :] & db_words) != 0).any(axis=2)


def hamming_distances_packed(q_packed: np.ndarray, db_packed: np.ndarray) -> np.ndarray:
    """(nq, ndb) uint16 Hamming distances by XOR + popcount on uint64 words."""
    qw, dw = to_words(q_packed), to_words(db_packed)
    dist = np.bitwise_count(qw[:, None, 0] ^ dw[None, :, 0]).astype(np.uint16)
    for w in range(1, qw.shape[1]):
        dist += np.bitwise_count(qw[:, None, w] ^ dw[None, :, w])
    return dist


def _topk_from_dist(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by (distance, index) from a distance block."""
    n_db = dist.shape[1]
    if k >= n_db:
        order = np.argsort(dist, axis=1, kind="stable")
    else:
        key = dist.astype(np.int64) * n_db + np.arange(n_db, dtype=np.int64)
        part = np.argpartition(key, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(part, np.argsort(np.take_along_axis(key, part, axis=1), axis=1), axis=1)
    return order.astype(np.int64), np.take_along_axis(dist, order, axis=1).astype(np.int32)


def hamming_topk_packed(
    q_packed: np.ndarray, db_packed: np.ndarray, k: int, backend: str = "auto", chunk: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database rows for each query by Hamming distance, ties by database index.

    backend: 'faiss' (IndexBinaryFlat with counting select), 'numpy', or 'auto' (faiss when
    importable). Both give identical rankings.
    """
    q_packed = np.ascontiguousarray(q_packed, dtype=np.uint8)
    db_packed = np.ascontiguousarray(db_packed, dtype=np.uint8)
    n_db = len(db_packed)
    k = min(k, n_db)
    if backend == "auto":
        backend = "faiss" if faiss is not None else "numpy"
    if backend == "faiss":
        if faiss is None:
            raise RuntimeError("faiss is not installed; use backend='numpy'")
        index = faiss.IndexBinaryFlat(db_packed.shape[1] * 8)
        index.use_heap = False  # counting select: ties kept in index order
        index.add(db_packed)
        dist, ids = index.search(q_packed, k)
        return ids.astype(np.int64), dist.astype(np.int32)
    if backend != "numpy":
        raise ValueError(f"unknown backend {backend!r}")
    rows = _rows_per_chunk(n_db, chunk)
    ids = np.empty((len(q_packed), k), dtype=np.int64)
    dist = np.empty((len(q_packed), k), dtype=np.int32)
    for s in range(0, len(q_packed), rows):
        ids[s : s + rows], dist[s : s + rows] = _topk_from_dist(
            hamming_distances_packed(q_packed[s : s + rows], db_packed), k
        )
    return ids, dist


def hamming_topk(query_codes: np.ndarray, db_codes: np.ndarray, k: int, backend: str = "auto"):
    """(indices, distances) of the k nearest database codes per query; codes in {-1, +1}."""
    return hamming_topk_packed(pack(query_codes), pack(db_codes), k, backend)


def ap_from_relevance(rel: np.ndarray) -> np.ndarray:
    """Per-row AP of ranked relevance rows: sum_k P(k) rel(k) / sum_k rel(k) (0 without hits)."""
    rel = np.asarray(rel, dtype=bool)
    hits = np.cumsum(rel, axis=1, dtype=np.int64)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    total = hits[:, -1] if rel.shape[1] else np.zeros(len(rel), dtype=np.int64)
    prec_sum = np.where(rel, hits / ranks, 0.0).sum(axis=1)
    return np.divide(prec_sum, total, out=np.zeros(len(rel)), where=total > 0)


def average_precisions_packed(
    q_packed, db_packed, q_labels, db_labels, topk: int | None = None, backend: str = "auto"
) -> np.ndarray:
    """Per-query AP@topk (None = ALL) from packed codes."""
    n_db = len(db_packed)
    k = n_db if topk is None else min(topk, n_db)
    qw, dw = label_words(q_labels), label_words(db_labels)
    out = np.empty(len(q_packed))
    rows = _rows_per_chunk(k)
    for s in range(0, len(q_packed), rows):
        if k == n_db:
            dist = hamming_distances_packed(q_packed[s : s + rows], db_packed)
            ids = np.argsort(dist, axis=1, kind="stable")
        else:
            ids, _ = hamming_topk_packed(q_packed[s : s + rows], db_packed, k, backend)
        out[s : s + rows] = ap_from_relevance(_relevance(qw[s : s + rows], dw[ids]))
    return out


def mean_average_precision(query_codes, db_codes, query_labels, db_labels, topk: int | None = None) -> float:
    """mAP@topk (None = mAP@ALL) of Hamming ranking; codes in {-1, +1}, labels in {0, 1}."""
    return float(average_precisions_packed(pack(query_codes), pack(db_codes), query_labels, db_labels, topk).mean())


def average_precisions(query_codes, db_codes, query_labels, db_labels, topk: int | None = None) -> np.ndarray:
    """Per-query APs behind mean_average_precision."""
    return average_precisions_packed(pack(query_codes), pack(db_codes), query_labels, db_labels, topk)


# --------------------------------------------------------------------------- one-pass report


def _small_uint(limit: int):
    """The narrowest unsigned dtype holding 0..limit-1 (uint8, uint16, or int64)."""
    return np.uint8 if limit <= 1 << 8 else np.uint16 if limit <= 1 << 16 else np.int64


def _ranked(dist: np.ndarray, rel: np.ndarray, bits: int) -> np.ndarray:
    """(2 * distance + relevant) of each (query, item), reordered by rank: ascending distance, ties by
    database index (a stable radix sort of narrow distance keys, then one gather)."""
    m, n = dist.shape
    d = dist.astype(_small_uint(bits + 1))
    order = np.argsort(d, axis=1, kind="stable")
    order += (np.arange(m, dtype=np.int64) * n)[:, None]
    both = d.astype(_small_uint(2 * bits + 2))
    both <<= 1
    both |= rel
    return np.take(both.ravel(), order)


def _histograms(ranked: np.ndarray, nz: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(items, relevant items) by distance 0..bits per query row, from the rank-ordered
    (2 * distance + relevant) rows and the flat positions nz of the relevant ranks: row * (bits + 1) +
    distance is nondecreasing along the flattened rows, so the bin edges are one searchsorted."""
    m, n = ranked.shape
    bins = m * (bits + 1)
    dtype = _small_uint(bins)
    key = (ranked >> 1).astype(dtype)
    key += (np.arange(m, dtype=dtype) * (bits + 1))[:, None]
    edges = np.append(np.searchsorted(key.ravel(), np.arange(bins, dtype=dtype)), m * n)
    rel_edges = np.searchsorted(nz, edges)
    return np.diff(edges).reshape(m, bits + 1), np.diff(rel_edges).reshape(m, bits + 1)


def _hits_within(nz: np.ndarray, m: int, n: int, cuts: list[int]) -> np.ndarray:
    """(m, len(cuts)) relevant items within the first c ranks of each row, for c in cuts."""
    row0 = np.arange(m, dtype=np.int64)[:, None] * n
    return np.searchsorted(nz, row0 + np.asarray(cuts, dtype=np.int64)[None, :]) - np.searchsorted(nz, row0)


def _ap_sums(nz: np.ndarray, per_row: np.ndarray, n: int, cut: int, scratch: np.ndarray):
    """(sum_k P(k) rel(k) over all ranks, the same over the first `cut` ranks) per row, from the flat
    positions nz of the relevant ranks. Each sum runs over the full rank-ordered row with zeros off
    the relevant ranks, as ap_from_relevance's does, so the floats are the same to the bit; `scratch`
    (all zeros, at least m * n) is left all zeros."""
    m = len(per_row)
    starts = np.cumsum(per_row) - per_row
    hits = np.arange(1, len(nz) + 1, dtype=np.int64) - np.repeat(starts, per_row)
    ranks = (nz - np.repeat(np.arange(m, dtype=np.int64) * n, per_row) + 1).astype(np.float64)
    full = scratch[: m * n]
    full[nz] = hits / ranks
    rows = full.reshape(m, n)
    sums = rows.sum(axis=1), np.ascontiguousarray(rows[:, :cut]).sum(axis=1)
    full[nz] = 0.0
    return sums


def _numpy_chunk(dist: np.ndarray, rel: np.ndarray, bits: int, k: int, ns: list[int], scratch: np.ndarray):
    """(ap_all, ap_topk, hits_at, hist_all, hist_rel) of one chunk of distances and relevance."""
    m, n_db = dist.shape
    ranked = _ranked(dist, rel, bits)
    low = ranked & 1
    nz = np.flatnonzero(low.view(bool) if low.dtype == np.uint8 else low)
    hist_all, hist_rel = _histograms(ranked, nz, bits)
    del ranked
    total = hist_rel.sum(axis=1)
    sum_all, sum_k = _ap_sums(nz, total, n_db, k, scratch)
    hits = _hits_within(nz, m, n_db, [k] + [min(n, n_db) for n in ns])
    ap_all = np.divide(sum_all, total, out=np.zeros(m), where=total > 0)
    ap_k = np.divide(sum_k, hits[:, 0], out=np.zeros(m), where=hits[:, 0] > 0)
    return ap_all, ap_k, hits[:, 1:], hist_all, hist_rel


_CACHE_HINT = "a damaged numba cache: delete NUMBA_CACHE_DIR, or dseh/__pycache__ where it is unset"


@cache
def _compiled():
    """(dseh.evaluation_compiled, None) once it has run a tiny report (so its compile, or its load
    from numba's cache, is done), or (None, why) where numba is missing or that run failed (a
    damaged numba cache: delete NUMBA_CACHE_DIR or dseh/__pycache__)."""
    try:
        from dseh import evaluation_compiled

        one = np.ones((2, 1), dtype=np.uint64)
        evaluation_compiled.report_parts(one, one, one, one, 64, 1, [1])
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}; {_CACHE_HINT}" if not isinstance(exc, ImportError) else str(exc)
        log.warning("the compiled evaluation is unavailable (%s); evaluating with numpy", why)
        return None, why
    return evaluation_compiled, None


def _compiled_backend(backend: str):
    """The compiled module when `backend` ('auto', 'compiled' or 'numpy') asks for it and it loads."""
    if backend not in ("auto", "compiled", "numpy"):
        raise ValueError(f"unknown backend {backend!r}")
    if backend == "numpy":
        return None
    module, why = _compiled()
    if module is None and backend == "compiled":
        raise RuntimeError(f"the compiled evaluation is unavailable ({why}); use backend='numpy'")
    return module


def retrieval_report(
    q_packed: np.ndarray,
    db_packed: np.ndarray,
    q_labels: np.ndarray,
    db_labels: np.ndarray,
    bits: int,
    topk: int,
    precision_at: tuple[int, ...] = (100, 200, 300, 400, 500, 600, 700, 800, 900, 1000),
    chunk: int | None = None,
    backend: str = "auto",
    threads: int = 1,
) -> RetrievalReport:
    """mAP@ALL, mAP@topk, tie-aware mAP, precision/recall@N and the PR curve by radius.

    backend 'compiled' (dseh.evaluation_compiled: a counting rank, no sort, on `threads` threads),
    'numpy' (below), or 'auto' (compiled where numba imports). The numpy path, for each chunk of
    queries: distances to the whole database, one stable radix sort (distance, then index) that
    reorders (distance, relevance); the AP sums, the hits within N and the histograms by distance
    (for the PR curve and the tie-aware AP) come from the positions of the relevant ranks. Both
    give the same counts; the AP sums agree to about 1e-14. Bad inputs (an empty side, codes that are
    not `bits`-bit packed rows, labels that are not one row per code or differ in width) end in a
    ValueError from retrieval_metrics.check_report_inputs.
    """
    q_packed = np.ascontiguousarray(q_packed, dtype=np.uint8)
    db_packed = np.ascontiguousarray(db_packed, dtype=np.uint8)
    check_report_inputs(q_packed, db_packed, q_labels, db_labels, bits)
    n_q, n_db = len(q_packed), len(db_packed)
    k = min(topk, n_db)
    qw, dw = label_words(q_labels), label_words(db_labels)
    ns = sorted(set(int(n) for n in precision_at))
    parts = ChunkParts.empty(n_q, len(ns), bits)
    compiled = _compiled_backend(backend)
    if compiled is not None:
        cuts = [min(n, n_db) for n in ns]
        code_q, code_db = to_words(q_packed), to_words(db_packed)
        try:
            parts.put(0, n_q, *compiled.report_parts(code_q, code_db, qw, dw, bits, k, cuts, threads))
            return report_from_parts(parts, bits, k, ns, n_db)
        except Exception as exc:  # a kernel variant (wide codes) whose numba cache entry is damaged
            if backend == "compiled":
                raise
            log.warning(
                "the compiled evaluation failed (%s: %s; %s); evaluating with numpy",
                type(exc).__name__,
                exc,
                _CACHE_HINT,
            )
    rows = _rows_per_chunk(n_db, chunk, _REPORT_ELEMENTS)
    scratch = np.zeros(min(rows, n_q) * n_db)
    for s in range(0, n_q, rows):
        e = min(n_q, s + rows)
        dist = hamming_distances_packed(q_packed[s:e], db_packed)
        parts.put(s, e, *_numpy_chunk(dist, _relevance(qw[s:e], dw), bits, k, ns, scratch))
    return report_from_parts(parts, bits, k, ns, n_db)


def _report(query_codes, db_codes, query_labels, db_labels, topk=1000, precision_at=(1000,)):
    q, d = np.asarray(query_codes), np.asarray(db_codes)
    return retrieval_report(pack(q), pack(d), query_labels, db_labels, q.shape[1], topk, precision_at)


def tie_aware_map(query_codes, db_codes, query_labels, db_labels) -> float:
    """Tie-aware mAP@ALL; codes in {-1, +1}."""
    return _report(query_codes, db_codes, query_labels, db_labels).map_tie_aware


def precision_recall_at(query_codes, db_codes, query_labels, db_labels, ns) -> tuple[dict, dict]:
    """(precision@N, recall@N) for each N in ns."""
    r = _report(query_codes, db_codes, query_labels, db_labels, precision_at=tuple(ns))
    return r.precision_at, r.recall_at


def pr_curve(query_codes, db_codes, query_labels, db_labels) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) of {d <= r} for r = 0..bits, averaged over queries."""
    r = _report(query_codes, db_codes, query_labels, db_labels)
    return r.pr_precision, r.pr_recall


def precision_within_radius(query_codes, db_codes, query_labels, db_labels, radius: int = 2) -> float:
    """Hash-lookup precision of {d <= radius} (a query retrieving nothing counts 0)."""
    return _report(query_codes, db_codes, query_labels, db_labels).precision_within(radius)


# --------------------------------------------------------------------------- a prepared split's report


def headline_keys(topk: int) -> list[str]:
    """The names of the headline metrics, everywhere they are written (metrics.json, the MAP table,
    the comparison's runs and tables, MLflow)."""
    return ["map_all", f"map_at_{topk}", "map_tie_aware"]


def headline_metrics(rep: RetrievalReport) -> dict[str, float]:
    """{map_all, map_at_<topk>, map_tie_aware} of a report."""
    return dict(zip(headline_keys(rep.topk), (rep.map_all, rep.map_topk, rep.map_tie_aware)))


def _cpu_quota() -> int | None:
    """The CPUs a cgroup v2 CPU limit allows this process (a container's limit), rounded up; None
    without a limit."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def cpu_threads() -> int:
    """The threads the CPU evaluation uses: torch's thread count (train.threads where a step sets it,
    as training and comparison jobs do), at most the CPUs this process may run on (its affinity mask)
    and its container's CPU limit."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus, _cpu_quota() or cpus))


def split_report(
    ev, data, codes: np.ndarray, bits: int, precision_at: tuple[int, ...] | None = None, device=None
) -> RetrievalReport:
    """The retrieval report of a prepared dataset's query rows against its database rows, given the
    packed codes of every item (`ev`: the evaluate params; `data`: a dseh.data.PreparedData).

    device: None computes on CUDA when present (dseh.evaluation_torch) and on the CPU otherwise
    (retrieval_report, compiled where numba loads, on cpu_threads()); 'numpy' forces its numpy
    path; 'cpu', 'cuda', 'cuda:1' or a torch.device force that torch device."""
    from dseh import evaluation_torch

    args = (
        codes[data.query],
        codes[data.database],
        data.labels[data.query],
        data.labels[data.database],
        bits,
        ev.topk,
        precision_at or ev.precision_at,
        ev.query_chunk,
    )
    target = evaluation_torch.resolve_device(device)
    if target is None:
        return retrieval_report(*args, backend="numpy" if device == "numpy" else "auto", threads=cpu_threads())
    log.info("evaluating on %s", target)
    return evaluation_torch.retrieval_report(*args, device=target)


def split_collapse(ev, data, codes: np.ndarray, bits: int) -> dict:
    """dseh.codes.collapse of the database rows of the packed codes of every item, with
    evaluate.collapse_min_distinct capped at the database's number of distinct label sets."""
    from dseh.codes import collapse

    label_sets = int(len(np.unique(data.labels[data.database], axis=0)))
    return collapse(codes[data.database], bits, ev.collapse_min_distinct, label_sets)


def split_metrics(ev, data, codes: np.ndarray, bits: int) -> tuple[dict, RetrievalReport]:
    """metrics.json's retrieval figures of a prepared split (evaluate's and the champion's
    re-evaluation on a new dataset) and the collapse check of the database codes."""
    rep = split_report(ev, data, codes, bits)
    n_max = max(rep.precision_at)
    metrics = {
        "bits": bits,
        "protocol_topk": rep.topk,
        **headline_metrics(rep),
        f"precision_radius_{ev.radius}": rep.precision_within(ev.radius),
        f"precision_at_{n_max}": rep.precision_at[n_max],
        f"recall_at_{n_max}": rep.recall_at[n_max],
        "queries": int(len(data.query)),
        "database": int(len(data.database)),
        "queries_without_relevant": rep.queries_without_relevant,
    }
    state = split_collapse(ev, data, codes, bits)
    metrics.update(
        distinct_codes_database=state["distinct_codes"],
        constant_bits_database=state["constant_bits"],
        collapsed=state["collapsed"],
    )
    if state["collapsed"] or state["constant_bits"]:
        what = "codes collapsed" if state["collapsed"] else "some bits carry nothing"
        log.warning("%s: %d distinct database codes, %d of %d bits constant", what, state["distinct_codes"],
                    state["constant_bits"], bits)  # fmt: skip
    return metrics, rep
