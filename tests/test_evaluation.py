"""Retrieval metrics against hand-computed examples and a brute-force reference (docs/evaluation.md)."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from dseh import evaluation as ev
from dseh.codes import pack


def brute_rank(q, db):
    """Float distances, stable sort: the reference ranking."""
    d = (q.shape[0] - q.astype(float) @ db.T.astype(float)) / 2
    return np.argsort(d, kind="stable"), d


def brute_ap(q, db, ql, dbl, k=None):
    order, _ = brute_rank(q, db)
    order = order[: k or len(db)]
    hits, total = 0, 0.0
    for rank, j in enumerate(order, start=1):
        if (ql & dbl[j]).any():
            hits += 1
            total += hits / rank
    return total / hits if hits else 0.0


def random_case(rng, nq=25, ndb=300, bits=8, classes=5):
    q = np.where(rng.random((nq, bits)) < 0.5, 1, -1)
    db = np.where(rng.random((ndb, bits)) < 0.5, 1, -1)
    ql = (rng.random((nq, classes)) < 0.25).astype(np.uint8)
    dbl = (rng.random((ndb, classes)) < 0.25).astype(np.uint8)
    return q, db, ql, dbl


def test_hand_example_relevant_at_ranks_1_and_3():
    q = np.array([[1, 1, 1, 1]])
    db = np.array([[1, 1, 1, 1], [1, 1, 1, -1], [1, 1, -1, -1], [1, -1, -1, -1]])  # distances 0, 1, 2, 3
    ql = np.array([[1, 0]])
    dbl = np.array([[1, 0], [0, 1], [1, 1], [0, 1]])
    assert ev.mean_average_precision(q, db, ql, dbl) == pytest.approx((1 + 2 / 3) / 2)
    assert ev.mean_average_precision(q, db, ql, dbl, topk=2) == pytest.approx(1.0)
    ids, dist = ev.hamming_topk(q, db, 4)
    assert ids.tolist() == [[0, 1, 2, 3]] and dist.tolist() == [[0, 1, 2, 3]]


def test_all_ties_give_the_ap_of_the_index_order():
    q = np.ones((1, 8))
    db = np.ones((5, 8))
    dbl = np.array([[0], [1], [0], [0], [1]])
    # relevant at ranks 2 and 5: (1/2 + 2/5) / 2
    assert ev.mean_average_precision(q, db, np.array([[1]]), dbl) == pytest.approx((0.5 + 0.4) / 2)
    assert ev.mean_average_precision(q, db, np.array([[1]]), dbl, topk=3) == pytest.approx(0.5)


def test_query_without_relevant_item_counts_zero():
    q = np.ones((2, 8))
    db = np.ones((3, 8))
    ql = np.array([[1, 0], [0, 1]])
    dbl = np.array([[1, 0], [1, 0], [1, 0]])
    aps = ev.average_precisions(q, db, ql, dbl)
    assert aps.tolist() == [1.0, 0.0]
    assert ev.mean_average_precision(q, db, ql, dbl) == 0.5


@pytest.mark.parametrize("topk", [1, 7, 50, 299, None])
def test_fast_map_equals_brute_force_with_many_ties(topk):
    q, db, ql, dbl = random_case(np.random.default_rng(topk or 0))
    ref = np.array([brute_ap(q[i], db, ql[i], dbl, topk) for i in range(len(q))])
    fast = ev.average_precisions(q, db, ql, dbl, topk)
    np.testing.assert_allclose(fast, ref, atol=1e-9)
    rep = ev.retrieval_report(pack(q), pack(db), ql, dbl, 8, topk or len(db), (10, 100))
    np.testing.assert_allclose(rep.ap_topk, ref, atol=1e-9)
    np.testing.assert_allclose(rep.ap_all, [brute_ap(q[i], db, ql[i], dbl) for i in range(len(q))], atol=1e-9)


@pytest.mark.parametrize("k", [1, 5, 64, 300])
def test_faiss_and_numpy_rank_identically(k):
    if ev.faiss is None:
        pytest.skip("faiss not installed")
    q, db, _, _ = random_case(np.random.default_rng(k), bits=16, ndb=300)
    a_ids, a_d = ev.hamming_topk_packed(pack(q), pack(db), k, backend="faiss")
    b_ids, b_d = ev.hamming_topk_packed(pack(q), pack(db), k, backend="numpy")
    assert np.array_equal(a_ids, b_ids) and np.array_equal(a_d, b_d)
    order, d = brute_rank(q[0], db)
    assert a_ids[0].tolist() == order[:k].tolist()


def test_numpy_topk_in_small_chunks_matches_one_chunk():
    q, db, _, _ = random_case(np.random.default_rng(3), nq=40)
    a = ev.hamming_topk_packed(pack(q), pack(db), 20, backend="numpy", chunk=3)
    b = ev.hamming_topk_packed(pack(q), pack(db), 20, backend="numpy")
    assert np.array_equal(a[0], b[0])


def test_tie_aware_ap_is_the_expectation_over_orders_in_ties():
    rng = np.random.default_rng(7)
    for _ in range(5):
        q, db, ql, dbl = random_case(rng, nq=1, ndb=7, bits=3, classes=2)
        _, d = brute_rank(q[0], db)
        rel = (ql[0] & dbl).any(1)
        aps = []
        for perm in itertools.permutations(range(7)):
            if all(d[perm[i]] <= d[perm[i + 1]] for i in range(6)):
                r = rel[list(perm)]
                aps.append(ev.ap_from_relevance(r[None])[0])
        got = ev.tie_aware_map(q, db, ql, dbl)
        assert got == pytest.approx(np.mean(aps), abs=1e-9)


def test_precision_recall_at_n_and_pr_curve_against_brute_force():
    q, db, ql, dbl = random_case(np.random.default_rng(11), nq=10, ndb=120)
    ns = (5, 20, 120, 200)
    prec, rec = ev.precision_recall_at(q, db, ql, dbl, ns)
    pr_p, pr_r = ev.pr_curve(q, db, ql, dbl)
    bp = {n: [] for n in ns}
    br = {n: [] for n in ns}
    rp = np.zeros((len(q), 9))
    rr = np.zeros((len(q), 9))
    for i in range(len(q)):
        order, d = brute_rank(q[i], db)
        rel = (ql[i] & dbl).any(1)
        for n in ns:
            top = order[: min(n, len(db))]
            bp[n].append(rel[top].sum() / min(n, len(db)))
            br[n].append(rel[top].sum() / rel.sum() if rel.sum() else 0.0)
        for r in range(9):
            inside = d <= r
            rp[i, r] = (rel & inside).sum() / inside.sum() if inside.sum() else 0.0
            rr[i, r] = (rel & inside).sum() / rel.sum() if rel.sum() else 0.0
    for n in ns:
        assert prec[n] == pytest.approx(np.mean(bp[n]), abs=1e-12)
        assert rec[n] == pytest.approx(np.mean(br[n]), abs=1e-12)
    np.testing.assert_allclose(pr_p, rp.mean(0), atol=1e-12)
    np.testing.assert_allclose(pr_r, rr.mean(0), atol=1e-12)
    assert ev.precision_within_radius(q, db, ql, dbl, 2) == pytest.approx(rp[:, 2].mean())


def test_multiword_labels_and_codes():
    rng = np.random.default_rng(5)
    q, db, ql, dbl = random_case(rng, nq=6, ndb=50, bits=100, classes=130)
    ref = [brute_ap(q[i], db, ql[i], dbl) for i in range(6)]
    np.testing.assert_allclose(ev.average_precisions(q, db, ql, dbl), ref, atol=1e-9)


def argsort_report_parts(qp, dbp, ql, dbl, bits, k, ns):
    """The report's per-query parts by a full stable argsort and ap_from_relevance over whole rows
    (the earlier implementation of retrieval_report's loop)."""
    dist = ev.hamming_distances_packed(qp, dbp)
    rel = ev._relevance(ev.label_words(ql), ev.label_words(dbl))
    rel_ranked = np.take_along_axis(rel, np.argsort(dist, axis=1, kind="stable"), axis=1)
    hits = np.cumsum(rel_ranked[:, : max(ns)], axis=1)
    flat = (np.arange(len(qp))[:, None] * (bits + 1) + dist).ravel()
    size = len(qp) * (bits + 1)
    return (
        ev.ap_from_relevance(rel_ranked),
        ev.ap_from_relevance(rel_ranked[:, :k]),
        hits[:, [min(n, len(dbp)) - 1 for n in ns]],
        np.bincount(flat, minlength=size).reshape(len(qp), bits + 1),
        np.bincount(flat[rel.ravel()], minlength=size).reshape(len(qp), bits + 1),
    )


@pytest.mark.parametrize("backend", ["numpy", "compiled"])
@pytest.mark.parametrize(
    ("bits", "ndb", "topk", "chunk"),
    [(8, 300, 50, None), (13, 200, 500, 4), (64, 3000, 1000, 7), (100, 80, 7, 2), (200, 90, 30, None)],
)
def test_report_equals_the_argsort_reference(bits, ndb, topk, chunk, backend):
    """The numpy path matches a full stable argsort to the bit; the compiled counting rank gives the
    same counts (hits, histograms, so the PR curve and precision/recall@N) and the AP sums to 1e-12."""
    q, db, ql, dbl = random_case(np.random.default_rng(bits), nq=30, ndb=ndb, bits=bits)
    ql[0] = 0  # a query without relevant items
    ns = [3, 100, 5000]
    rep = ev.retrieval_report(pack(q), pack(db), ql, dbl, bits, topk, tuple(ns), chunk, backend=backend, threads=3)
    k = min(topk, ndb)
    parts = ev.ChunkParts.empty(len(q), len(ns), bits)
    parts.put(0, len(q), *argsort_report_parts(pack(q), pack(db), ql, dbl, bits, k, ns))
    ref = ev.report_from_parts(parts, bits, k, ns, ndb)
    for name in ("pr_precision", "pr_recall"):
        assert np.array_equal(getattr(rep, name), getattr(ref, name)), name
    for name in ("ap_all", "ap_topk", "ap_tie_aware"):
        if backend == "numpy":
            assert np.array_equal(getattr(rep, name), getattr(ref, name)), name
        else:
            np.testing.assert_allclose(getattr(rep, name), getattr(ref, name), rtol=1e-12, atol=0, err_msg=name)
    assert rep.precision_at == ref.precision_at and rep.recall_at == ref.recall_at
    assert rep.queries_without_relevant == ref.queries_without_relevant >= 1


def test_compiled_report_same_on_any_threads_and_both_paths_without_classes():
    q, db, ql, dbl = random_case(np.random.default_rng(2), nq=13, ndb=400, bits=32)
    one = ev.retrieval_report(pack(q), pack(db), ql, dbl, 32, 50, backend="compiled")
    for threads in (2, 5, 64):
        many = ev.retrieval_report(pack(q), pack(db), ql, dbl, 32, 50, backend="compiled", threads=threads)
        for name in ("ap_all", "ap_topk", "ap_tie_aware", "pr_precision"):
            assert np.array_equal(getattr(one, name), getattr(many, name)), (threads, name)
    for backend in ("compiled", "numpy"):
        none = ev.retrieval_report(pack(q), pack(db), ql[:, :0], dbl[:, :0], 32, 50, backend=backend)
        assert none.queries_without_relevant == len(q) and none.map_all == 0.0
    with pytest.raises(ValueError, match="unknown backend"):
        ev.retrieval_report(pack(q), pack(db), ql, dbl, 32, 50, backend="gpu")


def test_compiled_report_caches_its_machine_code_in_numba_cache_dir(tmp_path):
    """The image sets NUMBA_CACHE_DIR (its package folder is read-only to the step's user): the
    compiled kernel goes there, and a second process loads it from there instead of compiling."""
    script = (
        "import numpy as np; from dseh import evaluation as ev, evaluation_compiled as ec; from dseh.codes import pack;"
        "c = pack(np.where(np.eye(8) > 0, 1, -1)); l = np.eye(8, dtype=np.uint8);"
        "r = ev.retrieval_report(c, c, l, l, 8, 3, (1, 2), backend='compiled'); assert r.map_all == 1.0, r.map_all;"
        "print(sum(ec._report_rows.stats.cache_hits.values()), sum(ec._report_rows.stats.cache_misses.values()))"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120, capture_output=True, text=True)
        for _ in range(2)
    ]
    assert list(tmp_path.rglob("*.nbi")) and list(tmp_path.rglob("*.nbc"))
    assert runs[0].stdout.split() == ["0", "1"], runs[0].stdout  # compiled, then stored
    assert runs[1].stdout.split() == ["1", "0"], runs[1].stdout  # loaded


def test_auto_backend_falls_back_to_numpy_where_the_compiled_path_is_unavailable(monkeypatch):
    q, db, ql, dbl = random_case(np.random.default_rng(4), nq=5, ndb=60, bits=16)
    want = ev.retrieval_report(pack(q), pack(db), ql, dbl, 16, 10, backend="numpy")
    monkeypatch.setattr(ev, "_compiled", lambda: (None, "ImportError: No module named 'numba'"))
    got = ev.retrieval_report(pack(q), pack(db), ql, dbl, 16, 10)
    assert np.array_equal(got.ap_all, want.ap_all)
    with pytest.raises(RuntimeError, match="compiled evaluation is unavailable.*numba"):
        ev.retrieval_report(pack(q), pack(db), ql, dbl, 16, 10, backend="compiled")


def test_a_kernel_variant_failing_later_sends_auto_to_numpy(monkeypatch, caplog):
    """Wide codes use another compiled variant than _compiled's first run: its failure (a damaged
    cache entry) still ends in numpy for 'auto', with the reason, and is raised for 'compiled'."""
    from dseh import evaluation_compiled

    q, db, ql, dbl = random_case(np.random.default_rng(6), nq=5, ndb=40, bits=300)
    want = ev.retrieval_report(pack(q), pack(db), ql, dbl, 300, 10, backend="numpy")
    ev._compiled()  # loaded before the damage

    def damaged(*a, **kw):
        raise EOFError("pickle data was truncated")

    monkeypatch.setattr(evaluation_compiled, "report_parts", damaged)
    got = ev.retrieval_report(pack(q), pack(db), ql, dbl, 300, 10)
    assert np.array_equal(got.ap_all, want.ap_all)
    assert "compiled evaluation failed (EOFError: pickle data was truncated; a damaged numba cache" in caplog.text
    with pytest.raises(EOFError):
        ev.retrieval_report(pack(q), pack(db), ql, dbl, 300, 10, backend="compiled")


def test_a_failing_compiled_path_is_caught_on_its_first_run(monkeypatch):
    """A damaged numba cache fails on the first call, not at import: _compiled runs a tiny report, so
    that failure sends 'auto' to numpy with the reason."""
    from dseh import evaluation_compiled

    def broken(*a, **kw):
        raise EOFError("pickle data was truncated")

    ev._compiled.cache_clear()
    monkeypatch.setattr(evaluation_compiled, "report_parts", broken)
    try:
        module, why = ev._compiled()
        assert module is None and "pickle data was truncated" in why
    finally:
        ev._compiled.cache_clear()


@pytest.mark.parametrize("backend", ["numpy", "compiled"])
def test_report_refuses_codes_and_labels_that_do_not_match(backend):
    q, db, ql, dbl = random_case(np.random.default_rng(8), nq=4, ndb=30, bits=13)
    qp, dbp = pack(q), pack(db)
    padded = dbp.copy()
    padded[3, -1] |= 1  # a bit beyond the 13 code bits
    cases = [
        ((qp, padded, ql, dbl, 13), "bits beyond the 13 code bits"),
        ((qp, dbp, ql, dbl, 4), "expected packed rows of 1 bytes for 4 bits"),
        ((qp, np.concatenate([dbp, dbp], 1), ql, dbl, 13), "database codes: expected packed rows of 2 bytes"),
        ((qp, dbp, ql, np.zeros((30, 100), np.uint8), 13), "query labels have 5 classes, database labels 100"),
        ((qp, dbp, ql[:2], dbl, 13), r"query labels: expected 4 rows \(one per code\), got shape \(2, 5\)"),
        ((qp, dbp, ql, dbl[:1], 13), r"database labels: expected 30 rows"),
        ((qp, dbp, ql, dbl[:, 0], 13), r"database labels: expected 30 rows .* got shape \(30,\)"),
        ((qp[:0], dbp, ql[:0], dbl, 13), "no query codes"),
        ((qp, dbp[:0], ql, dbl[:0], 13), "no database codes"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            ev.retrieval_report(*args, 10, backend=backend)


def test_one_word_codes_with_labels_of_several_words():
    q, db, ql, dbl = random_case(np.random.default_rng(9), nq=12, ndb=500, bits=48, classes=150)
    a = ev.retrieval_report(pack(q), pack(db), ql, dbl, 48, 40, (5, 50), backend="numpy")
    b = ev.retrieval_report(pack(q), pack(db), ql, dbl, 48, 40, (5, 50), backend="compiled", threads=2)
    np.testing.assert_allclose(b.ap_all, a.ap_all, rtol=1e-12, atol=0)
    np.testing.assert_allclose(b.ap_topk, a.ap_topk, rtol=1e-12, atol=0)
    assert a.precision_at == b.precision_at and np.array_equal(a.pr_recall, b.pr_recall)
