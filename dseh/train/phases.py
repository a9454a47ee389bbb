"""The two phases that plug into the training loop: LabNet on label vectors (L_Lab = J1..J4) and
the image network on memory-mapped images, whose loss is the method's objective (dseh.methods)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import nn

from dseh import losses
from dseh.config import ImgNetConfig, LabNetConfig, TrainConfig
from dseh.methods import Objective
from dseh.models.nets import ImgNet, LabNet
from dseh.train.device import autocast, write_rows
from dseh.train.feed import gather_images, mirror, translate
from dseh.train.loop import Phase
from dseh.train.recipe import Recipe


def labnet_phase(
    model: LabNet,
    optimizer: torch.optim.Optimizer,
    labels: torch.Tensor,
    F_buf: torch.Tensor,
    H_buf: torch.Tensor,
    cfg: LabNetConfig,
    recipe: Recipe,
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

    schedule = functools.partial(recipe.lr, round_index=round_index)
    return Phase("labnet", round_index, model, optimizer, len(Y), cfg.batch_size, epochs, schedule, [1.0],
                 lambda idx, e, b: None, step, {"F": F_buf, "H": H_buf}, seed, cfg.clip_value)  # fmt: skip


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
    recipe: Recipe,
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

    @functools.lru_cache(maxsize=2)
    def offsets(epoch: int) -> np.ndarray:
        # (dy, dx) per training item and epoch, from a stream of its own (flips stay as without shifts)
        rng = np.random.default_rng([seed, round_index, epoch, 1])
        return rng.integers(-cfg.shift, cfg.shift + 1, (len(train_items), 2))

    def fetch(idx: np.ndarray, epoch: int, b: int) -> tuple:
        flip = torch.from_numpy(flips(epoch)[idx]) if cfg.flip else None
        if flip is not None and pin:
            flip = flip.pin_memory()
        shift = torch.from_numpy(offsets(epoch)[idx]) if cfg.shift else None
        return gather_images(images, train_items[idx], pin), flip, shift, step_offset + epoch * per_epoch + b

    def step(net: nn.Module, idx: np.ndarray, batch: tuple) -> dict[str, torch.Tensor]:
        x, flip, shift, global_step = batch
        t = torch.from_numpy(idx).to(device)
        x = x.to(device, non_blocking=True)
        if flip is not None:
            x = mirror(x, flip.to(device, non_blocking=True))
        if shift is not None:
            x = translate(x, shift.to(device), cfg.shift)
        with autocast(device, train_cfg.amp):
            f, u = net(x)
        return objective(t, f.float(), u.float(), global_step)

    schedule = functools.partial(recipe.lr, round_index=round_index)
    return Phase("imgnet", round_index, model, optimizer, len(train_items), cfg.batch_size, epochs, schedule,
                 lr_mults, fetch, step, buffers or {}, seed, cfg.clip_value)  # fmt: skip
