"""How a network is optimised: the optimiser, its learning-rate schedule and weight decay (a Recipe),
and the torch optimiser built from one. Each deep method names its own (dseh.methods); LabNet uses
DSEH's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

OPTIMIZERS = ("adam", "sgd", "rmsprop")
INITS = ("release", "default")  # new layers N(0, 0.01^2) as in DSEH's release | torch's default init


@dataclass(frozen=True)
class Recipe:
    """lr = 10^-(lr_exp + step_exp * (floor(epoch / step_epochs) + round)) for the new layers."""

    optimizer: str  # adam | sgd | rmsprop
    lr_exp: float
    step_exp: float = 0.0  # 0: a constant learning rate
    step_epochs: int = 10
    momentum: float = 0.0  # sgd and rmsprop
    weight_decay: float = 0.0  # L2, as the optimiser's weight_decay

    def lr(self, epoch: int, round_index: int) -> float:
        """The new layers' learning rate in an epoch of a round."""
        return lr_for_epoch(self.lr_exp, self.step_exp, self.step_epochs, epoch, round_index)


def lr_for_epoch(lr_exp: float, step_exp: float, step_epochs: int, epoch: int, round_index: int) -> float:
    """lr = 10^-(lr_exp + step_exp * (floor(epoch / step_epochs) + round)) (the release's schedule)."""
    return 10.0 ** -(lr_exp + step_exp * (epoch // step_epochs + round_index))


def make_optimizer(groups: list[dict], recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimiser over parameter groups that carry their own lr."""
    lr, wd = groups[0]["lr"], recipe.weight_decay
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, weight_decay=wd)
    if recipe.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=recipe.momentum, weight_decay=wd)
    # the fused kernel (one pass over every tensor), on the CPU too: LabNet's steps are about 25% faster
    return torch.optim.Adam(groups, lr=lr, weight_decay=wd, fused=True)
