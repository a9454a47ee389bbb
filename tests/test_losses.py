"""Each DSEH loss term against a hand computation on a 3x2 example, and against huge logits."""

import math

import pytest
import torch

from dseh import losses

A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 "all-training" rows
B = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # 2 batch rows
S = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def test_similarity_shares_a_label():
    y_all = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    y_b = torch.tensor([[0, 1, 0], [1, 0, 1]])
    assert losses.similarity(y_all, y_b).tolist() == [[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]


def test_pairwise_terms_hand_computed():
    # Theta = 0.5 A B^T = [[.5, 0], [0, 1], [.5, 1]]; softplus(.5)=0.974077, (0)=0.693147, (1)=1.313262
    # -mean(S*Theta - softplus(Theta)) = (0.474077 + 0.693147 + 0.693147 + 0.313262 + 0.474077 + 0.313262) / 6
    expected = 2.960972 / 6
    for fn in (losses.semantic_loss_j1, losses.hamming_loss_j2, losses.semantic_supervision_lf):
        assert float(fn(A, B, S, 1.0, 0.5)) == pytest.approx(expected, abs=1e-6)
    # the similarity scale multiplies only the S * Theta part: S*Theta sums to 3.0
    assert float(losses.pairwise_loglik(A, B, S, 0.5, 0.5)) == pytest.approx(expected + 0.5 * 3.0 / 6, abs=1e-6)
    # the paper's logit scale 1: Theta = A B^T = [[1,0],[0,2],[1,2]]
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    paper = -((1 - sp(1)) + (0 - sp(0)) + (0 - sp(0)) + (2 - sp(2)) + (1 - sp(1)) + (2 - sp(2))) / 6
    assert float(losses.pairwise_loglik(A, B, S, 1.0, 1.0)) == pytest.approx(paper, abs=1e-6)


def test_gradient_flows_through_the_batch_side_only():
    a = A.clone().requires_grad_(True)
    b = B.clone().requires_grad_(True)
    losses.pairwise_loglik(a.detach(), b, S, 1.0).backward()
    assert a.grad is None and b.grad is not None


def test_quantization_j3():
    h = torch.tensor([[0.5, -1.0], [0.0, 0.9], [-0.2, 0.3]])
    # |1-|h|| = .5, 0, 1, .1, .8, .7 -> sum 3.1
    assert float(losses.quantization_loss_j3(h)) == pytest.approx(3.1 / 6)
    assert float(losses.quantization_loss_j3(h, "sum")) == pytest.approx(3.1)


def test_label_j4():
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [0.0, -math.log(3)]])
    # sigmoid: .5 .5 / .75 .5 / .5 .25 -> squared errors .25 .25 .5625 .25 .25 .5625 = 2.125; / (2*3*2)
    assert float(losses.label_loss_j4(y, logits)) == pytest.approx(2.125 / 12)
    # linear head (paper): errors on the raw outputs
    lin = torch.tensor([[0.5, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert float(losses.label_loss_j4(y, lin, "linear")) == pytest.approx((0.25 + 1.0) / 12)


def test_code_loss_lh():
    u = torch.tensor([[0.1, -0.2], [0.0, 0.05], [-0.1, 0.3]])
    b = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    # logits 10u = [[1,-2],[0,.5],[-1,3]], targets .999*h' = [[.999,0],[.999,.999],[0,.999]]
    # BCE = softplus(x) - t x: .314262 .126928 .693147 .474577 .313262 .051587
    expected = (0.314262 + 0.126928 + 0.693147 + 0.474577 + 0.313262 + 0.051587) / 6
    assert float(losses.code_loss_lh(u, b)) == pytest.approx(expected, abs=1e-5)
    # b = 0 counts as +1 (sign(0) = +1)
    assert float(losses.code_loss_lh(u, torch.zeros_like(b))) == pytest.approx(
        float(losses.code_loss_lh(u, torch.ones_like(b)))
    )


def test_huge_logits_stay_finite():
    big = torch.full((3, 2), 1e4)
    for fn in (losses.semantic_loss_j1, losses.semantic_supervision_lf):
        v = fn(big, big[:2], S, 0.999)
        assert torch.isfinite(v)
        assert float(fn(-big, big[:2], S, 0.999)) >= 0  # softplus of -1e8 underflows to 0, not nan
    u = torch.full((3, 2), 1e4, requires_grad=True)
    v = losses.code_loss_lh(u, -torch.ones(3, 2))
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(u.grad).all()
