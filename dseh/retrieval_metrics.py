"""The per-query parts of a retrieval report and the report built from them, shared by the CPU
evaluation (dseh.evaluation: compiled and numpy) and the torch one (dseh.evaluation_torch);
definitions in docs/evaluation.md. dseh.evaluation re-exports every name here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dseh.codes import packed_width, to_words


def label_words(labels: np.ndarray) -> np.ndarray:
    """(N, c) {0,1} labels -> (N, max(1, ceil(c/64))) uint64 bit sets, for fast 'shares a label'
    tests (no classes at all: one all-zero word, so nothing is relevant)."""
    labels = np.asarray(labels, dtype=bool)
    if labels.shape[1] == 0:
        return np.zeros((len(labels), 1), dtype=np.uint64)
    return to_words(np.packbits(labels, axis=1))


def check_report_inputs(q_packed, db_packed, q_labels, db_labels, bits: int) -> None:
    """At least one query and one database item, packed codes of `bits` bits on both sides (no
    padding bit set, so no distance exceeds bits), one (N, classes) label row per code and one label
    width on both sides; a ValueError naming the mismatch otherwise."""
    width = packed_width(bits)
    for name, codes, labels in (("query", q_packed, q_labels), ("database", db_packed, db_labels)):
        if codes.ndim != 2 or codes.shape[1] != width:
            raise ValueError(
                f"{name} codes: expected packed rows of {width} bytes for {bits} bits, got shape {codes.shape}"
            )
        if len(codes) == 0:
            raise ValueError(f"no {name} codes: a report needs at least one query and one database item")
        if bits % 8 and (codes[:, -1] & ((1 << (8 - bits % 8)) - 1)).any():
            raise ValueError(f"{name} codes: bits beyond the {bits} code bits are set (not packed by dseh.codes.pack)")
        if np.ndim(labels) != 2 or len(labels) != len(codes):
            raise ValueError(f"{name} labels: expected {len(codes)} rows (one per code), got shape {np.shape(labels)}")
    q_cls, db_cls = np.shape(q_labels)[-1], np.shape(db_labels)[-1]
    if q_cls != db_cls:
        raise ValueError(f"query labels have {q_cls} classes, database labels {db_cls}")


@dataclass
class RetrievalReport:
    """Everything docs/evaluation.md defines, from one pass over the database per query chunk."""

    bits: int
    topk: int
    ap_all: np.ndarray  # per-query AP@ALL
    ap_topk: np.ndarray  # per-query AP@topk
    ap_tie_aware: np.ndarray  # per-query tie-aware AP@ALL
    precision_at: dict[int, float]
    recall_at: dict[int, float]
    pr_precision: np.ndarray  # by radius 0..bits
    pr_recall: np.ndarray
    queries_without_relevant: int

    @property
    def map_all(self) -> float:
        return float(self.ap_all.mean())

    @property
    def map_topk(self) -> float:
        return float(self.ap_topk.mean())

    @property
    def map_tie_aware(self) -> float:
        return float(self.ap_tie_aware.mean())

    def precision_within(self, radius: int) -> float:
        return float(self.pr_precision[min(radius, self.bits)])


def _harmonic(m: np.ndarray) -> np.ndarray:
    from scipy.special import digamma

    return digamma(np.asarray(m, dtype=np.float64) + 1.0) + np.euler_gamma


def tie_aware_ap_from_histograms(n_d: np.ndarray, r_d: np.ndarray) -> np.ndarray:
    """Tie-aware AP (He et al. 2018) per query from counts by distance.

    n_d[q, d]: database items at distance d; r_d[q, d]: relevant ones. With N_{d-1}, R_{d-1}
    the items and relevant items closer than d, and H the harmonic numbers:
      AP_T = 1/R sum_d (r_d / n_d) sum_{j=N_{d-1}+1}^{N_d} [R_{d-1} + 1 + (j - N_{d-1} - 1)(r_d - 1)/(n_d - 1)] / j
    where the inner sums are H(N_d) - H(N_{d-1}) and n_d - (N_{d-1} + 1)(H(N_d) - H(N_{d-1})).
    """
    n_d = np.asarray(n_d, dtype=np.float64)
    r_d = np.asarray(r_d, dtype=np.float64)
    n_cum = np.cumsum(n_d, axis=1)
    r_cum = np.cumsum(r_d, axis=1)
    n_before = n_cum - n_d
    r_before = r_cum - r_d
    s1 = _harmonic(n_cum) - _harmonic(n_before)
    s2 = n_d - (n_before + 1.0) * s1
    slope = np.divide(r_d - 1.0, n_d - 1.0, out=np.zeros_like(n_d), where=n_d > 1)
    frac = np.divide(r_d, n_d, out=np.zeros_like(n_d), where=n_d > 0)
    contrib = frac * ((r_before + 1.0) * s1 + slope * s2)
    total = r_cum[:, -1]
    return np.divide(contrib.sum(axis=1), total, out=np.zeros(len(n_d)), where=total > 0)


@dataclass
class ChunkParts:
    """What one query chunk contributes to a report; dseh.evaluation.retrieval_report and
    dseh.evaluation_torch.retrieval_report fill it."""

    ap_all: np.ndarray
    ap_topk: np.ndarray
    hits_at: np.ndarray  # (n_q, len(ns)) relevant items within the first min(n, n_db) ranks
    hist_all: np.ndarray  # (n_q, bits + 1) items by distance
    hist_rel: np.ndarray  # relevant items by distance

    @classmethod
    def empty(cls, n_q: int, n_ns: int, bits: int) -> ChunkParts:
        z = np.zeros
        return cls(z(n_q), z(n_q), z((n_q, n_ns)), z((n_q, bits + 1)), z((n_q, bits + 1)))

    def put(self, s: int, e: int, ap_all, ap_topk, hits_at, hist_all, hist_rel) -> None:
        self.ap_all[s:e], self.ap_topk[s:e], self.hits_at[s:e] = ap_all, ap_topk, hits_at
        self.hist_all[s:e], self.hist_rel[s:e] = hist_all, hist_rel


def report_from_parts(parts: ChunkParts, bits: int, k: int, ns: list[int], n_db: int) -> RetrievalReport:
    """The RetrievalReport of per-query parts: tie-aware AP, the PR curve and precision/recall@N."""
    n_q = len(parts.ap_all)
    hits_at, hist_all, hist_rel = parts.hits_at, parts.hist_all, parts.hist_rel
    cum_all = np.cumsum(hist_all, axis=1)
    cum_rel = np.cumsum(hist_rel, axis=1)
    n_rel_total = cum_rel[:, -1]
    pr_p = np.divide(cum_rel, cum_all, out=np.zeros_like(cum_all), where=cum_all > 0).mean(axis=0)
    pr_r = np.divide(cum_rel, n_rel_total[:, None], out=np.zeros_like(cum_rel), where=n_rel_total[:, None] > 0).mean(
        axis=0
    )
    precision = {n: float((hits_at[:, j] / min(n, n_db)).mean()) for j, n in enumerate(ns)}
    recall = {
        n: float(np.divide(hits_at[:, j], n_rel_total, out=np.zeros(n_q), where=n_rel_total > 0).mean())
        for j, n in enumerate(ns)
    }
    return RetrievalReport(
        bits=bits,
        topk=k,
        ap_all=parts.ap_all,
        ap_topk=parts.ap_topk,
        ap_tie_aware=tie_aware_ap_from_histograms(hist_all, hist_rel),
        precision_at=precision,
        recall_at=recall,
        pr_precision=pr_p,
        pr_recall=pr_r,
        queries_without_relevant=int((n_rel_total == 0).sum()),
    )
