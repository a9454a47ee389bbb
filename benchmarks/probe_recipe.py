"""How a deep baseline's codes form under a recipe: train the image network of `method` (dpsh or
hashnet) on a prepared dataset's training split and report, at initialisation and after training,
the mAP@ALL of the query split ranked against the training items, the distinct codes and constant
bits over the training items, and the scale of u (mean |u|) against its spread across items (mean
per-bit standard deviation). The runs behind docs/results.md#dpsh-collapse-diagnosis:

    .venv/bin/dseh prepare -S data.source=fashion-mnist -S tracking.enabled=false --out outputs-fashion/fashion-mnist/data
    .venv/bin/python benchmarks/probe_recipe.py outputs-fashion/fashion-mnist/data -S method=dpsh
    .venv/bin/python benchmarks/probe_recipe.py outputs-fashion/fashion-mnist/data -S method=dpsh -S dpsh.init=release

Without the full database encode, a 10-epoch probe takes about 2.5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from dseh import methods
from dseh.codes import collapse, pack, sign
from dseh.config import load_config
from dseh.data import PreparedData
from dseh.encoder import encode_images
from dseh.errors import DsehError
from dseh.evaluation import mean_average_precision
from dseh.models.factory import build_imgnet
from dseh.train import device as devices
from dseh.train import loop, phases
from dseh.train.recipe import make_optimizer


def code_state(model, data: PreparedData, bits: int) -> dict:
    """Query-vs-training mAP@ALL and the code statistics over the training items."""
    _, uq = encode_images(model, data.images, data.query, 512)
    _, ut = encode_images(model, data.images, data.train, 512)
    state = collapse(pack(ut), bits, 16)
    return {
        "map_query_vs_train": round(
            mean_average_precision(sign(uq), sign(ut), data.labels[data.query], data.labels[data.train]), 4
        ),
        "distinct_codes": state["distinct_codes"],
        "constant_bits": state["constant_bits"],
        "mean_abs_u": round(float(np.abs(ut).mean()), 3),
        "spread_u": round(float(ut.std(axis=0).mean()), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="probe_recipe.py"
    )
    ap.add_argument("data", help="a prepared dataset (dseh prepare --out ...)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    cfg = load_config(args.params, [*args.set, "tracking.enabled=false"])
    method = methods.get(cfg.method)
    if not method.deep or method.needs_labnet:
        raise DsehError(
            f"probe_recipe trains a deep baseline without a LabNet ({', '.join(m for m in methods.DEEP_METHODS if not methods.get(m).needs_labnet)}), not {cfg.method}"
        )
    data = PreparedData(args.data)
    devices.set_determinism(cfg.seed, cfg.train.threads)
    recipe, init = method.recipe(cfg)
    model = build_imgnet(cfg, int(data.images.shape[1]), init)
    groups, mults = phases.imgnet_param_groups(model, recipe.lr(0, 0), cfg.imgnet.backbone_lr_mult)
    optimizer = make_optimizer(groups, recipe)
    labels = torch.from_numpy(data.labels[data.train])
    objective, buffers = method.objective(methods.ObjectiveInputs(cfg=cfg, labels=labels, device=torch.device("cpu")))
    before = code_state(model, data, cfg.bits)
    t0 = time.perf_counter()
    phase = phases.imgnet_phase(
        model, optimizer, mults, data.images, data.train, objective, cfg.imgnet, cfg.train, 0, args.epochs,
        cfg.seed, torch.device("cpu"), recipe, 0, buffers,
    )  # fmt: skip
    history = loop.run_phase(phase, cfg.train, None, "probe", progress=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "overrides": args.set, "recipe": recipe.__dict__, "init": init, "epochs": args.epochs,
        "train_seconds": round(seconds, 1), "loss_by_epoch": [round(h["loss"], 4) for h in history],
        "at_init": before, "trained": code_state(model, data, cfg.bits),
    }))  # fmt: skip


if __name__ == "__main__":
    try:
        main()
    except DsehError as exc:  # one line, as the dseh command prints it
        print(f"probe_recipe.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
