"""ImgNet training throughput (images/s) per backbone on the current device.

Runs the real ImgNet training step (forward, both losses, backward, clipping, Adam) on random
uint8 images at each backbone's input size, after warm-up steps. CNN-F is built from a
MatConvNet-layout file with random weights of the real shapes, written to a temp folder.

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

CNNF_SHAPES = [
    ("conv1", 11, 3, 64, 4, 0),
    ("conv2", 5, 64, 256, 1, 2),
    ("conv3", 3, 256, 256, 1, 1),
    ("conv4", 3, 256, 256, 1, 1),
    ("conv5", 3, 256, 256, 1, 1),
    ("fc6", 6, 256, 4096, 1, 0),
    ("fc7", 1, 4096, 4096, 1, 0),
]


def write_full_cnnf(path: Path) -> None:
    """A MatConvNet-layout imagenet-vgg-f.mat with random weights of the real shapes."""
    import scipy.io

    rng = np.random.default_rng(0)
    convs = {c[0]: c for c in CNNF_SHAPES}
    order = [
        "conv1",
        "relu1",
        "norm1",
        "pool1",
        "conv2",
        "relu2",
        "norm2",
        "pool2",
        "conv3",
        "relu3",
        "conv4",
        "relu4",
        "conv5",
        "relu5",
        "pool5",
        "fc6",
        "relu6",
        "fc7",
        "relu7",
    ]
    layers = np.empty((1, len(order)), dtype=object)
    for i, name in enumerate(order):
        if name in convs:
            _, k, cin, cout, stride, pad = convs[name]
            w = np.empty((1, 2), dtype=object)
            w[0, 0] = (rng.standard_normal((k, k, cin, cout), dtype=np.float32) * np.sqrt(2.0 / (k * k * cin))).astype(
                np.float32
            )
            w[0, 1] = np.zeros((cout, 1), np.float32)
            layers[0, i] = {
                "name": name,
                "type": "conv",
                "weights": w,
                "stride": [[stride, stride]],
                "pad": [[pad] * 4],
            }
        elif name.startswith("relu"):
            layers[0, i] = {"name": name, "type": "relu"}
        elif name.startswith("norm"):
            layers[0, i] = {"name": name, "type": "lrn", "param": [[5, 2, 1e-4, 0.75]]}
        else:
            pad = [0, 1, 0, 1] if name == "pool1" else [0, 0, 0, 0]
            layers[0, i] = {
                "name": name,
                "type": "pool",
                "method": "max",
                "pool": [[3, 3]],
                "stride": [[2, 2]],
                "pad": [pad],
            }
    scipy.io.savemat(path, {"layers": layers, "meta": {"normalization": {"averageImage": np.full((1, 1, 3), 120.0)}}})


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
    model = ImgNet(create_backbone(name, weights, size), 32).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    groups, mults = train.imgnet_param_groups(model, 1e-4, 0.1)
    opt = train.make_optimizer(groups, cfg.train)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n_train, size, size, 3), dtype=np.uint8)
    labels = torch.from_numpy((rng.random((n_train, 21)) < 0.2).astype(np.float32)).to(device)
    B = torch.from_numpy(np.where(rng.random((n_train, 32)) < 0.5, 1.0, -1.0).astype(np.float32)).to(device)
    F = torch.from_numpy(rng.random((n_train, 512)).astype(np.float32)).to(device)
    phase = train.imgnet_phase(
        model, opt, mults, images, np.arange(n_train), labels, B, F, cfg.imgnet, cfg.train, 0, 1, 0, device
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
                write_full_cnnf(Path(weights))
            ips = bench(name, weights, size, args.batch, args.steps, device)
            print(f"{name:10} {size:>3}x{size:<3} {ips:9.1f} images/s training")


if __name__ == "__main__":
    main()
