"""ImgNet training throughput (images/s) per backbone on the current device.

Runs the real ImgNet training step (forward, both losses, backward, clipping, Adam) on random
uint8 images at each backbone's input size, after warm-up steps. CNN-F is built from a
MatConvNet-layout file with random weights of the real shapes (tests/matconvnet.py), written to a
temp folder.

Usage: .venv/bin/python benchmarks/bench_train.py [--backbones small,cnnf,alexnet,vgg16,resnet50]
       [--steps 5] [--batch 128] [--device auto]
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

from dseh import train  # noqa: E402
from dseh.config import from_dict  # noqa: E402
from dseh.models.backbones import create_backbone  # noqa: E402
from dseh.models.nets import ImgNet  # noqa: E402
from tests.matconvnet import FULL_CONVS, write_cnnf  # noqa: E402


def bench(
    name: str, weights: str, size: int, batch: int, steps: int, device: torch.device, n_train: int = 512
) -> float:
    cfg = from_dict(
        {
            "bits": 32,
            "imgnet": {"backbone": name, "weights": weights, "batch_size": batch},
            "train": {"loader_workers": 2},
        }
    )
    torch.manual_seed(0)
    model = train.place_model(ImgNet(create_backbone(name, weights, size), 32), device, cfg.train)
    groups, mults = train.imgnet_param_groups(model, 1e-4, 0.1)
    opt = train.make_optimizer(groups, cfg.train)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n_train, size, size, 3), dtype=np.uint8)
    labels = torch.from_numpy((rng.random((n_train, 21)) < 0.2).astype(np.float32)).to(device)
    B = torch.from_numpy(np.where(rng.random((n_train, 32)) < 0.5, 1.0, -1.0).astype(np.float32)).to(device)
    F = torch.from_numpy(rng.random((n_train, 512)).astype(np.float32)).to(device)
    objective = train.dseh_objective(labels, B, F, cfg.imgnet)
    phase = train.imgnet_phase(
        model, opt, mults, images, np.arange(n_train), objective, cfg.imgnet, cfg.train, 0, 1, 0, device
    )
    idx = np.arange(batch) % n_train
    model.train()

    def step():
        terms = phase.step(idx, phase.fetch(idx, 0, 0))
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", default="small,cnnf,alexnet,resnet50")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = train.resolve_device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {card}; torch {torch.__version__}; batch {args.batch}; {args.steps} timed steps after 2 warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones.split(","):
            weights, size = "", 224
            if name == "small":
                size = 32
            if name == "cnnf":
                weights = str(Path(tmp) / "vgg-f.mat")
                write_cnnf(weights, convs=FULL_CONVS, std=0.01)
            ips = bench(name, weights, size, args.batch, args.steps, device)
            print(f"{name:10} {size:>3}x{size:<3} {ips:9.1f} images/s training")


if __name__ == "__main__":
    main()
