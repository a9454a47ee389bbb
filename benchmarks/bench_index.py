"""Search and evaluation at 1M and 10M database codes (64 bits), codes memory-mapped from disk.

Synthetic codes with the structure of hashing codes: label-set centres with 8% of the bits flipped,
written chunk by chunk to a .npy and memory-mapped. For each size, in one process:
  (a) the exact chunked scan (dseh.index.exact_topk): the baseline every ratio is against
  (b) faiss binary IVF (nlist about sqrt(n)) at two nprobe settings, and multi-index hashing:
      build time, index size, query latency, speed-up over (a), recall@k against (a)
  (c) the evaluation (mAP@ALL, mAP@1000, tie-aware mAP, PR curve) over the whole database
peak RSS is reported at the end (the codes themselves stay on disk).

Usage: .venv/bin/python benchmarks/bench_index.py [--sizes 1000000,10000000] [--queries 1000]
       [--eval-queries 100] [-k 100] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dseh import evaluation as ev  # noqa: E402
from dseh import index as ix  # noqa: E402


def write_codes(path: Path, n: int, rng, centres: np.ndarray, labels: np.ndarray, flip: float = 0.08):
    """(memmapped packed codes, per-row centre) of n rows, generated 1M rows at a time."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, centres.shape[1]))
    which = rng.integers(0, len(centres), n).astype(np.int32)
    for s in range(0, n, 1 << 20):
        w = which[s : s + (1 << 20)]
        bits = np.unpackbits(centres[w], axis=1)
        bits ^= (rng.random(bits.shape, dtype=np.float32) < flip).astype(np.uint8)
        mm[s : s + len(w)] = np.packbits(bits, axis=1)
    mm.flush()
    del mm
    return np.load(path, mmap_mode="r"), which


def run_size(n: int, args, rng, tmp: Path, centres: np.ndarray, labels: np.ndarray) -> None:
    import faiss

    db, which = write_codes(tmp / f"db{n}.npy", n, rng, centres, labels)
    qf, q_which = write_codes(tmp / f"q{n}.npy", args.queries, rng, centres, labels)
    q = np.asarray(qf)
    t0 = time.perf_counter()
    exact = ix.exact_topk(q, db, args.k)
    t_exact = time.perf_counter() - t0
    base = 1000 * t_exact / len(q)
    print(f"\n{n:,} database codes ({db.nbytes / 2**20:.0f} MiB on disk), {len(q)} queries")
    print(f"  exact chunked scan          {base:8.2f} ms/query  (baseline)")
    index = None
    for kind, more in (("ivf", False), ("ivf", True), ("mih", False)):
        t0 = time.perf_counter()
        if more:  # the same index, 4x the cells per query
            index.nprobe = index.nprobe * 4
        else:
            index = ix.build_index(db, kind)
            ix.set_search_effort(index)
        build = time.perf_counter() - t0
        m = ix.measure_index(index, q, args.k, exact, t_exact)
        size = faiss.serialize_index_binary(index).nbytes / 2**20
        what = f"ivf nlist={m['nlist']} nprobe={m['nprobe']}" if kind == "ivf" else f"mih nhash={m['nhash']}"
        print(
            f"  {what:26}  {m['index_ms_per_query']:8.2f} ms/query  {m['speedup']:6.1f}x  recall@{args.k} ids "
            f"{m[f'recall_at_{args.k}_ids']:.3f} distance {m[f'recall_at_{args.k}_distance']:.3f}  "
            f"build {build:6.1f} s  index {size:6.0f} MiB"
        )
    nq = args.eval_queries
    t0 = time.perf_counter()
    rep = ev.retrieval_report(q[:nq], db, labels[q_which[:nq]], labels[which], 64, 1000, (100, 1000))
    t_eval = time.perf_counter() - t0
    print(
        f"  evaluation of {nq} queries over all {n:,}: {t_eval:.1f} s ({1000 * t_eval / nq:.0f} ms/query); "
        f"mAP@ALL {rep.map_all:.4f}, mAP@1000 {rep.map_topk:.4f}, tie-aware {rep.map_tie_aware:.4f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--eval-queries", type=int, default=100)
    ap.add_argument("-k", type=int, default=100)
    ap.add_argument("--tmp", help="folder for the codes files (default: a temp folder)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n_centres, classes = 2000, 21
    centres = rng.integers(0, 256, (n_centres, 8), dtype=np.uint8)
    centre_labels = (rng.random((n_centres, classes)) < 0.03).astype(np.uint8)
    centre_labels[np.arange(n_centres), rng.integers(0, classes, n_centres)] = 1
    import faiss

    print(f"64-bit codes, {n_centres} label-set centres, 8% bits flipped; k={args.k}; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads")  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in (int(v) for v in args.sizes.split(",")):
            run_size(n, args, rng, Path(tmp), centres, centre_labels)
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
