"""Run under torchrun by tests/test_ddp.py (or alone for the single-process reference): trains
LabNet and a DPSH ImgNet phase through loop.run_phase on fixed synthetic data and saves, per
rank, the all-training-set buffers and the final parameters to OUT/rank<R>.pt."""

import sys
from pathlib import Path

import numpy as np
import torch

from dseh import methods
from dseh.config import from_dict
from dseh.models.backbones import SmallCNN
from dseh.models.factory import build_labnet
from dseh.models.nets import ImgNet
from dseh.train import device as devices
from dseh.train import loop, phases
from dseh.train.recipe import make_optimizer


def main(out: Path) -> None:
    info = devices.init_distributed("cpu")
    cfg = from_dict(
        {
            "bits": 16,
            "labnet": {"hidden": 64, "batch_size": 16, "epochs": [2]},
            "imgnet": {"batch_size": 16, "epochs": [2]},
            "train": {"threads": 1, "loader_workers": 1},
        }
    )
    devices.set_determinism(0, 1)
    rng = np.random.default_rng(0)
    n = 90  # not a multiple of the global batch: the last batch is short and padded across ranks
    labels = torch.from_numpy((rng.random((n, 6)) < 0.3).astype(np.float32))
    images = rng.integers(0, 255, (n, 12, 12, 3), dtype=np.uint8)

    lab = build_labnet(6, cfg.bits, cfg.labnet)
    F_buf, H_buf = torch.zeros(n, 512), torch.zeros(n, cfg.bits)
    labnet_recipe = methods.labnet_recipe(cfg)
    opt = make_optimizer([{"params": list(lab.parameters()), "lr": 1e-3}], labnet_recipe)
    phase = phases.labnet_phase(lab, opt, labels, F_buf, H_buf, cfg.labnet, labnet_recipe, 0, 2, seed=3)
    lab_hist = loop.run_phase(phase, cfg.train, None, "ddp-test", progress=False)

    img = ImgNet(SmallCNN(12, dropout=0.0), cfg.bits)
    groups, mults = phases.imgnet_param_groups(img, 1e-3, 1.0)
    recipe, _ = methods.get("dpsh").recipe(cfg)
    opt = make_optimizer(groups, recipe)
    inputs = methods.ObjectiveInputs(cfg=cfg, labels=labels, device=torch.device("cpu"))
    objective, buffers = methods.get("dpsh").objective(inputs)
    U = buffers["U"]
    phase = phases.imgnet_phase(
        img, opt, mults, images, np.arange(n), objective, cfg.imgnet, cfg.train, 0, 2, 5, torch.device("cpu"),
        recipe, buffers=buffers,
    )  # fmt: skip
    img_hist = loop.run_phase(phase, cfg.train, None, "ddp-test", progress=False)
    torch.save(
        {
            "world": info.world,
            "F": F_buf,
            "H": H_buf,
            "U": U,
            "labnet": torch.cat([p.detach().flatten() for p in lab.parameters()]),
            "imgnet": torch.cat([p.detach().flatten() for p in img.parameters()]),
            "loss": [lab_hist[-1]["loss"], img_hist[-1]["loss"]],
        },
        out / f"rank{info.rank}.pt",
    )


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    finally:
        devices.leave_distributed()
