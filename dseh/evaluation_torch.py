"""The retrieval report of dseh.evaluation computed on a torch device (a GPU, or the CPU in tests).

Same definitions and tie rule as `dseh.evaluation.retrieval_report` (docs/evaluation.md): Hamming
distance by XOR + popcount of packed uint8 codes, ranking by ascending distance with ties broken by
database index (a stable sort), relevance as 'shares a label' on 64-bit label words. Per query chunk
the device computes the distances, the ranking, the relevance in rank order, AP@ALL, AP@topk, the hits
within each N and the histograms by distance; the (queries x (bits + 1)) tail (tie-aware AP, the PR
curve, precision and recall@N) is `dseh.retrieval_metrics.report_from_parts`, shared with the CPU paths.
Counts and ranks are exact; the AP sums differ from the CPU paths' only in float summation order.
"""

from __future__ import annotations

import numpy as np
import torch

from dseh import retrieval_metrics as rm

_ELEMENTS = 1 << 26  # query rows x database rows per chunk (about 45 bytes each on the device)


def resolve_device(device=None) -> torch.device | None:
    """The torch device to evaluate on: `device` as given ('cpu', 'cuda', 'cuda:1', a torch.device),
    None for CUDA when present, and None back for 'numpy' or for None without CUDA (the CPU path of
    dseh.evaluation)."""
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else None
    if isinstance(device, str) and device == "numpy":
        return None
    return torch.device(device)


def popcount8(x: torch.Tensor) -> torch.Tensor:
    """Bits set in each byte of a uint8 tensor (SWAR bit tricks, uint8 in and out)."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def hamming_distances(q_packed: torch.Tensor, db_bytes: torch.Tensor) -> torch.Tensor:
    """(m, B) uint8 query rows against (B, n) uint8 database columns -> (m, n) int32 distances."""
    dist = torch.zeros((q_packed.shape[0], db_bytes.shape[1]), dtype=torch.int32, device=db_bytes.device)
    for b in range(db_bytes.shape[0]):
        dist += popcount8(q_packed[:, b, None] ^ db_bytes[b][None, :])
    return dist


def relevance(q_words: torch.Tensor, db_words: torch.Tensor) -> torch.Tensor:
    """(m, W) against (n, W) int64 label words -> (m, n) bool 'shares at least one label'."""
    rel = (q_words[:, None, 0] & db_words[None, :, 0]) != 0
    for w in range(1, q_words.shape[1]):
        rel |= (q_words[:, None, w] & db_words[None, :, w]) != 0
    return rel


def _ap(rel_ranked: torch.Tensor, hits: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Per-row AP of ranked relevance with its running hit counts: sum P(k) rel(k) / hits (0 without)."""
    prec_sum = torch.where(rel_ranked, hits / ranks, torch.zeros((), dtype=torch.float64, device=ranks.device)).sum(1)
    total = hits[:, -1]
    return torch.where(total > 0, prec_sum / total.clamp(min=1), torch.zeros_like(prec_sum))


def _histograms(dist: torch.Tensor, rel: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(items, relevant items) by distance 0..bits per row, by bincount."""
    m = dist.shape[0]
    flat = (torch.arange(m, device=dist.device)[:, None] * (bits + 1) + dist).reshape(-1)
    size = m * (bits + 1)
    hist_all = torch.bincount(flat, minlength=size).reshape(m, bits + 1)
    hist_rel = torch.bincount(flat[rel.reshape(-1)], minlength=size).reshape(m, bits + 1)
    return hist_all, hist_rel


def chunk_parts(dist: torch.Tensor, rel: torch.Tensor, bits: int, k: int, ns: list[int]) -> tuple[np.ndarray, ...]:
    """(ap_all, ap_topk, hits_at, hist_all, hist_rel) of one chunk, as float64 numpy arrays."""
    n_db = dist.shape[1]
    order = torch.sort(dist, dim=1, stable=True).indices
    rel_ranked = torch.gather(rel, 1, order)
    del order
    hits = torch.cumsum(rel_ranked, dim=1)
    ranks = torch.arange(1, n_db + 1, dtype=torch.float64, device=dist.device)
    ap_all = _ap(rel_ranked, hits, ranks)
    ap_k = _ap(rel_ranked[:, :k], hits[:, :k], ranks[:k])
    hits_at = hits[:, [min(n, n_db) - 1 for n in ns]]
    del hits, rel_ranked
    parts = (ap_all, ap_k, hits_at, *_histograms(dist, rel, bits))
    return tuple(p.to("cpu", torch.float64).numpy() for p in parts)


def retrieval_report(q_packed: np.ndarray, db_packed: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray, bits: int, topk: int, precision_at: tuple[int, ...] = (100, 200, 300, 400, 500, 600, 700, 800, 900, 1000), chunk: int | None = None, device="cpu", elements: int = _ELEMENTS) -> rm.RetrievalReport:  # fmt: skip
    """dseh.evaluation.retrieval_report on a torch device; same arguments, plus `device` and the
    chunk budget `elements` (query rows x database rows); `chunk` caps the rows of a chunk."""
    device = torch.device(device)
    rm.check_report_inputs(np.asarray(q_packed), np.asarray(db_packed), q_labels, db_labels, bits)
    n_q, n_db = len(q_packed), len(db_packed)
    k = min(topk, n_db)
    ns = sorted(set(int(n) for n in precision_at))
    db_bytes = torch.from_numpy(np.ascontiguousarray(np.asarray(db_packed, dtype=np.uint8).T)).to(device)
    q_t = torch.from_numpy(np.ascontiguousarray(q_packed, dtype=np.uint8)).to(device)
    qw = torch.from_numpy(rm.label_words(q_labels).view(np.int64)).to(device)
    dw = torch.from_numpy(rm.label_words(db_labels).view(np.int64)).to(device)
    parts = rm.ChunkParts.empty(n_q, len(ns), bits)
    rows = max(1, elements // max(1, n_db))
    rows = min(rows, chunk) if chunk else rows
    with torch.no_grad():
        for s in range(0, n_q, rows):
            e = min(n_q, s + rows)
            dist = hamming_distances(q_t[s:e], db_bytes)
            parts.put(s, e, *chunk_parts(dist, relevance(qw[s:e], dw), bits, k, ns))
    return rm.report_from_parts(parts, bits, k, ns, n_db)
