"""The image-network step of a linear method (ITQ, LSH; dseh.methods): features of every item (a
pretrained backbone's output or raw pixels), the hash fitted on the training items, the packed
codes of every item, written like an ImgNet step's output."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from dseh import artifacts, methods
from dseh.artifacts import save_step_model
from dseh.baselines import project
from dseh.codes import count_distinct, pack, unpack
from dseh.config import Config
from dseh.data import PreparedData
from dseh.encoder import backbone_features
from dseh.errors import DsehError
from dseh.models.factory import build_imgnet
from dseh.storage import atomic_dir

log = logging.getLogger(__name__)


def image_features(cfg: Config, data: PreparedData, backbone: torch.nn.Module | None) -> np.ndarray:
    """float64 features of every prepared item: a backbone's output, or the raw pixels (refused
    when they would not fit in memory)."""
    if backbone is not None:
        return backbone_features(backbone, data.images, cfg.imgnet.encode_batch_size)
    size = data.images.size * 8
    if size > 4 * 2**30:
        raise DsehError(
            f"raw-pixel features of {data.root} would take {size / 2**30:.0f} GiB; "
            "use pretrained backbone features (imgnet.weights, baseline.features=backbone)"
        )
    return np.asarray(data.images, dtype=np.float64).reshape(len(data.labels), -1)


def linear_codes(method: str, x_all: np.ndarray, fit_items: np.ndarray, bits: int, seed: int) -> tuple:
    """Fit a linear method on the rows `fit_items` of `x_all`; (packed codes of every row, projection, mean)."""
    proj, mean = methods.get(method).fit(x_all[fit_items], bits, seed)
    return pack(project(x_all, proj, mean)), proj, mean


def fit_linear_hash(cfg: Config, data: PreparedData, round_index: int, out_dir: str | Path) -> dict:
    """Fit cfg.method on the training items' features (baseline.features: the pretrained backbone's
    output, or raw pixels), encode every item, write the step output like ImgNet's."""
    use_backbone = cfg.baseline.features == "backbone" or (cfg.baseline.features == "auto" and bool(cfg.imgnet.weights))
    t0 = time.perf_counter()
    backbone = build_imgnet(cfg, int(data.images.shape[1])).backbone if use_backbone else None
    codes, proj, mean = linear_codes(cfg.method, image_features(cfg, data, backbone), data.train, cfg.bits, cfg.seed)
    features = f"{cfg.imgnet.backbone}-backbone" if use_backbone else "pixels"
    summary = {
        "round": round_index,
        "method": cfg.method,
        "features": features,
        "seconds": round(time.perf_counter() - t0, 3),
        "distinct_codes_database": count_distinct(codes[data.database]),
    }
    with atomic_dir(out_dir) as tmp:
        tensors = {"projection": torch.from_numpy(proj), "mean": torch.from_numpy(mean)}
        save_step_model(
            tmp, "linear-hash", cfg, tensors, round_index=round_index, dataset_sha256=data.sha256,
            n_classes=data.n_classes, features=features,
        )  # fmt: skip
        artifacts.save_codes(tmp, codes)
        artifacts.save_train_outputs(tmp, unpack(codes[data.train], cfg.bits))
        artifacts.write_step_dir(tmp, cfg, summary)
    log.info("%s on %s: %d distinct database codes", cfg.method, features, summary["distinct_codes_database"])
    return summary
