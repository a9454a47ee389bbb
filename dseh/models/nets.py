"""LabNet and ImgNet (docs/algorithm.md) and the initialisation of their new layers."""

from __future__ import annotations

import torch
from torch import nn

from dseh.models.backbones import Backbone

FEATURE_DIM = 512


def init_new_layer(layer: nn.Linear) -> None:
    """Weights N(0, 0.01^2) truncated at 2 sigma; biases N(0, 0.01^2) (the release's init)."""
    nn.init.trunc_normal_(layer.weight, mean=0.0, std=0.01, a=-0.02, b=0.02)
    nn.init.normal_(layer.bias, mean=0.0, std=0.01)


class LabNet(nn.Module):
    """labels y -> fc1 (ReLU, LRN) -> fc2 (ReLU) = f^l -> fc3 (tanh) = h^l -> fc4 = label logits.

    LRN: MatConvNet [N=5, kappa=2, alpha=1e-4, beta=0.75]; PyTorch divides alpha by the window,
    hence alpha=5e-4 here.
    """

    def __init__(self, n_classes: int, bits: int, hidden: int = 2048, lrn: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(n_classes, hidden)
        self.lrn = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0) if lrn else None
        self.fc2 = nn.Linear(hidden, FEATURE_DIM)
        self.fc3 = nn.Linear(FEATURE_DIM, bits)
        self.fc4 = nn.Linear(bits, n_classes)
        for layer in (self.fc1, self.fc2, self.fc3, self.fc4):
            init_new_layer(layer)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (f^l (b, 512), h^l (b, K) in (-1, 1), label logits (b, c))."""
        x = torch.relu(self.fc1(y))
        if self.lrn is not None:
            x = self.lrn(x.unsqueeze(-1)).squeeze(-1)  # LRN runs over dim 1 of a >= 3-D input
        f = torch.relu(self.fc2(x))
        h = torch.tanh(self.fc3(f))
        return f, h, self.fc4(h)


class ImgNet(nn.Module):
    """images -> backbone -> fc8 = z; f^v = ReLU(z); u = fc9(z) (release) or fc9(f^v) (paper)."""

    def __init__(self, backbone: Backbone, bits: int, hash_from: str = "pre_relu", init: str = "release"):
        super().__init__()
        self.backbone = backbone
        self.fc8 = nn.Linear(backbone.out_dim, FEATURE_DIM)
        self.fc9 = nn.Linear(FEATURE_DIM, bits)
        self.hash_from = hash_from
        if init == "release":  # else torch's default init of nn.Linear
            init_new_layer(self.fc8)
            init_new_layer(self.fc9)

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, H, W, 3) -> (f^v (B, 512), hash logits u (B, K))."""
        z = self.fc8(self.backbone(self.backbone.preprocess(images_uint8)))
        f = torch.relu(z)
        u = self.fc9(z if self.hash_from == "pre_relu" else f)
        return f, u

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.fc8.parameters()) + list(self.fc9.parameters())
