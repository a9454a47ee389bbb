"""Baselines for the paper's comparison (docs/algorithm.md, the other methods): LSH and ITQ on features, the DPSH and
HashNet pairwise losses as pure functions (collapse detection for any method's codes is
dseh.codes.collapse).

The deep baselines' losses plug into the same training loop as DSEH (dseh.train); only the loss
differs. Codes follow dseh.codes: {-1, +1}, sign(0) = +1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dseh.codes import sign


def lsh(features: np.ndarray, bits: int, seed: int) -> np.ndarray:
    """Random-projection LSH: W ~ N(0, 1) of shape (d, bits); codes = sign((X - mean) W).

    Returns the projection (d, bits) and the mean, so queries are encoded the same way."""
    x = np.asarray(features, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((x.shape[1], bits)), x.mean(axis=0)


def principal_components(xc: np.ndarray, k: int) -> np.ndarray:
    """The top-k principal directions (d, k) of centred rows, largest first: the top eigenvectors
    of the smaller of the covariance X^T X and the Gram matrix X X^T (a partial eigendecomposition:
    about 10x faster than the SVD of X for 5,000 x 3,072 pixels)."""
    from scipy.linalg import eigh

    n, d = xc.shape
    small = xc.T @ xc if d <= n else xc @ xc.T
    m = small.shape[0]
    w, v = eigh(small, subset_by_index=[m - k, m - 1])
    v = v[:, ::-1]
    if d > n:  # left singular vectors -> right ones: X^T u / ||X^T u||
        v = xc.T @ v
        v /= np.maximum(np.linalg.norm(v, axis=0, keepdims=True), 1e-12)
    return v


def itq(features: np.ndarray, bits: int, seed: int, iterations: int = 50) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Iterative quantization (Gong & Lazebnik 2011): PCA to `bits` dimensions, then alternate
    B = sign(V R) and the orthogonal Procrustes update R = U_A U_B^T from svd(B^T V) = U_B S U_A^T.

    Returns the projection (d, bits) = PCs @ R, the mean, and the quantization loss ||B - V R||_F^2
    after each iteration (non-increasing)."""
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    xc = x - mean
    if bits > min(xc.shape):
        raise ValueError(f"ITQ needs bits <= min(n, d) = {min(xc.shape)}, got {bits}")
    pcs = principal_components(xc, bits)  # (d, bits)
    v = xc @ pcs
    rng = np.random.default_rng(seed)
    r, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    losses = []
    for _ in range(iterations):
        b = sign(v @ r).astype(np.float64)
        ub, _, uat = np.linalg.svd(b.T @ v)
        r = uat.T @ ub.T
        losses.append(float(((sign(v @ r) - v @ r) ** 2).sum()))
    return pcs @ r, mean, losses


def project(features: np.ndarray, projection: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """{-1, +1} codes of features under a linear hashing projection (LSH, ITQ)."""
    return sign((np.asarray(features, dtype=np.float64) - mean) @ projection)


def dpsh_loss(u_all: torch.Tensor, u_batch: torch.Tensor, S: torch.Tensor, eta: float) -> torch.Tensor:
    """DPSH (Li et al. 2016), normalised like DSEH's terms:
    -mean_ij [ S_ij Theta_ij - softplus(Theta_ij) ] + eta * mean_j ||u_j - sign(u_j)||^2 / K,
    Theta = 0.5 <u_i, u_j>, u_all (n, K) a detached buffer, u_batch (b, K), S (n, b)."""
    theta = 0.5 * u_all @ u_batch.T
    pair = -(S * theta - F.softplus(theta)).mean()
    quant = ((u_batch - torch.where(u_batch >= 0, 1.0, -1.0)) ** 2).mean()
    return pair + eta * quant


def hashnet_loss(
    u_all: torch.Tensor, u_batch: torch.Tensor, S: torch.Tensor, beta: float, alpha: float
) -> torch.Tensor:
    """HashNet (Cao et al. 2017): h = tanh(beta u), weighted pairwise cross-entropy on alpha <h_i, h_j>,
    similar and dissimilar pairs weighted by their inverse frequency in the block:
    sum_ij w_ij [ softplus(alpha <h_i, h_j>) - S_ij alpha <h_i, h_j> ] / sum_ij w_ij,
    w = |S| / |S1| on similar pairs, |S| / |S0| on dissimilar ones."""
    h_all, h_b = torch.tanh(beta * u_all), torch.tanh(beta * u_batch)
    ip = alpha * h_all @ h_b.T
    n = S.numel()
    n_sim = S.sum().clamp_min(1.0)
    n_dis = (n - S.sum()).clamp_min(1.0)
    w = torch.where(S > 0, n / n_sim, n / n_dis)
    return (w * (F.softplus(ip) - S * ip)).sum() / w.sum()


def hashnet_beta(step: int, step_size: int = 200, gamma: float = 0.005, power: float = 0.5) -> float:
    """HashNet's continuation: beta = (1 + gamma * step) ^ power, raised every `step_size` steps."""
    return (1.0 + gamma * (step // step_size) * step_size) ** power
