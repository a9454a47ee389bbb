"""Baselines: LSH and ITQ against their definitions, DPSH and HashNet losses by hand."""

import math

import numpy as np
import pytest
import torch

from dseh import baselines as bl
from dseh.evaluation import mean_average_precision


def clustered(rng, n=600, d=20, classes=5):
    centers = rng.normal(0, 3, (classes, d))
    y = rng.integers(0, classes, n)
    x = centers[y] + rng.normal(0, 1, (n, d))
    return x, np.eye(classes, dtype=np.uint8)[y]


def test_itq_rotation_is_orthogonal_and_loss_never_increases():
    x, _ = clustered(np.random.default_rng(0))
    proj, mean, losses = bl.itq(x, 8, seed=0)
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))
    assert len(losses) == 50
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    r = vt[:8] @ proj  # PCs^T (PCs R) = R
    np.testing.assert_allclose(r.T @ r, np.eye(8), atol=1e-8)
    codes = bl.project(x, proj, mean)
    assert set(np.unique(codes)) == {-1, 1}


@pytest.mark.parametrize("shape", [(200, 30), (30, 200)])
def test_principal_components_span_the_top_singular_directions(shape):
    x = np.random.default_rng(1).normal(size=shape) * np.linspace(3, 0.1, shape[1])
    xc = x - x.mean(0)
    pcs = bl.principal_components(xc, 6)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    # the same directions in the same order, each up to its sign
    np.testing.assert_allclose(np.abs(vt[:6] @ pcs), np.eye(6), atol=1e-6)


def test_itq_beats_lsh_on_clustered_features_and_both_beat_chance():
    rng = np.random.default_rng(1)
    x, y = clustered(rng)
    q, db = slice(0, 100), slice(100, None)
    proj, mean, _ = bl.itq(x[db], 16, seed=0)
    m_itq = mean_average_precision(bl.project(x[q], proj, mean), bl.project(x[db], proj, mean), y[q], y[db])
    w, mu = bl.lsh(x[db], 16, seed=0)
    m_lsh = mean_average_precision(bl.project(x[q], w, mu), bl.project(x[db], w, mu), y[q], y[db])
    chance = float((y[q] @ y[db].T > 0).mean())
    assert m_itq > m_lsh > chance + 0.1


def test_lsh_is_seeded():
    x = np.random.default_rng(0).normal(size=(50, 6))
    a, _ = bl.lsh(x, 4, seed=3)
    b, _ = bl.lsh(x, 4, seed=3)
    c, _ = bl.lsh(x, 4, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_dpsh_loss_by_hand():
    u_all = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    u_b = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    S = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pair = 2.960972 / 6  # the same block as DSEH's pairwise term (tests/test_losses.py)
    quant = ((0.0) ** 2 + (0 - 1) ** 2 + (0 - 1) ** 2 + (2 - 1) ** 2) / 4  # sign(0) = +1
    assert float(bl.dpsh_loss(u_all, u_b, S, 0.0)) == pytest.approx(pair, abs=1e-6)
    assert float(bl.dpsh_loss(u_all, u_b, S, 0.5)) == pytest.approx(pair + 0.5 * quant, abs=1e-6)


def test_hashnet_loss_by_hand_weights_pairs_by_inverse_frequency():
    u_all = torch.tensor([[10.0, 10.0], [10.0, -10.0]])
    u_b = torch.tensor([[10.0, 10.0]])
    S = torch.tensor([[1.0], [0.0]])
    # beta = 1: h ~ sign(u); alpha = 0.5: ip = 0.5 * <h_i, h_j> ~ [1, 0]
    h = torch.tanh(torch.tensor(10.0))
    ip = [0.5 * 2 * h * h, 0.0]
    sp = lambda v: math.log1p(math.exp(float(v)))  # noqa: E731
    # one similar, one dissimilar pair: weights 2 and 2, so a plain mean of the two terms
    expected = ((sp(ip[0]) - float(ip[0])) + sp(ip[1])) / 2
    assert float(bl.hashnet_loss(u_all, u_b, S, 1.0, 0.5)) == pytest.approx(expected, abs=1e-6)
    # with 3 dissimilar pairs to 1 similar, the similar pair weighs 4 and each dissimilar 4/3
    S2 = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    u2 = torch.cat([u_all, u_all[1:], u_all[1:]])
    got = float(bl.hashnet_loss(u2, u_b, S2, 1.0, 0.5))
    assert got == pytest.approx((4 * (sp(ip[0]) - float(ip[0])) + 3 * (4 / 3) * sp(0.0)) / 8, abs=1e-6)


def test_hashnet_continuation_grows():
    betas = [bl.hashnet_beta(s) for s in (0, 199, 200, 10_000)]
    assert betas[0] == betas[1] == 1.0 and betas[2] > 1.0 and betas[3] > betas[2]
