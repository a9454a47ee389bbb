"""The one training loop: epochs, the learning-rate schedule, clipping, the NaN guard, and resume
checkpoints. LabNet and ImgNet (and the deep baselines) differ only in the Phase they pass in
(dseh.train.phases)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dseh.config import TrainConfig
from dseh.errors import DsehError
from dseh.storage import atomic_file
from dseh.train.device import Dist, all_reduce_sum, dist_info, rank_batches, wrap_parallel
from dseh.train.feed import loader_threads, prefetch

log = logging.getLogger(__name__)

GPU_SYNC_EVERY = 32  # steps between the loop's host syncs (NaN guard, progress) on a GPU


@dataclass
class Phase:
    """What the loop needs from one network's phase."""

    name: str
    round_index: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    n_items: int
    batch_size: int
    epochs: int
    base_lr: Callable[[int], float]  # epoch -> lr of the new layers
    lr_mults: list[float]  # per optimizer param group
    fetch: Callable[[np.ndarray, int, int], Any]  # (indices, epoch, batch number) -> batch, in a thread
    # (the model, DDP-wrapped under torchrun; indices; fetched batch) -> {'loss': total, term: value}
    step: Callable[[nn.Module, np.ndarray, Any], dict[str, torch.Tensor]]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpointed with the model
    seed: int = 0
    clip_value: float = 0.0  # gradients clipped by value to [-clip, clip]; 0 disables


def finite_or_raise(name: str, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise DsehError(f"{name} holds non-finite values")


def _raise_if_not_finite(phase: Phase, terms: dict[str, torch.Tensor], epoch: int, checkpoint: Path | None) -> None:
    """The NaN guard: one clear error naming the first non-finite loss term; nothing is saved."""
    if bool(torch.isfinite(terms["loss"])):
        return
    bad = next((k for k, v in terms.items() if k != "loss" and not torch.isfinite(v)), "loss")
    kept = f"; the last good checkpoint is kept at {checkpoint}" if checkpoint and checkpoint.exists() else ""
    raise DsehError(
        f"{phase.name} round {phase.round_index}: loss term '{bad}' became {float(terms[bad])} at epoch {epoch + 1}{kept}"
    )


# --------------------------------------------------------------------------- resume checkpoints


def _rng_state() -> dict:
    """Every global RNG state as tensors and plain values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": [int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(
        (np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"], has_gauss, cached)
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
    path: Path, phase: Phase, fingerprint: str, epoch: int, gen: torch.Generator, history: list
) -> None:
    state = {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "model": phase.model.state_dict(),
        "optimizer": phase.optimizer.state_dict(),
        "buffers": {k: v.cpu() for k, v in phase.buffers.items()},
        "generator": gen.get_state(),
        "rng": _rng_state(),
        "history": history,
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def _resume(phase: Phase, gen: torch.Generator, checkpoint: Path | None, fingerprint: str) -> tuple[list[dict], int]:
    """(history, first epoch to run): from `checkpoint` when it was written for this fingerprint.
    A checkpoint that cannot be read safely is set aside with a warning and training starts over."""
    if checkpoint is None or not checkpoint.is_file():
        return [], 0
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}")
    except Exception as exc:  # noqa: BLE001 - a truncated, corrupt or unsafe file
        aside = checkpoint.with_name(checkpoint.name + ".bad")
        checkpoint.replace(aside)
        log.warning("%s: the resume checkpoint cannot be read (%s); moved to %s, starting over", phase.name, exc, aside)
        return [], 0
    if state.get("fingerprint") != fingerprint:
        log.info("%s: ignoring a checkpoint of another configuration at %s", phase.name, checkpoint)
        return [], 0
    phase.model.load_state_dict(state["model"])
    phase.optimizer.load_state_dict(state["optimizer"])
    for k, v in state["buffers"].items():
        phase.buffers[k].copy_(v)
    gen.set_state(state["generator"])
    _set_rng_state(state["rng"])
    log.info("%s round %d: resuming after epoch %d from %s", phase.name, phase.round_index, state["epoch"], checkpoint)
    return state["history"], int(state["epoch"])


# --------------------------------------------------------------------------- the loop


def run_phase(
    phase: Phase,
    cfg: TrainConfig,
    checkpoint: Path | None,
    fingerprint: str,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train `phase` for its epochs; returns the per-epoch history. `on_epoch` gets each history
    row as its epoch ends (and the rows of a resumed run's earlier epochs first): live tracking.

    After every epoch the model, optimiser, buffers, sampler generator and every RNG state go to
    `checkpoint`, so a killed run started again with the same fingerprint resumes from the last
    completed epoch and ends with the same weights as an uninterrupted run.

    Under torchrun every rank runs this with the same seed; gradients are averaged by DDP, the
    per-epoch loss sums over all ranks, and only rank 0 writes the checkpoint and shows progress.
    """
    info = dist_info()
    net = wrap_parallel(phase.model, info)
    if cfg.compile:  # the step calls the compiled module; phase.model keeps its plain state_dict keys
        net = torch.compile(net)
    gen = torch.Generator().manual_seed(phase.seed)
    history, start_epoch = _resume(phase, gen, checkpoint, fingerprint)
    report = on_epoch if on_epoch is not None and info.main else (lambda row: None)
    for row in history:
        report(row)
    params = [p for p in phase.model.parameters() if p.requires_grad]
    workers = loader_threads(cfg, params[0].device)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for epoch in range(start_epoch, phase.epochs):
            history.append(_run_epoch(phase, net, params, gen, info, epoch, pool, workers, checkpoint, progress))
            if checkpoint is not None and info.main:
                _save_checkpoint(checkpoint, phase, fingerprint, epoch + 1, gen, history)
            report(history[-1])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return history


def _run_epoch(
    phase: Phase,
    net: nn.Module,
    params: list[torch.Tensor],
    gen: torch.Generator,
    info: Dist,
    epoch: int,
    pool: ThreadPoolExecutor,
    workers: int,
    checkpoint: Path | None,
    progress: bool,
) -> dict:
    """One epoch of `phase`; returns its history row (lr, time, throughput, mean loss terms)."""
    from tqdm import tqdm

    device = params[0].device
    on_gpu = device.type == "cuda"
    lr = phase.base_lr(epoch)
    for group, mult in zip(phase.optimizer.param_groups, phase.lr_mults):
        group["lr"] = lr * mult
    phase.model.train()
    perm = torch.randperm(phase.n_items, generator=gen).numpy()
    batches = rank_batches(perm, phase.batch_size, info)
    acc: dict[str, torch.Tensor] = {}  # per-term sums over the epoch, on the device
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(batches),
        desc=f"{phase.name} r{phase.round_index} e{epoch + 1}/{phase.epochs}",
        leave=False,
        disable=not (progress and info.main),
    )
    fed = prefetch(pool, phase.fetch, batches, epoch, workers + 1)
    for i, (idx, batch) in enumerate(zip(batches, fed)):
        terms = phase.step(net, idx, batch)
        # a host sync: before every step on the CPU, every GPU_SYNC_EVERY steps on a GPU (so the GPU
        # never waits for Python between steps); the epoch's sums are checked too
        if not on_gpu or (i + 1) % GPU_SYNC_EVERY == 0:
            _raise_if_not_finite(phase, terms, epoch, checkpoint)
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.4f}")
        phase.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if phase.clip_value > 0:
            torch.nn.utils.clip_grad_value_(params, phase.clip_value)
        phase.optimizer.step()
        for k, v in terms.items():
            acc[k] = acc.get(k, 0.0) + v.detach().double() * len(idx)
        bar.update(1)
    bar.close()
    keys = sorted(acc)
    # the epoch's loss over every rank's items
    total = all_reduce_sum(torch.stack([torch.as_tensor(acc[k], device=device) for k in keys]))
    n_seen = sum(len(b) for b in batches) * info.world if info.enabled else phase.n_items
    sums = dict(zip(keys, total.cpu().tolist()))
    _raise_if_not_finite(phase, {k: torch.tensor(v) for k, v in sums.items()}, epoch, checkpoint)
    seconds = time.perf_counter() - t0
    row = {
        "round": phase.round_index,
        "epoch": epoch + 1,
        "lr": lr,
        "seconds": round(seconds, 3),
        "items_per_s": round(phase.n_items / max(seconds, 1e-9), 1),
    }
    row.update({k: v / n_seen for k, v in sums.items()})
    log.info(
        "%s round %d epoch %d/%d: %s",
        phase.name,
        phase.round_index,
        epoch + 1,
        phase.epochs,
        ", ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float) and k not in ("lr",)),
    )
    return row
