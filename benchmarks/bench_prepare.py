"""`dseh prepare` on list files: time and peak memory of the whole step, and the resize on the CPU against
the resize on a device.

--mode prepare (default): writes N small JPEGs and DeepHash list files to a temporary folder, runs
`dseh prepare` at 224x224 in a child process (with `data.device` = --device) and prints its time and
peak RSS beside the size of the array it wrote.

--mode resize: decodes N JPEGs of --src size once, then times in this process (best of --repeat):
decoding alone on --workers threads; Pillow's per-image bilinear resize on --workers threads (the CPU
path of `prepare`); `dseh.images.resize_batch` in batches of --batch on the CPU and on --device (the
device path, host-device copies included). Prints images/s, the CPU / device ratio and how far the
torch results are from Pillow's.

Usage: .venv/bin/python benchmarks/bench_prepare.py [--mode prepare|resize] [--n 20000] [--device cuda]
"""

from __future__ import annotations

import argparse
import io
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


def _jpegs(n: int, src: tuple[int, int]) -> list[bytes]:
    """n JPEGs of src = (width, height): smooth random textures, so they compress like photographs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 255, (src[1] // 8, src[0] // 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize(src, Image.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _best(fn, repeat: int) -> float:
    fn()  # warm-up: thread pools, torch kernels, CUDA context
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_resize(args) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from PIL import Image

    from dseh.images import decode_rgb, resize_batch

    src = tuple(int(v) for v in args.src.split("x"))
    blobs = _jpegs(args.n, src)
    decoded = [decode_rgb(b) for b in blobs]
    size, n = args.size, args.n

    def pil_one(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))

    def uint8_one(a: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(a).permute(2, 0, 1)[None]
        y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return y[0].permute(1, 2, 0).numpy()

    def batched(device) -> np.ndarray:
        return np.concatenate(
            [resize_batch(decoded[s : s + args.batch], size, device) for s in range(0, n, args.batch)]
        )

    with ThreadPoolExecutor(args.workers) as pool:
        t_decode = _best(lambda: list(pool.map(decode_rgb, blobs)), args.repeat)
        t_pil = _best(lambda: list(pool.map(pil_one, decoded)), args.repeat)
        ref = np.stack(list(pool.map(pil_one, decoded)))
    rows = [(f"decode only ({args.workers} threads)", t_decode), (f"Pillow resize ({args.workers} threads)", t_pil)]
    devices = [torch.device("cpu")] + ([torch.device(args.device)] if args.device != "cpu" else [])
    results = {}
    for device in devices:
        t = _best(lambda d=device: batched(d), args.repeat)
        results[device.type] = batched(device)
        rows.append((f"torch resize_batch on {device} (batch {args.batch})", t))
    # torch's uint8 kernel (CPU only, channels-last): not what prepare runs, shown for the comparison
    t_u8 = _best(lambda: [uint8_one(a) for a in decoded], args.repeat)
    results["cpu, uint8 kernel"] = np.stack([uint8_one(a) for a in decoded])
    rows.insert(2, ("torch uint8 kernel on cpu, per image (not used)", t_u8))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"{n} JPEGs {args.src} -> {size}x{size}; torch threads {torch.get_num_threads()}; {name}")
    for label, t in rows:
        print(f"  {label:<48} {n / t:>9.0f} images/s")
    last = rows[-1][1]
    print(f"  Pillow resize / {rows[-1][0].split(' (')[0]}: {t_pil / last:.2f}x")
    print(f"  decode + Pillow resize on the CPU: {n / (t_decode + t_pil):.0f} images/s; the resize is "
          f"{t_pil / (t_decode + t_pil):.0%} of that CPU time")  # fmt: skip
    for key, out in results.items():
        diff = np.abs(out.astype(int) - ref.astype(int))
        print(f"  torch on {key} against Pillow: max |diff| {diff.max()}, {(diff > 0).mean():.2%} of values differ")


def bench_prepare(args) -> None:
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
                "device": args.device,
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("prepare", "resize"), default="prepare")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="cpu", help="prepare: data.device; resize: the device beside the CPU")
    ap.add_argument("--src", default="500x375", help="resize: the JPEGs' width x height")
    ap.add_argument("--workers", type=int, default=4, help="resize: decoding / Pillow threads")
    ap.add_argument("--batch", type=int, default=512, help="resize: images per resize_batch call (data.chunk_size)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    if args.mode == "resize":
        bench_resize(args)
    else:
        bench_prepare(args)


if __name__ == "__main__":
    main()
