"""The one image encoder: uint8 image rows -> a network's outputs, in batches, in eval mode, no
augmentation, always in float32. Training's stored codes, `dseh evaluate --encode`, `dseh search`,
the registered pyfunc model and the ITQ/LSH backbone features all go through it, so the same image
gives the same code everywhere."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dseh.train.feed import gather_images


@torch.no_grad()
def encode(
    fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
    images: np.ndarray,
    batch: int,
    device: torch.device | str = "cpu",
    items: np.ndarray | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, ...]:
    """fn's outputs (one array per output, float32) for the rows `items` of `images` (N, H, W, 3)
    uint8, a memory map or an array (every row when `items` is None). fn takes a uint8 batch on
    `device`; a module passed as fn is put in eval mode. Float32 whatever train.amp says: the
    stored database codes then equal those the served model (float32 on any machine) gives."""
    from tqdm import tqdm

    if isinstance(fn, torch.nn.Module):
        fn.eval()
    items = np.arange(len(images)) if items is None else np.asarray(items)
    parts: list[list[np.ndarray]] = []
    for s in tqdm(range(0, len(items), batch), desc="encode", leave=False, disable=not progress):
        out = fn(gather_images(images, items[s : s + batch]).to(device))
        outs = out if isinstance(out, tuple) else (out,)
        parts.append([o.float().cpu().numpy() for o in outs])
    if not parts:
        return ()
    return tuple(np.concatenate(cols) for cols in zip(*parts))


def encode_images(
    model: torch.nn.Module,
    images: np.ndarray,
    items: np.ndarray | None,
    batch: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(f^v (n, FEATURE_DIM), u (n, bits)) of an ImgNet for the given rows."""
    f, u = encode(model, images, batch, device, items, progress)
    return f, u


def backbone_features(backbone: torch.nn.Module, images: np.ndarray, batch: int) -> np.ndarray:
    """float64 backbone features of every row (ITQ/LSH inputs)."""
    backbone.eval()
    (feats,) = encode(lambda x: backbone(backbone.preprocess(x)), images, batch)
    return feats.astype(np.float64)
