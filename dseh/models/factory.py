"""Networks built from a config or read back from a step's model file: LabNet, and ImgNet with its
backbone (pretrained weights from a local path or an s3:// URI)."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

from dseh.artifacts import StepModel, load_step_model
from dseh.config import Config, LabNetConfig
from dseh.models.backbones import create_backbone
from dseh.models.nets import ImgNet, LabNet
from dseh.storage import local_copy


def build_labnet(n_classes: int, bits: int, cfg: LabNetConfig) -> LabNet:
    return LabNet(n_classes, bits, cfg.hidden, cfg.lrn)


def build_imgnet(cfg: Config, image_size: int, init: str = "release") -> ImgNet:
    """ImgNet for cfg; pretrained weights from a local path or an s3:// URI (downloaded first); the
    new layers start from `init` (dseh.train.recipe.INITS: the method's own)."""
    weights = cfg.imgnet.weights
    with local_copy(weights, cfg.data.s3_timeout_s, cfg.data.s3_retries) if weights else nullcontext("") as w:
        backbone = create_backbone(cfg.imgnet.backbone, w, image_size, cfg.imgnet.dropout)
    return ImgNet(backbone, cfg.bits, cfg.imgnet.hash_from, init)


def load_labnet(path: str | Path) -> tuple[LabNet, StepModel]:
    """A LabNet step output as a model (and its model file's record)."""
    state = load_step_model(path, "labnet")
    model = build_labnet(state.n_classes, state.bits, state.config.labnet)
    model.load_state_dict(state.state_dict)
    return model, state


def load_imgnet(path: str | Path, weights: str | None = None) -> tuple[ImgNet, StepModel]:
    """An ImgNet step output as a model in eval mode. CNN-F needs its .mat (the recorded
    imgnet.weights, local or s3://, or `weights`) to rebuild the layer shapes."""
    state = load_step_model(path, "imgnet")
    cfg = state.config
    if weights is not None:
        cfg = dataclasses.replace(cfg, imgnet=dataclasses.replace(cfg.imgnet, weights=weights))
    model = build_imgnet(cfg, state.image_size)
    model.load_state_dict(state.state_dict)
    model.eval()
    return model, state
