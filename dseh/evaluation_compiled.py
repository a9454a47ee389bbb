"""The retrieval report's per-query parts by a compiled counting rank (numba), the CPU path of
dseh.evaluation.retrieval_report; definitions in docs/evaluation.md.

No sort: one pass over the database per query computes each item's distance and relevance, the
histograms by distance, and for each relevant item its place among the items (and the relevant
items) at its distance seen so far. Ranks are by distance, then database index, so a relevant item's
rank is the number of items closer to the query plus that place, and its precision is the same with
relevant items; a second, short pass over the relevant items sums the AP terms in database order.
The counts are exact; the AP sums agree with the sorting path to about 1e-14 (another summation
order). Query blocks run on threads (the kernel releases the GIL). Compiled on first use (about
3.5 s); numba caches the machine code (in NUMBA_CACHE_DIR, else beside this module, else in the
user's cache folder) and later processes load it (about 0.7 s); with nowhere writable, each process
compiles. dseh.evaluation imports this module only when it is used, and checks its inputs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic


@intrinsic
def _popcount(typingctx, x):
    """The number of set bits of a uint64, as a signed count (LLVM's ctpop: one instruction)."""

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.int64(types.uint64), codegen


def _jit(**options):
    """numba.njit with its on-disk cache, or without it where numba finds no writable cache folder."""

    def wrap(fn):
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # "no locator available": compile in each process instead
            return numba.njit(**options)(fn)

    return wrap


@_jit(nogil=True, boundscheck=False, inline="always")
def _place(d, r, h_all, h_rel, rel_d, rel_a, n_rel):
    """Count one item at distance d (relevant when r); a relevant one keeps its distance and its
    place among the items at that distance seen so far. Returns the relevant items so far."""
    place = h_all[d] + 1
    h_all[d] = place
    h_rel[d] += r
    rel_d[n_rel] = d  # written for every item, kept (n_rel advances) for relevant ones
    rel_a[n_rel] = place
    return n_rel + r


@_jit(nogil=True, boundscheck=False)
def _scan_one_word(q_code, q_label, dw, dl, h_all, h_rel, rel_d, rel_a):
    """One query against the database when codes and labels are one word each (up to 64 bits and
    64 classes): the common case, with no inner loops."""
    n_rel = 0
    for j in range(dw.shape[0]):
        n_rel = _place(_popcount(q_code ^ dw[j]), (q_label & dl[j]) != 0, h_all, h_rel, rel_d, rel_a, n_rel)
    return n_rel


@_jit(nogil=True, boundscheck=False)
def _scan_words(q_code, q_label, dw, dl, h_all, h_rel, rel_d, rel_a):
    """One query against the database, codes and labels of any number of words."""
    n_rel = 0
    for j in range(dw.shape[0]):
        d = 0
        for w in range(dw.shape[1]):
            d += _popcount(q_code[w] ^ dw[j, w])
        r = False
        for w in range(dl.shape[1]):
            r |= (q_label[w] & dl[j, w]) != 0
        n_rel = _place(d, r, h_all, h_rel, rel_d, rel_a, n_rel)
    return n_rel


@_jit(nogil=True, boundscheck=False)
def _rank_sums(n_rel, rel_d, rel_a, h_all, h_rel, cuts, hits):
    """(sum of precision at each relevant rank, the same within the first cuts[0] ranks) of one
    query, and its relevant items within each cut (into hits); relevant items in database order."""
    first_all = np.cumsum(h_all) - h_all  # items closer than each distance
    first_rel = np.cumsum(h_rel) - h_rel
    last_cut = cuts.max()
    sum_all = 0.0
    sum_k = 0.0
    hits[:] = 0
    for t in range(n_rel):
        d = rel_d[t]
        first_rel[d] += 1
        rank = first_all[d] + rel_a[t]
        term = first_rel[d] / rank
        sum_all += term
        if rank <= last_cut:
            if rank <= cuts[0]:
                sum_k += term
            for c in range(cuts.shape[0]):
                hits[c] += rank <= cuts[c]
    return sum_all, sum_k


@_jit(nogil=True, boundscheck=False)
def _report_rows(qw, dw, ql, dl, dw1, dl1, cuts, sums, hits, hist_all, hist_rel, rel_d, rel_a):
    """Each query row's AP sums, hits within the cuts and histograms by distance; dw1 and dl1 are
    the database's only code and label words when both are one word (else empty)."""
    one_word = dw.shape[1] == 1 and dl.shape[1] == 1
    for i in range(qw.shape[0]):
        h_all = hist_all[i]
        h_rel = hist_rel[i]
        h_all[:] = 0
        h_rel[:] = 0
        if one_word:
            n_rel = _scan_one_word(qw[i, 0], ql[i, 0], dw1, dl1, h_all, h_rel, rel_d, rel_a)
        else:
            n_rel = _scan_words(qw[i], ql[i], dw, dl, h_all, h_rel, rel_d, rel_a)
        sums[i, 0], sums[i, 1] = _rank_sums(n_rel, rel_d, rel_a, h_all, h_rel, cuts, hits[i])


def report_parts(qw, dw, ql, dl, bits: int, k: int, cuts: list[int], threads: int = 1):
    """(ap_all, ap_topk, hits within each cut, hist_all, hist_rel) of the queries' uint64 code and
    label words (qw, ql) against the database's (dw, dl); k the top-K of ap_topk, cuts the N of
    precision and recall@N (each at most the database size). The caller checks the shapes: code words
    of both sides alike with no distance above `bits`, label words alike and at least one."""
    m, n = len(qw), len(dw)
    cut_arr = np.asarray([k, *cuts], dtype=np.int64)
    sums = np.zeros((m, 2))
    hits = np.zeros((m, len(cut_arr)), dtype=np.int64)
    hist_all = np.zeros((m, bits + 1), dtype=np.int64)
    hist_rel = np.zeros((m, bits + 1), dtype=np.int64)
    d_type = np.uint8 if bits < 1 << 8 else np.uint16 if bits < 1 << 16 else np.uint32
    place_type = np.int32 if n < 2**31 else np.int64
    qw, dw, ql, dl = (np.ascontiguousarray(a, dtype=np.uint64) for a in (qw, dw, ql, dl))
    one_word = dw.shape[1] == 1 and dl.shape[1] == 1
    dw1, dl1 = (dw.reshape(-1), dl.reshape(-1)) if one_word else (np.empty(0, np.uint64),) * 2

    def block(s: int, e: int) -> None:
        _report_rows(
            qw[s:e], dw, ql[s:e], dl, dw1, dl1, cut_arr,
            sums[s:e], hits[s:e], hist_all[s:e], hist_rel[s:e], np.empty(n, d_type), np.empty(n, place_type),
        )  # fmt: skip

    threads = max(1, min(int(threads), m))
    edges = np.linspace(0, m, threads + 1).astype(int)
    if threads == 1:
        block(0, m)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(block, edges[:-1], edges[1:]))
    total = hist_rel.sum(axis=1)
    ap_all = np.divide(sums[:, 0], total, out=np.zeros(m), where=total > 0)
    ap_k = np.divide(sums[:, 1], hits[:, 0], out=np.zeros(m), where=hits[:, 0] > 0)
    return ap_all, ap_k, hits[:, 1:], hist_all, hist_rel
