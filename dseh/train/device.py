"""Where and how training computes: the device, the data-parallel group under torchrun (DDP: NCCL
on CUDA, gloo on CPU) and its collective helpers, the compute dtype, and determinism."""

from __future__ import annotations

import datetime
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dseh.errors import DsehError

log = logging.getLogger(__name__)


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; 'cuda' without a GPU is an error (naming the
    params `key`). Under torchrun, 'auto' and 'cuda' mean this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DsehError(f"params key '{key}': '{name}' is not a device (auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DsehError(f"params key '{key}' is '{name}' but no CUDA device is available")
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


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


def secondary_rank() -> bool:
    """Started by torchrun as a rank other than 0 (which alone writes a step's output)."""
    return int(os.environ.get("RANK", "0")) > 0


def init_distributed(device_name: str, timeout_s: float = 600.0) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on
    the CPU. A no-op in a single process or when the group already exists."""
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


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over every rank, in place (x itself in one process)."""
    import torch.distributed as dist

    if dist_info().enabled:
        dist.all_reduce(x)
    return x


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


def wrap_parallel(model: nn.Module, info: Dist) -> nn.Module:
    """The model under DDP when data-parallel, else itself."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU that supports it, or a CPU with AMX or
    AVX512-BF16 (elsewhere bf16 would be emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # an older or non-x86 build
        return False


def compute_dtype(device: torch.device, amp: bool) -> str:
    """The dtype ImgNet's forward pass computes in: 'bf16' when train.amp is on and the device
    computes bf16 natively, else 'fp32'. Results depend on it, so fingerprints and summaries hold it."""
    return "bf16" if amp and native_bf16(device) else "fp32"


def autocast(device: torch.device, amp: bool):
    """bf16 autocast where compute_dtype says so, else nothing."""
    if compute_dtype(device, amp) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def set_determinism(seed: int, threads: int) -> None:
    """Seed every generator; deterministic kernels where PyTorch offers them."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    if threads > 0:
        torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
