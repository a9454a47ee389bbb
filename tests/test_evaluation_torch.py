"""The torch evaluation (dseh.evaluation_torch) against the CPU report (dseh.evaluation, compiled where
numba loads), on CPU tensors: counts and ranks exactly, float sums to 1e-9 relative; and
split_report's choice of path."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dseh import evaluation as ev
from dseh import evaluation_torch as evt
from dseh.codes import pack


def case(seed, nq, ndb, bits, classes=5, p=0.2, distinct=None):
    """Random codes; `distinct` draws the database from that many codes, for many ties."""
    rng = np.random.default_rng(seed)
    q = np.where(rng.random((nq, bits)) < 0.5, 1, -1)
    pool = np.where(rng.random((distinct or ndb, bits)) < 0.5, 1, -1)
    db = pool[rng.integers(0, len(pool), ndb)] if distinct else pool
    ql = (rng.random((nq, classes)) < p).astype(np.uint8)
    ql[0] = 0  # a query without any relevant item
    dbl = (rng.random((ndb, classes)) < p).astype(np.uint8)
    return pack(q), pack(db), ql, dbl


def assert_reports_equal(a: ev.RetrievalReport, b: ev.RetrievalReport) -> None:
    assert (a.bits, a.topk, a.queries_without_relevant) == (b.bits, b.topk, b.queries_without_relevant)
    for name in ("ap_all", "ap_topk", "ap_tie_aware", "pr_precision", "pr_recall"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=0, err_msg=name)
    assert a.precision_at.keys() == b.precision_at.keys()
    for n in a.precision_at:
        assert a.precision_at[n] == pytest.approx(b.precision_at[n], rel=1e-9, abs=0)
        assert a.recall_at[n] == pytest.approx(b.recall_at[n], rel=1e-9, abs=0)


@pytest.mark.parametrize(
    ("bits", "nq", "ndb", "topk", "distinct", "chunk"),
    [
        (8, 20, 300, 50, None, None),  # 9 distances only: ties everywhere
        (13, 17, 250, 1000, 12, 4),  # bits not a multiple of 8; K larger than the database; 12 codes
        (64, 9, 2000, 100, 40, 2),
        (100, 6, 120, 7, None, None),  # two 64-bit label and code words
        (200, 5, 90, 30, None, 2),  # wider keys on the numpy side
    ],
)
def test_torch_report_equals_the_cpu_report(bits, nq, ndb, topk, distinct, chunk):
    classes = 130 if bits == 100 else 5
    qp, dbp, ql, dbl = case(bits, nq, ndb, bits, classes, distinct=distinct)
    ns = (1, 10, 100, 5000)
    a = ev.retrieval_report(qp, dbp, ql, dbl, bits, topk, ns, chunk)
    b = evt.retrieval_report(qp, dbp, ql, dbl, bits, topk, ns, chunk, device="cpu")
    assert a.queries_without_relevant >= 1
    assert_reports_equal(a, b)


def test_torch_chunk_parts_counts_are_exact():
    qp, dbp, ql, dbl = case(3, 12, 400, 11, distinct=30)
    k, ns = 37, [5, 50, 400]
    dist_np = ev.hamming_distances_packed(qp, dbp)
    rel_np = ev._relevance(ev.label_words(ql), ev.label_words(dbl))
    dist = evt.hamming_distances(torch.from_numpy(qp), torch.from_numpy(np.ascontiguousarray(dbp.T)))
    rel = evt.relevance(*(torch.from_numpy(ev.label_words(x).view(np.int64)) for x in (ql, dbl)))
    assert np.array_equal(dist.numpy(), dist_np) and np.array_equal(rel.numpy(), rel_np)
    got = evt.chunk_parts(dist, rel, 11, k, ns)
    want = ev._numpy_chunk(dist_np, rel_np, 11, k, ns, np.zeros(dist_np.size))
    for g, w in zip(got[2:], want[2:]):  # hits within N and the two histograms
        assert np.array_equal(g, w)
    for g, w in zip(got[:2], want[:2]):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=0)


def test_popcount8_all_bytes():
    x = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert evt.popcount8(x).tolist() == [bin(i).count("1") for i in range(256)]


def test_split_report_device_choice(monkeypatch):
    qp, dbp, ql, dbl = case(5, 10, 200, 16)
    codes, labels = np.concatenate([qp, dbp]), np.concatenate([ql, dbl])
    data = SimpleNamespace(query=np.arange(10), database=np.arange(10, 210), labels=labels)
    cfg = SimpleNamespace(topk=50, precision_at=(10, 50), query_chunk=3)
    calls = []
    real = evt.retrieval_report
    monkeypatch.setattr(evt, "retrieval_report", lambda *a, **kw: calls.append(kw["device"]) or real(*a, **kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a = ev.split_report(cfg, data, codes, 16)
    b = ev.split_report(cfg, data, codes, 16, device="cpu")
    c = ev.split_report(cfg, data, codes, 16, device="numpy")
    assert calls == [torch.device("cpu")]
    assert_reports_equal(a, b)
    assert_reports_equal(a, c)
    direct = ev.retrieval_report(qp, dbp, ql, dbl, 16, 50, (10, 50), 3, backend="numpy")
    assert np.array_equal(c.ap_all, direct.ap_all)  # 'numpy': the numpy path itself
    assert evt.resolve_device(None) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evt.resolve_device(None) == torch.device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_report_equals_the_cpu_report():
    qp, dbp, ql, dbl = case(9, 40, 5000, 64, classes=21, p=0.12, distinct=300)
    a = ev.retrieval_report(qp, dbp, ql, dbl, 64, 1000)
    b = evt.retrieval_report(qp, dbp, ql, dbl, 64, 1000, device="cuda", elements=1 << 16)
    assert_reports_equal(a, b)


def test_split_report_on_the_cpu_uses_torchs_threads(monkeypatch):
    qp, dbp, ql, dbl = case(6, 4, 50, 16)
    data = SimpleNamespace(query=np.arange(4), database=np.arange(4, 54), labels=np.concatenate([ql, dbl]))
    cfg = SimpleNamespace(topk=10, precision_at=(10,), query_chunk=3)
    seen = []
    real = ev.retrieval_report
    monkeypatch.setattr(ev, "retrieval_report", lambda *a, **kw: seen.append(kw["threads"]) or real(*a, **kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ev.split_report(cfg, data, np.concatenate([qp, dbp]), 16)
    finally:
        torch.set_num_threads(before)
    assert seen == [1]
