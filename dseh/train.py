"""The one training loop (epochs, schedule, clipping, checkpoints, resume, NaN guard) and the two
DSEH phases that plug into it: LabNet on label vectors and ImgNet on memory-mapped images, whose
objective is DSEH's or a deep baseline's (DPSH, HashNet).

The loop runs in one process or data-parallel under torchrun (DDP: NCCL on CUDA, gloo on CPU):
every rank draws the same permutation and takes its share of each global batch, the
all-training-set buffers receive every rank's batch rows, and only rank 0 writes.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dseh import baselines, losses
from dseh.config import BaselineConfig, ImgNetConfig, LabNetConfig, TrainConfig
from dseh.errors import DsehError
from dseh.models.nets import ImgNet, LabNet
from dseh.storage import atomic_file

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU; 'cuda' without a GPU is an error. Under
    torchrun, 'auto' and 'cuda' mean this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DsehError(f"params key 'train.device' is '{name}' but no CUDA device is available")
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


# --------------------------------------------------------------------------- data parallel


@dataclass(frozen=True)
class Dist:
    """This process's place in the data-parallel group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def dist_info() -> Dist:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def init_distributed(device_name: str, timeout_s: float = 600.0) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on
    the CPU. A no-op in a single process or when the group already exists."""
    import datetime

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist_info()
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    except Exception as exc:  # a rendezvous that never completes, a wrong MASTER_ADDR
        raise DsehError(f"could not join the torchrun process group: {exc}") from exc
    info = dist_info()
    log.info("data-parallel rank %d of %d on %s", info.rank, info.world, device)
    return info


def leave_distributed() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The concatenation in rank order of every rank's equally long `x` (x itself in one process).
    The result carries no gradient."""
    import torch.distributed as dist

    info = dist_info()
    if not info.enabled:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(info.world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def write_rows(buf: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> None:
    """buf[t] = rows for the batch rows of every rank, so all-training-set buffers stay identical."""
    buf[all_gather_rows(t)] = all_gather_rows(rows).to(buf.dtype)


def global_batch(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of a batch tensor with this rank's own rows (and their gradient) in place:
    the whole global batch, as a single process would see it."""
    info = dist_info()
    if not info.enabled:
        return x
    parts = list(all_gather_rows(x).chunk(info.world))
    parts[info.rank] = x
    return torch.cat(parts)


def rank_batches(perm: np.ndarray, batch_size: int, info: Dist) -> list[np.ndarray]:
    """This rank's share of each global batch of `perm`: rank r takes positions r, r + N, ... of
    every batch, which is what DistributedSampler's interleaving gives with the same permutation.
    With N ranks the permutation is padded by wrapping so that every rank gets equally many rows."""
    if info.world > 1:
        if batch_size % info.world:
            raise DsehError(f"batch size {batch_size} is not divisible by the {info.world} data-parallel ranks")
        pad = -len(perm) % info.world
        perm = np.concatenate([perm, perm[:pad]])
    return [perm[s : s + batch_size][info.rank :: info.world] for s in range(0, len(perm), batch_size)]


def _wrap_parallel(model: nn.Module, info: Dist) -> nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)


def lr_for_epoch(lr_exp: float, step_exp: float, step_epochs: int, epoch: int, round_index: int) -> float:
    """lr = 10^-(lr_exp + step_exp * (floor(epoch / step_epochs) + round)) (the release's schedule)."""
    return 10.0 ** -(lr_exp + step_exp * (epoch // step_epochs + round_index))


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=cfg.momentum)
    # the fused kernel (one pass over every tensor), on the CPU too: LabNet's steps are about 25% faster
    return torch.optim.Adam(groups, lr=groups[0]["lr"], fused=True)


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


def _save_atomic(obj: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


GPU_SYNC_EVERY = 32  # steps between the loop's host syncs (NaN guard, progress) on a GPU


def _raise_if_not_finite(phase: Phase, terms: dict[str, torch.Tensor], epoch: int, checkpoint: Path | None) -> None:
    """The NaN guard: one clear error naming the first non-finite loss term; nothing is saved."""
    if bool(torch.isfinite(terms["loss"])):
        return
    bad = next((k for k, v in terms.items() if k != "loss" and not torch.isfinite(v)), "loss")
    kept = f"; the last good checkpoint is kept at {checkpoint}" if checkpoint and checkpoint.exists() else ""
    raise DsehError(
        f"{phase.name} round {phase.round_index}: loss term '{bad}' became {float(terms[bad])} at epoch {epoch + 1}{kept}"
    )


def loader_threads(cfg: TrainConfig, device: torch.device) -> int:
    """Batch-gathering threads: train.loader_workers, or for 0 two on the CPU (the step, not the
    gather, is the bottleneck there) and on a GPU this process's share of the node's cores, 2 to 8
    (one thread gathered 25,000 to 36,000 224x224 images/s from the page cache on a 2-core EPYC,
    benchmarks/bench_train.py --mode feed)."""
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


def run_phase(
    phase: Phase, cfg: TrainConfig, checkpoint: Path | None, fingerprint: str, progress: bool = True
) -> list[dict]:
    """Train `phase` for its epochs; returns the per-epoch history.

    After every epoch the model, optimiser, buffers, sampler generator and every RNG state go to
    `checkpoint`, so a killed run started again with the same fingerprint resumes from the last
    completed epoch and ends with the same weights as an uninterrupted run.

    Under torchrun every rank runs this with the same seed; gradients are averaged by DDP, the
    per-epoch loss sums over all ranks, and only rank 0 writes the checkpoint and shows progress.
    """
    from tqdm import tqdm

    info = dist_info()
    net = _wrap_parallel(phase.model, info)
    if cfg.compile:  # the step calls the compiled module; phase.model keeps its plain state_dict keys
        net = torch.compile(net)
    gen = torch.Generator().manual_seed(phase.seed)
    history: list[dict] = []
    start_epoch = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state.get("fingerprint") == fingerprint:
            phase.model.load_state_dict(state["model"])
            phase.optimizer.load_state_dict(state["optimizer"])
            for k, v in state["buffers"].items():
                phase.buffers[k].copy_(v)
            gen.set_state(state["generator"])
            _set_rng_state(state["rng"])
            history = state["history"]
            start_epoch = state["epoch"]
            log.info(
                "%s round %d: resuming after epoch %d from %s", phase.name, phase.round_index, start_epoch, checkpoint
            )
        else:
            log.info("%s: ignoring a checkpoint of another configuration at %s", phase.name, checkpoint)
    params = [p for p in phase.model.parameters() if p.requires_grad]
    device = params[0].device
    on_gpu = device.type == "cuda"
    workers = loader_threads(cfg, device)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for epoch in range(start_epoch, phase.epochs):
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
                # a host sync: before every step on the CPU, every GPU_SYNC_EVERY steps on a GPU (so
                # the GPU never waits for Python between steps); the epoch's sums are checked too
                if not on_gpu or (i + 1) % GPU_SYNC_EVERY == 0:
                    _raise_if_not_finite(phase, terms, epoch, checkpoint)
                    bar.set_postfix(loss=f"{float(terms['loss'].detach()):.4f}")
                phase.optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                if cfg.clip_value > 0:
                    torch.nn.utils.clip_grad_value_(params, cfg.clip_value)
                phase.optimizer.step()
                for k, v in terms.items():
                    acc[k] = acc.get(k, 0.0) + v.detach().double() * len(idx)
                bar.update(1)
            bar.close()
            keys = sorted(acc)
            total = torch.stack([torch.as_tensor(acc[k], device=device) for k in keys])
            if info.enabled:  # the epoch's loss over every rank's items
                import torch.distributed as dist

                dist.all_reduce(total)
                n_seen = sum(len(b) for b in batches) * info.world
            else:
                n_seen = phase.n_items
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
            history.append(row)
            log.info(
                "%s round %d epoch %d/%d: %s",
                phase.name,
                phase.round_index,
                epoch + 1,
                phase.epochs,
                ", ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float) and k not in ("lr",)),
            )
            if checkpoint is not None and info.main:
                _save_atomic(
                    {
                        "fingerprint": fingerprint,
                        "epoch": epoch + 1,
                        "model": phase.model.state_dict(),
                        "optimizer": phase.optimizer.state_dict(),
                        "buffers": {k: v.cpu() for k, v in phase.buffers.items()},
                        "generator": gen.get_state(),
                        "rng": _rng_state(),
                        "history": history,
                    },
                    checkpoint,
                )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return history


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU that supports it, or a CPU with AMX or
    AVX512-BF16 (elsewhere bf16 would be emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # an older or non-x86 build
        return False


def precision(device: torch.device, amp: bool) -> str:
    """'bf16' when train.amp is on and the device computes bf16 natively, else 'fp32'."""
    return "bf16" if amp and native_bf16(device) else "fp32"


def _autocast(device: torch.device, amp: bool):
    if precision(device, amp) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------- LabNet


def build_labnet(n_classes: int, bits: int, cfg: LabNetConfig) -> LabNet:
    return LabNet(n_classes, bits, cfg.hidden, cfg.lrn)


def labnet_phase(
    model: LabNet,
    optimizer: torch.optim.Optimizer,
    labels: torch.Tensor,
    F_buf: torch.Tensor,
    H_buf: torch.Tensor,
    cfg: LabNetConfig,
    train_cfg: TrainConfig,
    round_index: int,
    epochs: int,
    seed: int,
) -> Phase:
    """LabNet's step: batch labels -> (f, h, logits); buffers take the batch rows (detached);
    L_Lab = gamma_pf J1 + gamma_ph J2 + beta J3 + gamma_hl J4."""
    Y = labels.float()

    def step(net: nn.Module, idx: np.ndarray, _batch: Any) -> dict[str, torch.Tensor]:
        t = torch.from_numpy(idx).to(Y.device)
        y = Y[t]
        f, h, logits = net(y)
        write_rows(F_buf, t, f)
        write_rows(H_buf, t, h)
        S = losses.similarity(Y, y)
        j1 = losses.semantic_loss_j1(F_buf, f, S, cfg.sim_scale, cfg.logit_scale)
        j2 = losses.hamming_loss_j2(H_buf, h, S, cfg.sim_scale, cfg.logit_scale)
        j3 = losses.quantization_loss_j3(h, cfg.quant_reduction)
        j4 = losses.label_loss_j4(y, logits, cfg.label_head)
        total = cfg.gamma_pf * j1 + cfg.gamma_ph * j2 + cfg.beta * j3 + cfg.gamma_hl * j4
        return {"loss": total, "J1": j1.detach(), "J2": j2.detach(), "J3": j3.detach(), "J4": j4.detach()}

    return Phase(
        name="labnet",
        round_index=round_index,
        model=model,
        optimizer=optimizer,
        n_items=len(Y),
        batch_size=cfg.batch_size,
        epochs=epochs,
        base_lr=lambda e: lr_for_epoch(cfg.lr_exp, train_cfg.step_exp, train_cfg.step_epochs, e, round_index),
        lr_mults=[1.0],
        fetch=lambda idx, e, b: None,
        step=step,
        buffers={"F": F_buf, "H": H_buf},
        seed=seed,
    )


@torch.no_grad()
def encode_labels(model: LabNet, labels: torch.Tensor, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(F^l, H^l) for label vectors, in eval mode."""
    model.eval()
    fs, hs = [], []
    for s in range(0, len(labels), batch):
        f, h, _ = model(labels[s : s + batch].float())
        fs.append(f)
        hs.append(h)
    return torch.cat(fs), torch.cat(hs)


# --------------------------------------------------------------------------- ImgNet


def imgnet_param_groups(model: ImgNet, base_lr: float, mult: float) -> tuple[list[dict], list[float]]:
    """New layers at the base lr; a pretrained backbone at mult x (1x when trained from scratch)."""
    m = mult if model.backbone.pretrained else 1.0
    groups = [
        {"params": model.new_parameters(), "lr": base_lr},
        {"params": list(model.backbone.parameters()), "lr": base_lr * m},
    ]
    return groups, [1.0, m]


def place_model(model: ImgNet, device: torch.device, cfg: TrainConfig) -> ImgNet:
    """The image network on its device; channels_last when asked, on CUDA only (on a 2-core CPU it
    gave no gain beyond the benchmark's run-to-run noise)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last and device.type == "cuda" else model


def gather_images(images: np.ndarray, items: np.ndarray, pin: bool = False) -> torch.Tensor:
    """uint8 rows `items` of the memory-mapped array as a tensor (in pinned memory with `pin`): rows
    are read in ascending order and each is copied once, straight to its place (about 2x fancy
    indexing at 224x224, which copies twice; slower for tiny rows, where neither is a bottleneck)."""
    out = torch.empty((len(items),) + tuple(images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
    rows = out.numpy()
    for pos in np.argsort(items, kind="stable"):
        rows[pos] = images[items[pos]]
    return out


def mirror(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) images with the rows where `flip` is set mirrored left-right. Done on the
    training device: free on a GPU, where the host's strided flip of 3-byte pixels was the slowest
    part of the data path (benchmarks/bench_train.py --mode feed)."""
    return torch.where(flip[:, None, None, None], x.flip(2), x)


# (batch item indices on the device, f^v, u, global step) -> {'loss': total, term: value}
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]]


def dseh_objective(labels: torch.Tensor, B_lab: torch.Tensor, F_lab: torch.Tensor, cfg: ImgNetConfig) -> Objective:
    """DSEH's L_Img = gamma_if L_f + eta L_h against LabNet's fixed targets (B^l, F^l)."""
    Y = labels.float()

    def objective(t: torch.Tensor, f: torch.Tensor, u: torch.Tensor, _step: int) -> dict[str, torch.Tensor]:
        S = losses.similarity(Y, Y[t])
        lf = losses.semantic_supervision_lf(F_lab, f, S, cfg.sim_scale, cfg.logit_scale)
        lh = losses.code_loss_lh(u, B_lab[t], cfg.code_scale, cfg.code_target)
        return {"loss": cfg.gamma_if * lf + cfg.eta * lh, "L_f": lf.detach(), "L_h": lh.detach()}

    return objective


def dpsh_objective(labels: torch.Tensor, U_buf: torch.Tensor, eta: float) -> Objective:
    """DPSH: all training items (buffer U of their latest u) x the batch, as in DPSH's own code."""
    Y = labels.float()

    def objective(t: torch.Tensor, _f: torch.Tensor, u: torch.Tensor, _step: int) -> dict[str, torch.Tensor]:
        write_rows(U_buf, t, u)
        return {"loss": baselines.dpsh_loss(U_buf, u, losses.similarity(Y, Y[t]), eta)}

    return objective


def hashnet_objective(labels: torch.Tensor, bits: int, cfg: BaselineConfig) -> Objective:
    """HashNet: batch x batch pairs (as in HashNet's code), h = tanh(beta u) with beta raised by the
    continuation schedule on the global step, alpha = hashnet_alpha_bits / bits."""
    Y = labels.float()
    alpha = cfg.hashnet_alpha_bits / bits

    def objective(t: torch.Tensor, _f: torch.Tensor, u: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        # under DDP: this rank's rows against the whole global batch, the pairs a single process sees
        y_all, u_all = Y[all_gather_rows(t)], global_batch(u)
        beta = baselines.hashnet_beta(step, cfg.hashnet_step_size, cfg.hashnet_gamma, cfg.hashnet_power)
        loss = baselines.hashnet_loss(u_all, u, losses.similarity(y_all, Y[t]), beta, alpha)
        return {"loss": loss, "beta": torch.tensor(beta)}

    return objective


def imgnet_phase(
    model: ImgNet,
    optimizer: torch.optim.Optimizer,
    lr_mults: list[float],
    images: np.ndarray,
    train_items: np.ndarray,
    objective: Objective,
    cfg: ImgNetConfig,
    train_cfg: TrainConfig,
    round_index: int,
    epochs: int,
    seed: int,
    device: torch.device,
    step_offset: int = 0,
    buffers: dict[str, torch.Tensor] | None = None,
) -> Phase:
    """The image network's step: memory-mapped uint8 images -> (f^v, u) -> `objective` (DSEH's
    L_Img, or a deep baseline's loss: only the objective differs between methods).
    `step_offset` is the number of steps of earlier rounds (HashNet's continuation counts them)."""
    pin = device.type == "cuda"
    per_epoch = -(-len(train_items) // cfg.batch_size)

    @functools.lru_cache(maxsize=2)
    def flips(epoch: int) -> np.ndarray:
        # per training item and epoch, so a rank's share of a batch is flipped as in one process
        return np.random.default_rng([seed, round_index, epoch]).random(len(train_items)) < 0.5

    def fetch(idx: np.ndarray, epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        flip = torch.from_numpy(flips(epoch)[idx]) if cfg.flip else None
        if flip is not None and pin:
            flip = flip.pin_memory()
        return gather_images(images, train_items[idx], pin), flip, step_offset + epoch * per_epoch + b

    def step(net: nn.Module, idx: np.ndarray, batch: tuple) -> dict[str, torch.Tensor]:
        x, flip, global_step = batch
        t = torch.from_numpy(idx).to(device)
        x = x.to(device, non_blocking=True)
        if flip is not None:
            x = mirror(x, flip.to(device, non_blocking=True))
        with _autocast(device, train_cfg.amp):
            f, u = net(x)
        return objective(t, f.float(), u.float(), global_step)

    return Phase(
        name="imgnet",
        round_index=round_index,
        model=model,
        optimizer=optimizer,
        n_items=len(train_items),
        batch_size=cfg.batch_size,
        epochs=epochs,
        base_lr=lambda e: lr_for_epoch(cfg.lr_exp, train_cfg.step_exp, train_cfg.step_epochs, e, round_index),
        lr_mults=lr_mults,
        fetch=fetch,
        step=step,
        buffers=buffers or {},
        seed=seed,
    )


@torch.no_grad()
def encode_images(
    model: ImgNet,
    images: np.ndarray,
    items: np.ndarray,
    batch: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(f^v float32 (n, 512), u float32 (n, K)) for the given items, eval mode, no augmentation.
    Always in float32, whatever train.amp says: the stored database codes then match the codes
    that the served model (float32 on any machine) gives the same image."""
    from tqdm import tqdm

    model.eval()
    fs, us = [], []
    for s in tqdm(range(0, len(items), batch), desc="encode", leave=False, disable=not progress):
        x = gather_images(images, items[s : s + batch]).to(device)
        f, u = model(x)
        fs.append(f.float().cpu().numpy())
        us.append(u.float().cpu().numpy())
    return np.concatenate(fs), np.concatenate(us)


def set_determinism(seed: int, threads: int) -> None:
    """Seed every generator; deterministic kernels where PyTorch offers them."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    if threads > 0:
        torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def finite_or_raise(name: str, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise DsehError(f"{name} holds non-finite values")
