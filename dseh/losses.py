"""DSEH loss terms (docs/algorithm.md; the release's normalised form), one pure function each.

Notation: n training items, b batch items, K bits, c classes. S (n, b) holds S_ij = 1 when
training item i and batch item j share a label. Buffers (n, .) are detached: gradients flow
through the batch side only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity(labels_all: torch.Tensor, labels_batch: torch.Tensor) -> torch.Tensor:
    """S (n, b): 1.0 where the label vectors share at least one label, else 0.0."""
    return (labels_all.float() @ labels_batch.float().T > 0).float()


def pairwise_loglik(
    all_side: torch.Tensor, batch_side: torch.Tensor, S: torch.Tensor, scale: float, logit_scale: float = 0.5
) -> torch.Tensor:
    """-mean_ij [ scale * S_ij * Theta_ij - softplus(Theta_ij) ],  Theta = logit_scale * A B^T.

    all_side (n, d), batch_side (b, d), S (n, b). The negative log-likelihood of the pairwise
    similarities under sigma(Theta), with the release's similarity scale; softplus is computed
    stably (no overflow for large logits).
    """
    theta = logit_scale * all_side @ batch_side.T
    return -(scale * S * theta - F.softplus(theta)).mean()


def semantic_loss_j1(
    F_all: torch.Tensor, f_batch: torch.Tensor, S: torch.Tensor, s_f: float, logit_scale: float = 0.5
) -> torch.Tensor:
    """J1 = -mean_ij [ s_f S_ij Theta_f_ij - softplus(Theta_f_ij) ], Theta_f = 0.5 F~ F_I^T (LabNet features)."""
    return pairwise_loglik(F_all, f_batch, S, s_f, logit_scale)


def hamming_loss_j2(
    H_all: torch.Tensor, h_batch: torch.Tensor, S: torch.Tensor, s_h: float, logit_scale: float = 0.5
) -> torch.Tensor:
    """J2 = -mean_ij [ s_h S_ij Theta_h_ij - softplus(Theta_h_ij) ], Theta_h = 0.5 H~ H_I^T (LabNet codes)."""
    return pairwise_loglik(H_all, h_batch, S, s_h, logit_scale)


def quantization_loss_j3(h: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """J3 = mean_jk | 1 - |h_jk| |  (release); reduction='sum' gives the paper's summed form."""
    q = (1.0 - h.abs()).abs()
    return q.sum() if reduction == "sum" else q.mean()


def label_loss_j4(y: torch.Tensor, logits: torch.Tensor, head: str = "sigmoid") -> torch.Tensor:
    """J4 = (1 / (2 b c)) sum_j || y_j - sigmoid(W h_j + b) ||^2; head='linear' drops the sigmoid (paper)."""
    pred = torch.sigmoid(logits) if head == "sigmoid" else logits
    return 0.5 * ((y.float() - pred) ** 2).mean()


def code_loss_lh(
    u: torch.Tensor, B_target: torch.Tensor, code_scale: float = 10.0, target: float = 0.999
) -> torch.Tensor:
    """L_h = mean BCEWithLogits(code_scale * u, target * h'),  h'_jk = 1 where B^l_jk >= 0 else 0."""
    h = (B_target >= 0).to(u.dtype)
    return F.binary_cross_entropy_with_logits(code_scale * u, target * h)


def semantic_supervision_lf(
    F_lab: torch.Tensor, f_img: torch.Tensor, S: torch.Tensor, s_i: float, logit_scale: float = 0.5
) -> torch.Tensor:
    """L_f = -mean_ij [ s_i S_ij Theta_ij - softplus(Theta_ij) ], Theta = 0.5 F^l (f^v)^T (LabNet -> ImgNet)."""
    return pairwise_loglik(F_lab, f_img, S, s_i, logit_scale)
