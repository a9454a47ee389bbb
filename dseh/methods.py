"""The hashing methods, one registry entry each: what a method needs (a LabNet, its previous round's
codes), how it trains (an objective and its own recipe for the one training loop: dseh, dpsh,
hashnet) or fits (a linear hash on features: itq, lsh), and the params sections of the deep baselines
(their loss settings and reference recipes). Adding a method is adding an entry here; config
validation, the CLI, the comparison and the tests loop over METHODS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from dseh import baselines, losses
from dseh.train.device import all_gather_rows, global_batch, write_rows
from dseh.train.recipe import Recipe

if TYPE_CHECKING:
    from dseh.config import Config


@dataclass(frozen=True)
class DpshConfig:
    """method=dpsh: DPSH's quantisation weight and its reference recipe (DPSH's PyTorch code)."""

    eta: float = 0.1  # quantisation weight (on the normalised loss)
    optimizer: str = "sgd"
    lr_exp: float = 1.3  # lr 0.05
    step_exp: float = 0.0  # constant
    momentum: float = 0.0
    weight_decay: float = 1e-5
    init: str = "default"  # the hash layers start from torch's default init, as in DPSH's code


@dataclass(frozen=True)
class HashNetConfig:
    """method=hashnet: HashNet's loss and continuation settings and its reference recipe (HashNet's
    PyTorch code: SGD, momentum 0.9, weight decay 5e-4, new layers at 10 x 3e-4; its Nesterov step
    is plain momentum here)."""

    alpha_bits: float = 10.0  # logit scale alpha = this / bits (HashNet's code: 10 / bits)
    step_size: int = 200  # continuation: beta = (1 + gamma * step) ^ power, raised every step_size steps
    gamma: float = 0.005
    power: float = 0.5
    optimizer: str = "sgd"
    lr_exp: float = 2.5  # lr 3e-3 (its new layers' rate)
    step_exp: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    init: str = "default"


# (batch item indices on the device, f^v, u, global step) -> {'loss': total, term: value}
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]]


@dataclass
class ObjectiveInputs:
    """What a deep method's objective may draw on; the step fills what the method's entry asks for."""

    cfg: Config
    labels: torch.Tensor  # label vectors of the training items, on the device
    device: torch.device
    labnet_targets: tuple[torch.Tensor, torch.Tensor] | None = None  # (B^l, F^l) of the round's LabNet
    prev_codes: torch.Tensor | None = None  # the previous round's sign(u) over the training items


# an objective and the all-training-set buffers it updates (checkpointed with the model)
Built = tuple[Objective, dict[str, torch.Tensor]]


def dseh_objective(inp: ObjectiveInputs) -> Built:
    """DSEH's L_Img = gamma_if L_f + eta L_h against LabNet's fixed targets (B^l, F^l)."""
    cfg = inp.cfg.imgnet
    Y = inp.labels.float()
    B_lab, F_lab = inp.labnet_targets

    def objective(t: torch.Tensor, f: torch.Tensor, u: torch.Tensor, _step: int) -> dict[str, torch.Tensor]:
        S = losses.similarity(Y, Y[t])
        lf = losses.semantic_supervision_lf(F_lab, f, S, cfg.sim_scale, cfg.logit_scale)
        lh = losses.code_loss_lh(u, B_lab[t], cfg.code_scale, cfg.code_target)
        return {"loss": cfg.gamma_if * lf + cfg.eta * lh, "L_f": lf.detach(), "L_h": lh.detach()}

    return objective, {}


def dpsh_objective(inp: ObjectiveInputs) -> Built:
    """DPSH: all training items (buffer U of their latest u: zeros at first, the previous round's
    sign(u) after) x the batch, as in DPSH's own code."""
    Y = inp.labels.float()
    U = inp.prev_codes if inp.prev_codes is not None else torch.zeros(len(Y), inp.cfg.bits)
    U_buf = U.float().to(inp.device)
    eta = inp.cfg.dpsh.eta

    def objective(t: torch.Tensor, _f: torch.Tensor, u: torch.Tensor, _step: int) -> dict[str, torch.Tensor]:
        write_rows(U_buf, t, u)
        return {"loss": baselines.dpsh_loss(U_buf, u, losses.similarity(Y, Y[t]), eta)}

    return objective, {"U": U_buf}


def hashnet_objective(inp: ObjectiveInputs) -> Built:
    """HashNet: batch x batch pairs (as in HashNet's code), h = tanh(beta u) with beta raised by the
    continuation schedule on the global step, alpha = alpha_bits / bits."""
    cfg = inp.cfg.hashnet
    Y = inp.labels.float()
    alpha = cfg.alpha_bits / inp.cfg.bits

    def objective(t: torch.Tensor, _f: torch.Tensor, u: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        # under DDP: this rank's rows against the whole global batch, the pairs a single process sees
        y_all, u_all = Y[all_gather_rows(t)], global_batch(u)
        beta = baselines.hashnet_beta(step, cfg.step_size, cfg.gamma, cfg.power)
        loss = baselines.hashnet_loss(u_all, u, losses.similarity(y_all, Y[t]), beta, alpha)
        return {"loss": loss, "beta": torch.tensor(beta)}

    return objective, {}


def dseh_recipe(cfg: Config) -> tuple[Recipe, str]:
    """DSEH's ImgNet recipe (imgnet.lr_exp, train.*) and the release's init of the new layers."""
    t = cfg.train
    return Recipe(t.optimizer, cfg.imgnet.lr_exp, t.step_exp, t.step_epochs, t.momentum), "release"


def labnet_recipe(cfg: Config) -> Recipe:
    """LabNet's recipe (labnet.lr_exp, train.*), whichever method trains the images."""
    t = cfg.train
    return Recipe(t.optimizer, cfg.labnet.lr_exp, t.step_exp, t.step_epochs, t.momentum)


def own_recipe(section: str) -> Callable[[Config], tuple[Recipe, str]]:
    """A baseline's recipe and init from its own params section (`dpsh`, `hashnet`)."""

    def read(cfg: Config) -> tuple[Recipe, str]:
        s = getattr(cfg, section)
        rec = Recipe(s.optimizer, s.lr_exp, s.step_exp, cfg.train.step_epochs, s.momentum, s.weight_decay)
        return rec, s.init

    return read


def _itq(x: np.ndarray, bits: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    proj, mean, _ = baselines.itq(x, bits, seed)
    return proj, mean


@dataclass(frozen=True)
class Method:
    """One hashing method."""

    name: str
    label: str  # its row name in tables
    needs_labnet: bool = False  # trained against the round's LabNet (its targets)
    uses_prev_codes: bool = False  # a round r > 0 starts its buffer from round r - 1's codes
    objective: Callable[[ObjectiveInputs], Built] | None = None  # deep: trained in the one loop
    recipe: Callable[[Config], tuple[Recipe, str]] | None = None  # deep: (how it is optimised, init)
    fit: Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray]] | None = None  # linear: (x, bits, seed)

    @property
    def deep(self) -> bool:
        return self.objective is not None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dseh", "DSEH", needs_labnet=True, objective=dseh_objective, recipe=dseh_recipe),
        Method("dpsh", "DPSH", uses_prev_codes=True, objective=dpsh_objective, recipe=own_recipe("dpsh")),
        Method("hashnet", "HashNet", objective=hashnet_objective, recipe=own_recipe("hashnet")),
        Method("itq", "ITQ", fit=_itq),
        Method("lsh", "LSH", fit=baselines.lsh),
    )
}
DEEP_METHODS = tuple(n for n, m in METHODS.items() if m.deep)
LINEAR_METHODS = tuple(n for n, m in METHODS.items() if not m.deep)


def get(name: str) -> Method:
    """The registry entry of `name` (config validation has already refused unknown names)."""
    return METHODS[name]
