"""ImgNet training throughput (images/s) per backbone on the current device.

Three modes:
- `--mode step` (default): the real ImgNet training step (forward, both losses, backward, clipping,
  Adam) on random uint8 images already in memory, after warm-up steps.
- `--mode loop`: the whole training loop, `loop.run_phase`, over a uint8 memory-mapped .npy of
  random images on disk (the prepared data's layout): gather threads, pinned memory, non-blocking
  copies, bf16 autocast, channels_last and optionally torch.compile, as a training step runs them.
  It prints images/s of the epochs after the first (warm-up, compile) and, on CUDA, the GPU
  utilisation sampled by nvidia-smi over those epochs. Under torchrun every rank runs it and rank 0
  prints the throughput of all ranks together.
- `--mode feed`: the loop's data path alone, the phase's own `fetch` (memmap gather, into pinned
  memory on CUDA; flips are left to the device) with 1, 2, 4, ... up to `--workers` threads and the
  loop's prefetch depth, no
  model step: the images/s the loader can hand a GPU, against which a training step's rate shows
  whether loading can starve it; beside it, a plain numpy gather-then-flip in the same process. The
  file is read from the page cache (it was just written).

CNN-F is built from a MatConvNet-layout file with random weights of the real shapes
(tests/matconvnet.py), written to a temp folder.

Usage: .venv/bin/python benchmarks/bench_train.py [--backbones small,cnnf,alexnet,vgg16,resnet50]
       [--mode step|loop|feed] [--steps 5] [--batch 128] [--device auto] [--compile] [--no-amp]
       [--workers 2] [--n-train 4096] [--epochs 3]
       torchrun --nproc-per-node N benchmarks/bench_train.py --mode loop ...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dseh import methods  # noqa: E402
from dseh.config import from_dict  # noqa: E402
from dseh.models.backbones import create_backbone  # noqa: E402
from dseh.models.nets import ImgNet  # noqa: E402
from dseh.train import device as devices  # noqa: E402
from dseh.train import feed, loop, phases  # noqa: E402
from dseh.train.recipe import make_optimizer  # noqa: E402
from tests.matconvnet import FULL_CONVS, write_cnnf  # noqa: E402


def dseh_phase(cfg, name: str, weights: str, size: int, images: np.ndarray, epochs: int, device: torch.device):
    """(model, optimiser, the real ImgNet phase) under DSEH's objective with random LabNet targets
    for the len(images) training items: what both modes time."""
    torch.manual_seed(0)
    model = phases.place_model(ImgNet(create_backbone(name, weights, size), 32), device, cfg.train)
    groups, mults = phases.imgnet_param_groups(model, 1e-4, 0.1)
    recipe, _ = methods.dseh_recipe(cfg)
    opt = make_optimizer(groups, recipe)
    rng = np.random.default_rng(0)
    n = len(images)
    labels = torch.from_numpy((rng.random((n, 21)) < 0.2).astype(np.float32)).to(device)
    B = torch.from_numpy(np.where(rng.random((n, 32)) < 0.5, 1.0, -1.0).astype(np.float32)).to(device)
    F = torch.from_numpy(rng.random((n, 512)).astype(np.float32)).to(device)
    inputs = methods.ObjectiveInputs(cfg=cfg, labels=labels, device=device, labnet_targets=(B, F))
    objective, _ = methods.get("dseh").objective(inputs)
    phase = phases.imgnet_phase(
        model, opt, mults, images, np.arange(n), objective, cfg.imgnet, cfg.train, 0, epochs, 0, device, recipe
    )
    return model, opt, phase


def bench(
    name: str, weights: str, size: int, batch: int, steps: int, device: torch.device, amp: bool, n_train: int = 512
) -> float:
    cfg = from_dict(
        {
            "bits": 32,
            "imgnet": {"backbone": name, "weights": weights, "batch_size": batch},
            "train": {"loader_workers": 2, "amp": amp},
        }
    )
    images = np.random.default_rng(1).integers(0, 255, (n_train, size, size, 3), dtype=np.uint8)
    model, opt, phase = dseh_phase(cfg, name, weights, size, images, 1, device)
    idx = np.arange(batch) % n_train
    model.train()

    def step():
        terms = phase.step(model, idx, phase.fetch(idx, 0, 0))
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


class GpuSampler:
    """nvidia-smi's utilisation.gpu of one GPU, sampled every 100 ms in the background."""

    def __init__(self, index: int):
        import shutil
        import subprocess

        self.proc = None
        if shutil.which("nvidia-smi"):
            cmd = ["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            self.proc = subprocess.Popen([*cmd, "-lms", "100"], stdout=subprocess.PIPE, text=True)
            self.samples: list[tuple[float, float]] = []
            import threading

            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.strip())))
            except ValueError:
                pass

    def mean(self, start: float, end: float) -> float | None:
        vals = [v for t, v in getattr(self, "samples", []) if start <= t <= end]
        return sum(vals) / len(vals) if vals else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def memmap_images(tmp: Path, n: int, size: int, info: devices.Dist) -> np.ndarray:
    """A uint8 (n, size, size, 3) .npy of random pixels in `tmp`, written once by rank 0, memory-mapped."""
    path = tmp / f"images-{size}.npy"
    if info.main and not path.exists():
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        rng = np.random.default_rng(0)
        for s in range(0, n, 512):
            mm[s : s + 512] = rng.integers(0, 255, mm[s : s + 512].shape, dtype=np.uint8)
        mm.flush()
        del mm
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
    return np.load(path, mmap_mode="r")


def numpy_fetch(images: np.ndarray, pin: bool):
    """The baseline data path: fancy indexing, then the strided numpy flip of the flipped rows, then
    a copy into pinned memory on CUDA (what the loop did before gather_images copied row by row)."""
    flips = np.random.default_rng(0).random(len(images)) < 0.5

    def fetch(idx: np.ndarray, _epoch: int, _b: int) -> torch.Tensor:
        x = images[np.sort(idx)]
        f = flips[np.sort(idx)]
        x[f] = x[f, :, ::-1]
        t = torch.from_numpy(x)
        return t.pin_memory() if pin else t

    return fetch


def bench_feed(name: str, weights: str, size: int, args: argparse.Namespace, device: torch.device, tmp: Path):
    """Images/s of the phase's own fetch over shuffled global batches, per number of gather threads,
    prefetching workers + 1 batches ahead as run_phase does, and of the numpy baseline in the same
    process; [(threads, images/s, baseline images/s)], best of 2 epochs each."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = from_dict({"bits": 32, "imgnet": {"backbone": name, "weights": weights, "batch_size": args.batch}})
    images = memmap_images(tmp, args.n_train, size, devices.dist_info())
    _, _, phase = dseh_phase(cfg, name, weights, size, images, 2, device)
    baseline = numpy_fetch(images, device.type == "cuda")
    batches = devices.rank_batches(np.random.default_rng(0).permutation(args.n_train), args.batch, devices.Dist())
    threads = [t for t in (1, 2, 4, 8, 16, 32, 64) if t < args.workers] + [args.workers]
    rates = []
    for w in threads:
        best = {}
        with ThreadPoolExecutor(max_workers=w) as pool:
            for fetch in (phase.fetch, baseline, phase.fetch, baseline):
                t0 = time.perf_counter()
                for _ in feed.prefetch(pool, fetch, batches, 0, w + 1):
                    pass
                ips = sum(len(b) for b in batches) / (time.perf_counter() - t0)
                best[fetch] = max(best.get(fetch, 0.0), ips)
        rates.append((w, best[phase.fetch], best[baseline]))
    return rates


def bench_loop(name: str, weights: str, size: int, args: argparse.Namespace, device: torch.device, tmp: Path) -> dict:
    """The real training loop over a memory-mapped file; images/s after the first epoch."""
    info = devices.dist_info()
    cfg = from_dict(
        {
            "bits": 32,
            "imgnet": {"backbone": name, "weights": weights, "batch_size": args.batch, "epochs": [args.epochs]},
            "train": {
                "loader_workers": args.workers,
                "amp": not args.no_amp,
                "compile": args.compile,
                "channels_last": not args.no_channels_last,
            },
        }
    )
    images = memmap_images(tmp, args.n_train, size, info)
    n = args.n_train
    _, _, phase = dseh_phase(cfg, name, weights, size, images, args.epochs, device)
    sampler = GpuSampler(device.index or 0) if device.type == "cuda" and info.main else None
    t_start = time.perf_counter()
    history = loop.run_phase(phase, cfg.train, None, "bench", progress=False)
    t_end = time.perf_counter()
    util = None
    if sampler is not None:
        warm = history[0]["seconds"]
        util = sampler.mean(t_start + warm + 0.5, t_end - 0.2)
        sampler.stop()
    steady = history[1:] or history
    seconds = sum(h["seconds"] for h in steady)
    return {
        "images_per_s": len(steady) * n / seconds,
        "first_epoch_s": history[0]["seconds"],
        "gpu_util": util,
        "compute_dtype": devices.compute_dtype(device, cfg.train.amp),
    }


def backbone_input(name: str, tmp: Path, info: devices.Dist) -> tuple[str, int]:
    """(weights file, input size) of a backbone: CNN-F's random-weight .mat is written by rank 0."""
    if name == "small":
        return "", 32
    if name != "cnnf":
        return "", 224
    weights = tmp / "vgg-f.mat"
    if info.main:
        write_cnnf(str(weights), convs=FULL_CONVS, std=0.01)
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
    return str(weights), 224


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", default="small,cnnf,alexnet,resnet50")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mode", choices=["step", "loop", "feed"], default="step")
    ap.add_argument("--compile", action="store_true", help="loop: torch.compile the training step")
    ap.add_argument("--no-amp", action="store_true", help="float32 instead of bf16 autocast")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--workers", type=int, default=4, help="loop: batch-gathering threads per process")
    ap.add_argument("--n-train", type=int, default=4096, help="loop: images in the memory-mapped file")
    ap.add_argument("--epochs", type=int, default=3, help="loop: epochs, the first one not timed")
    ap.add_argument("--tmp", help="loop: folder for the memory-mapped file (default: a temp folder)")
    args = ap.parse_args()
    info = devices.init_distributed(args.device)
    device = devices.resolve_device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.mode == "feed":
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            print(f"device: {card}; the data path alone; batch {args.batch}; {args.n_train} images")
            for name in args.backbones.split(","):
                weights, size = backbone_input(name, Path(tmp), info)
                for w, ips, base in bench_feed(name, weights, size, args, device, Path(tmp)):
                    mib = ips * size * size * 3 / 2**20
                    print(
                        f"{name:10} {size:>3}x{size:<3} {w:3d} threads {ips:9.0f} images/s fed ({mib:,.0f} MiB/s); "
                        f"numpy baseline {base:7.0f} images/s: {ips / base:.1f}x"
                    )
        return
    if args.mode == "loop":
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            if info.enabled:  # every rank uses rank 0's folder
                import torch.distributed as dist

                box = [tmp]
                dist.broadcast_object_list(box, src=0)
                tmp = box[0]
            if info.main:
                print(
                    f"device: {card} x {info.world} process(es); torch {torch.__version__}; batch {args.batch} per "
                    f"step over all processes; {args.n_train} images; {args.workers} gather threads; "
                    f"compile={args.compile}; epochs after the first timed"
                )
            for name in args.backbones.split(","):
                weights, size = backbone_input(name, Path(tmp), info)
                r = bench_loop(name, weights, size, args, device, Path(tmp))
                if info.main:
                    util = "" if r["gpu_util"] is None else f", GPU utilisation {r['gpu_util']:.0f}%"
                    print(
                        f"{name:10} {size:>3}x{size:<3} {r['images_per_s']:9.1f} images/s training loop "
                        f"({r['precision']}; first epoch {r['first_epoch_s']:.1f} s{util})",
                        flush=True,
                    )
            if info.enabled:
                dist.barrier()
        devices.leave_distributed()
        return
    print(f"device: {card}; torch {torch.__version__}; batch {args.batch}; {args.steps} timed steps after 2 warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones.split(","):
            weights, size = backbone_input(name, Path(tmp), info)
            ips = bench(name, weights, size, args.batch, args.steps, device, not args.no_amp)
            prec = devices.compute_dtype(device, not args.no_amp)
            print(f"{name:10} {size:>3}x{size:<3} {ips:9.1f} images/s training ({prec})")


if __name__ == "__main__":
    main()
