"""Large-database search: the chunked exact scan over a memory-mapped codes file ranks exactly
like one full scan (ties by database position), and the approximate faiss indexes report their
recall@k against it."""

import json

import numpy as np
import pytest

from dseh import index as ix
from dseh.errors import DsehError
from dseh.evaluation import hamming_topk_packed


def clustered_codes(rng, n, bytes_=8, centres=20, flip=0.08):
    c = rng.integers(0, 256, (centres, bytes_), dtype=np.uint8)
    bits = np.unpackbits(c[rng.integers(0, centres, n)], axis=1)
    bits ^= (rng.random(bits.shape) < flip).astype(np.uint8)
    return np.packbits(bits, axis=1)


def test_chunked_exact_scan_over_a_memmap_ranks_like_one_scan(tmp_path):
    rng = np.random.default_rng(0)
    db = rng.integers(0, 4, (5000, 2), dtype=np.uint8)  # few distinct codes: ties everywhere
    q = rng.integers(0, 4, (7, 2), dtype=np.uint8)
    np.save(tmp_path / "codes.npy", db)
    mm = np.load(tmp_path / "codes.npy", mmap_mode="r")
    full = hamming_topk_packed(q, db, 50, backend="numpy")
    for backend in ("numpy", "faiss"):
        got = ix.exact_topk(q, mm, 50, chunk_rows=777, backend=backend)
        assert np.array_equal(got[0], full[0]) and np.array_equal(got[1], full[1]), backend
    rows = rng.permutation(5000)[:3000]
    got = ix.exact_topk(q, mm, 20, chunk_rows=500, rows=rows)
    ref = hamming_topk_packed(q, db[rows], 20, backend="numpy")
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


def test_merge_keeps_the_nearest_and_breaks_ties_by_position():
    ids, dist = ix.merge_topk(np.array([[5, 9]]), np.array([[1, 3]]), np.array([[2, 7]]), np.array([[1, 2]]), 3)
    assert ids.tolist() == [[2, 5, 7]] and dist.tolist() == [[1, 1, 2]]


@pytest.mark.parametrize("kind", ["ivf", "mih"])
def test_approximate_index_recall_against_the_exact_scan(kind, tmp_path):
    rng = np.random.default_rng(1)
    db, q = clustered_codes(rng, 20000), clustered_codes(rng, 40)
    # full effort (every cell; many flips) finds neighbours as near as the exact scan's
    full, rep = ix.build_and_measure(db, q, 10, kind, nlist=64, nprobe=64, nflip=8)
    assert rep["recall_at_10_distance"] == 1.0 and rep["n_database"] == 20000
    _, low = ix.build_and_measure(db, q, 10, kind, nlist=64, nprobe=1, nflip=0)
    assert 0 < low["recall_at_10_ids"] <= rep["recall_at_10_ids"]
    ix.save_index(full, tmp_path / "x.faiss")
    again = ix.load_index(tmp_path / "x.faiss")
    ix.set_search_effort(again, 64, 8)
    assert again.ntotal == 20000
    assert np.array_equal(ix.index_topk(again, q, 10)[1], ix.index_topk(full, q, 10)[1])


def test_index_errors_are_clear(tmp_path):
    with pytest.raises(DsehError, match="does not exist"):
        ix.load_index(tmp_path / "none.faiss")
    (tmp_path / "bad.faiss").write_bytes(b"xx")
    with pytest.raises(DsehError, match="not a faiss binary index"):
        ix.load_index(tmp_path / "bad.faiss")
    with pytest.raises(DsehError, match="unknown index kind 'lsh'"):
        ix.build_index(np.zeros((10, 8), np.uint8), "lsh")
    with pytest.raises(DsehError, match="substrings of at most 32 bits"):
        ix.build_index(np.zeros((10, 8), np.uint8), "mih", nhash=1)


def test_saving_an_index_that_fails_keeps_the_stored_one(tmp_path):
    rng = np.random.default_rng(2)
    old = ix.build_index(clustered_codes(rng, 2000), "ivf", nlist=8)
    path = tmp_path / "x.faiss"
    ix.save_index(old, path, {"n_database": 2000})
    new = ix.build_index(clustered_codes(rng, 3000), "ivf", nlist=8)
    with pytest.raises(TypeError):  # the report cannot be written: neither file is replaced
        ix.save_index(new, path, {"n_database": object()})
    assert ix.load_index(path).ntotal == 2000
    assert json.loads(path.with_name("x.faiss.json").read_text()) == {"n_database": 2000}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.faiss", "x.faiss.json"]
    ix.save_index(new, path, {"n_database": 3000})
    assert ix.load_index(path).ntotal == 3000
