"""Retrieval speed and memory, all in one process on the same data (docs/benchmarks.md).

100,000 database codes x 1,000 queries at 64 bits, top-1000:
  (a) faiss IndexBinaryFlat search alone (counting select, 1 thread)
  (b) our mAP@1000 end to end (search + relevance + AP)
  (c) a per-query Python loop with argsort (the popular PyTorch toolkit's way), stable sort
  (d) our mAP@ALL (one-pass report: also tie-aware mAP, PR curve, precision@N)
then the whole report at the NUS-WIDE scale (2,100 queries x 193,734 database), compiled and numpy,
against faiss top-1000 search on the same codes.

Usage: .venv/bin/python benchmarks/bench_retrieval.py [--quick] [--nus-only] [--repeat N] [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dseh import evaluation as ev  # noqa: E402
from dseh.codes import pack  # noqa: E402


def data(rng, nq, ndb, bits, classes=21, p=0.12):
    q = np.where(rng.random((nq, bits)) < 0.5, 1, -1).astype(np.int8)
    db = np.where(rng.random((ndb, bits)) < 0.5, 1, -1).astype(np.int8)
    ql = (rng.random((nq, classes)) < p).astype(np.uint8)
    dbl = (rng.random((ndb, classes)) < p).astype(np.uint8)
    return q, db, ql, dbl


def timed(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, dt, peak / 2**20


def toolkit_map(q, db, ql, dbl, topk):
    """The popular toolkit's loop (CalcTopMap), with a stable argsort so ties go by index."""
    bits = q.shape[1]
    qf, dbf = q.astype(np.float64), db.astype(np.float64)
    total = 0.0
    for i in range(len(q)):
        gnd = (ql[i].astype(np.float64) @ dbl.T.astype(np.float64) > 0).astype(np.float32)
        hamm = 0.5 * (bits - qf[i] @ dbf.T)
        ind = np.argsort(hamm, kind="stable")
        tgnd = gnd[ind][:topk]
        tsum = int(tgnd.sum())
        if tsum == 0:
            continue
        count = np.linspace(1, tsum, tsum)
        tindex = np.asarray(np.where(tgnd == 1)) + 1.0
        total += float(np.mean(count / tindex))
    return total / len(q)


def compare(rng, quick: bool) -> None:
    """(a) to (d) on 100,000 x 1,000 (20,000 x 200 with quick)."""
    nq, ndb, bits, k = (200, 20_000, 64, 1000) if quick else (1000, 100_000, 64, 1000)
    q, db, ql, dbl = data(rng, nq, ndb, bits)
    qp, dbp = pack(q), pack(db)
    print(f"{nq} queries x {ndb} database, {bits} bits, top-{k}; faiss: {ev.faiss is not None}")
    (_, ta, ma) = timed(lambda: ev.hamming_topk_packed(qp, dbp, k, backend="faiss" if ev.faiss else "numpy"))
    (_, tn, mn) = timed(lambda: ev.hamming_topk_packed(qp, dbp, k, backend="numpy"))
    (m_b, tb, mb) = timed(lambda: float(ev.average_precisions_packed(qp, dbp, ql, dbl, k).mean()))
    (m_c, tc, mc) = timed(lambda: toolkit_map(q, db, ql, dbl, k))
    (rep, td, md) = timed(lambda: ev.retrieval_report(qp, dbp, ql, dbl, bits, k))
    rows = [
        ("(a) faiss search alone", ta, ma, ""),
        ("    numpy XOR+popcount top-k", tn, mn, ""),
        ("(b) our mAP@1000 end to end", tb, mb, f"mAP@1000 {m_b:.6f}"),
        ("(c) per-query loop + argsort", tc, mc, f"mAP@1000 {m_c:.6f}"),
        ("(d) our mAP@ALL one-pass report", td, md, f"mAP@ALL {rep.map_all:.6f}, tie-aware {rep.map_tie_aware:.6f}"),
    ]
    print(f"{'method':36} {'seconds':>8} {'peak MiB':>9}  result")
    for name, t, m, res in rows:
        print(f"{name:36} {t:8.3f} {m:9.1f}  {res}")
    print(f"ratio (b)/(a): {tb / ta:.2f}x   speed-up (c)/(b): {tc / tb:.1f}x   |mAP(b) - mAP(c)|: {abs(m_b - m_c):.2e}")


def clocked(fn):
    """(output, wall seconds, CPU seconds of this process, peak traced MiB) of fn()."""
    c0 = time.process_time()
    out, wall, peak = timed(fn)
    return out, wall, time.process_time() - c0, peak


def nus_scale(rng, quick: bool, repeat: int, device: str | None = None) -> None:
    """The whole report (mAP@ALL, mAP@5000, tie-aware, P/R@N, PR curve), compiled and numpy, each on
    one thread, against faiss top-1000 search (1 thread) on the same codes, alternated `repeat` times;
    the best wall and CPU seconds of each (on a shared machine the CPU ratio is the steadier). Then
    the compiled report on torch's threads (by default, the cores)."""
    nq2, ndb2 = (300, 40_000) if quick else (2100, 193_734)
    q2, db2, ql2, dbl2 = data(rng, nq2, ndb2, 64)
    qp2, dbp2 = pack(q2), pack(db2)
    backend = "faiss" if ev.faiss else "numpy"
    names = ("faiss top-1000", "report, compiled", "report, numpy")
    calls = (
        lambda: ev.hamming_topk_packed(qp2, dbp2, 1000, backend=backend),
        lambda: ev.retrieval_report(qp2, dbp2, ql2, dbl2, 64, 5000, backend="compiled"),
        lambda: ev.retrieval_report(qp2, dbp2, ql2, dbl2, 64, 5000, backend="numpy"),
    )
    best = {name: [float("inf"), float("inf")] for name in names}
    for _ in range(repeat):
        for name, call in zip(names, calls):
            out, wall, cpu, peak = clocked(call)
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
            if name == "report, compiled":
                rep2, peak2 = out, peak
    threads = ev.cpu_threads()
    rep_mt, wall_mt, _, _ = clocked(
        lambda: ev.retrieval_report(qp2, dbp2, ql2, dbl2, 64, 5000, backend="compiled", threads=threads)
    )
    assert np.array_equal(rep_mt.ap_all, rep2.ap_all)
    fw, fc = best["faiss top-1000"]
    print(
        f"{'smaller run,' if quick else 'NUS-WIDE scale'} {nq2} x {ndb2}, 64 bits: mAP@ALL {rep2.map_all:.4f} (and mAP@5000, tie-aware, PR), "
        f"compiled report's peak traced {peak2:.1f} MiB; best of {repeat}"
    )
    for name in names:
        w, c = best[name]
        print(f"  {name:18}  {w:7.2f} s wall {c:7.2f} s CPU   {w / fw:6.2f}x wall {c / fc:6.2f}x CPU of faiss")
    print(f"  report, compiled, {threads} threads: {wall_mt:7.2f} s wall")
    if device:
        from dseh import evaluation_torch as evt

        walls = []
        for _ in range(repeat + 1):  # the first run starts the device
            rep_t, wall, _, _ = clocked(lambda: evt.retrieval_report(qp2, dbp2, ql2, dbl2, 64, 5000, device=device))
            walls.append(wall)
        diff = max(
            float(np.max(np.abs(getattr(rep_t, f) - getattr(rep2, f)))) for f in ("ap_all", "ap_topk", "ap_tie_aware")
        )
        print(
            f"  report on {device}:{min(walls[1:]):9.2f} s wall (first {walls[0]:.2f} s); "
            f"{min(walls[1:]) / fw:.2f}x faiss; max |AP torch - AP compiled| {diff:.1e}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--nus-only", action="store_true", help="only the NUS-WIDE-scale report against faiss search")
    ap.add_argument("--repeat", type=int, default=1, help="NUS-WIDE scale: best of this many alternated runs")
    ap.add_argument("--device", help="NUS-WIDE scale: also the report by dseh.evaluation_torch on this torch device")
    args = ap.parse_args()
    if ev.faiss is not None:
        ev.faiss.omp_set_num_threads(1)
    warm = data(np.random.default_rng(1), 4, 64, 64)  # compiles (or loads) the compiled report, untimed
    ev.retrieval_report(pack(warm[0]), pack(warm[1]), warm[2], warm[3], 64, 10)
    rng = np.random.default_rng(0)
    if not args.nus_only:
        compare(rng, args.quick)
    nus_scale(rng, args.quick, args.repeat, args.device)
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
