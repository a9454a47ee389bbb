"""The data feed of the image network: batch rows gathered from the memory-mapped uint8 images
(in pinned memory on CUDA), random flips done on the device, and a bounded prefetch on threads."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from dseh.config import TrainConfig


def loader_threads(cfg: TrainConfig, device: torch.device) -> int:
    """Batch-gathering threads: train.loader_workers, or for 0 two on the CPU (the step, not the
    gather, is the bottleneck there) and on a GPU this process's share of the node's cores, 2 to 8
    (docs/benchmarks.md: one thread gathers tens of thousands of 224x224 images/s from the page cache)."""
    if cfg.loader_workers > 0:
        return cfg.loader_workers
    if device.type != "cuda":
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(2, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def prefetch(pool: ThreadPoolExecutor, fetch: Callable, batches: list[np.ndarray], epoch: int, depth: int):
    """Yield fetch(batch, epoch, i) for the batches in order, with `depth` fetches in flight on `pool`;
    a batch is dropped here once used, so memory holds depth + 1 batches, not an epoch's."""
    pending = deque(pool.submit(fetch, b, epoch, i) for i, b in enumerate(batches[:depth]))
    for j in range(depth, len(batches) + depth):
        batch = pending.popleft().result()
        if j < len(batches):
            pending.append(pool.submit(fetch, batches[j], epoch, j))
        yield batch


def gather_images(images: np.ndarray, items: np.ndarray, pin: bool = False) -> torch.Tensor:
    """uint8 rows `items` of the memory-mapped array as a tensor (in pinned memory with `pin`): rows
    are read in ascending order and each is copied once, straight to its place (about 2x fancy
    indexing at 224x224, which copies twice; slower for tiny rows, where neither is a bottleneck)."""
    out = torch.empty((len(items),) + tuple(images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
    rows = out.numpy()
    for pos in np.argsort(items, kind="stable"):
        rows[pos] = images[items[pos]]
    return out


def translate(x: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """(N, H, W, C) images, each shifted by its (dy, dx) in [-pad, pad] with zeros filling the border
    (a random crop of the zero-padded image), in one gather on the training device."""
    n, h, w, _ = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad))
    rows = (pad + offsets[:, 0, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (pad + offsets[:, 1, None] + torch.arange(w, device=x.device))[:, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None], rows, cols]


def mirror(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) images with the rows where `flip` is set mirrored left-right. Done on the
    training device: free on a GPU, where the host's strided flip of 3-byte pixels was the slowest
    part of the data path (benchmarks/bench_train.py --mode feed)."""
    return torch.where(flip[:, None, None, None], x.flip(2), x)
