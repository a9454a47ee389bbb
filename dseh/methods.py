"""The hashing methods, one registry entry each: what a method needs (a LabNet, its previous round's
codes), how it trains (an objective for the one training loop: dseh, dpsh, hashnet) or fits (a
linear hash on features: itq, lsh). Adding a method is
adding an entry here; config validation, the CLI, the comparison and the tests loop over METHODS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from dseh import baselines, losses
from dseh.train.device import all_gather_rows, global_batch, write_rows

if TYPE_CHECKING:
    from dseh.config import Config

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
    eta = inp.cfg.baseline.dpsh_eta

    def objective(t: torch.Tensor, _f: torch.Tensor, u: torch.Tensor, _step: int) -> dict[str, torch.Tensor]:
        write_rows(U_buf, t, u)
        return {"loss": baselines.dpsh_loss(U_buf, u, losses.similarity(Y, Y[t]), eta)}

    return objective, {"U": U_buf}


def hashnet_objective(inp: ObjectiveInputs) -> Built:
    """HashNet: batch x batch pairs (as in HashNet's code), h = tanh(beta u) with beta raised by the
    continuation schedule on the global step, alpha = hashnet_alpha_bits / bits."""
    cfg = inp.cfg.baseline
    Y = inp.labels.float()
    alpha = cfg.hashnet_alpha_bits / inp.cfg.bits

    def objective(t: torch.Tensor, _f: torch.Tensor, u: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        # under DDP: this rank's rows against the whole global batch, the pairs a single process sees
        y_all, u_all = Y[all_gather_rows(t)], global_batch(u)
        beta = baselines.hashnet_beta(step, cfg.hashnet_step_size, cfg.hashnet_gamma, cfg.hashnet_power)
        loss = baselines.hashnet_loss(u_all, u, losses.similarity(y_all, Y[t]), beta, alpha)
        return {"loss": loss, "beta": torch.tensor(beta)}

    return objective, {}


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
    fit: Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray]] | None = None  # linear: (x, bits, seed)

    @property
    def deep(self) -> bool:
        return self.objective is not None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dseh", "DSEH", needs_labnet=True, objective=dseh_objective),
        Method("dpsh", "DPSH", uses_prev_codes=True, objective=dpsh_objective),
        Method("hashnet", "HashNet", objective=hashnet_objective),
        Method("itq", "ITQ", fit=_itq),
        Method("lsh", "LSH", fit=baselines.lsh),
    )
}
DEEP_METHODS = tuple(n for n, m in METHODS.items() if m.deep)
LINEAR_METHODS = tuple(n for n, m in METHODS.items() if not m.deep)


def get(name: str) -> Method:
    """The registry entry of `name` (config validation has already refused unknown names)."""
    return METHODS[name]
