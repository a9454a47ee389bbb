"""Throughput and latency of the served retrieval model (`mlflow models serve`) over HTTP.

Starts `mlflow models serve -m MODEL --env-manager local` on a free loopback port (one worker), waits
for /ping, then for each scenario sends --requests POSTs (after --warmup unmeasured ones) from
--clients concurrent client threads: one query image per request, a batch of --batch images per
request, one label set per request, a batch of label sets. Query images and label sets are the
prepared dataset's query items. Request bodies are encoded once, before timing. Prints a Markdown
table (requests/s, queries/s, latency p50/p95/p99 in ms) and writes it as JSON with --json; the
server is stopped by its PID at the end.

Usage: .venv/bin/python benchmarks/bench_serve.py [--model models:/dseh-retrieval@champion]
       [--data outputs/data] [--requests 200] [--warmup 10] [--batch 16] [--clients 1] [-k 10]
       [--json FILE]   (MLFLOW_TRACKING_URI unset: ./mlflow.db)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dseh.data import PreparedData  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path('mlflow.db').resolve()}")
    exe = str(Path(sys.executable).parent / "mlflow")
    cmd = [exe, "models", "serve", "-m", model, "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port),
           "-w", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop(proc)
            raise SystemExit(f"the model server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def post(url: str, body: bytes) -> float:
    """Seconds one request took; a non-200 answer stops the benchmark."""
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()
        if resp.status != 200:
            raise SystemExit(f"HTTP {resp.status}")
    return time.perf_counter() - t


def run(url: str, bodies: list[bytes], n: int, warmup: int, clients: int) -> tuple[float, np.ndarray]:
    """(wall seconds, per-request latencies) of n requests cycling over `bodies` from `clients` threads."""
    for i in range(warmup):
        post(url, bodies[i % len(bodies)])
    lat = np.zeros(n)
    counter = iter(range(n))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            lat[i] = post(url, bodies[i % len(bodies)])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t, lat


def scenarios(data: PreparedData, batch: int, k: int) -> dict[str, tuple[int, list[bytes]]]:
    """name -> (queries per request, request bodies)."""
    items = np.sort(data.query)
    rows_img = [{"image": np.asarray(data.images[i]).ravel().tolist()} for i in items[: 4 * batch]]
    rows_lab = [{"labels": [data.classes[c] for c in np.flatnonzero(data.labels[i])]} for i in items[: 4 * batch]]

    def bodies(rows: list[dict], per: int) -> list[bytes]:
        return [
            json.dumps({"dataframe_records": rows[s : s + per], "params": {"k": k}}).encode()
            for s in range(0, len(rows) - per + 1, per)
        ]

    return {
        "1 image": (1, bodies(rows_img, 1)),
        f"{batch} images": (batch, bodies(rows_img, batch)),
        "1 label set": (1, bodies(rows_lab, 1)),
        f"{batch} label sets": (batch, bodies(rows_lab, batch)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models:/dseh-retrieval@champion")
    ap.add_argument("--data", default="outputs/data")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()

    data = PreparedData(args.data)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        proc = start_server(args.model, port, Path(tmp) / "serve.log")
        started = time.perf_counter() - t
        url = f"http://127.0.0.1:{port}/invocations"
        rows = []
        try:
            for name, (per, bodies) in scenarios(data, args.batch, args.k).items():
                wall, lat = run(url, bodies, args.requests, args.warmup, args.clients)
                p50, p95, p99 = np.percentile(lat * 1000, [50, 95, 99])
                rows.append({"scenario": name, "requests_per_s": args.requests / wall,
                             "queries_per_s": args.requests * per / wall, "p50_ms": p50, "p95_ms": p95,
                             "p99_ms": p99})  # fmt: skip
        finally:
            stop(proc)
    print(
        f"server ready in {started:.1f} s; {args.requests} requests per scenario, {args.clients} client(s), k={args.k}"
    )
    print("| request | requests/s | queries/s | p50 ms | p95 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['requests_per_s']:.1f} | {r['queries_per_s']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"startup_s": started, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
