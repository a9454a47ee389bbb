"""Peak memory of `dseh prepare` streaming a list-files collection into the uint8 array.

Writes N small JPEGs and DeepHash list files to a temporary folder, runs `dseh prepare` at
224x224 in a child process and prints its peak RSS beside the size of the array it wrote.

Usage: .venv/bin/python benchmarks/bench_prepare.py [--n 20000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def make_collection(root: Path, n: int, classes: int = 21) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    lines = []
    for i in range(n):
        rel = f"img/{i // 1000:03d}/{i:06d}.jpg"
        p = root / "images" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img = np.roll(base[i % 8], i % 64, axis=1)
        Image.fromarray(img).save(p, quality=85)
        lab = (rng.random(classes) < 0.1).astype(int)
        lab[i % classes] = 1
        lines.append(rel + " " + " ".join(map(str, lab)))
    (root / "test.txt").write_text("\n".join(lines[: n // 10]) + "\n")
    (root / "database.txt").write_text("\n".join(lines[n // 10 :]) + "\n")
    (root / "train.txt").write_text("\n".join(lines[n // 10 : n // 2]) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_collection(root / "col", args.n)
        print(f"wrote {args.n} JPEGs in {time.perf_counter() - t0:.1f} s")
        params = {
            "data": {
                "source": "list-files",
                "list_dir": str(root / "col"),
                "image_root": str(root / "col/images"),
                "image_size": args.size,
                "chunk_size": 256,
                "workers": 4,
            }
        }
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dseh",
                "prepare",
                "-q",
                "--params",
                str(root / "params.yaml"),
                "--out",
                str(root / "prepared"),
            ],
            cwd=REPO,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        if status != 0:
            raise SystemExit(f"prepare failed with status {status}")
        array = (root / "prepared/images.npy").stat().st_size
        rss = usage.ru_maxrss * 1024
        print(
            f"prepared {args.n} images at {args.size}x{args.size} in {seconds:.1f} s ({args.n / seconds:.0f} images/s)"
        )
        print(
            f"array {array / 2**20:.0f} MiB, peak RSS of prepare {rss / 2**20:.0f} MiB ({rss / array:.2f}x the array)"
        )


if __name__ == "__main__":
    main()
