import math

import torch

from mmfusion.losses import clip_loss, dual_contrastive_loss, intra_modal_loss


def softplus(x):
    return math.log1p(math.exp(x))


def test_clip_loss_hand_computed_2x2():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    # logits = a @ b.T = [[0.6, 0.0], [0.8, 1.0]]; CE of a 2-way softmax = softplus(other - target)
    rows = (softplus(0.0 - 0.6) + softplus(0.8 - 1.0)) / 2
    cols = (softplus(0.8 - 0.6) + softplus(0.0 - 1.0)) / 2
    assert abs(clip_loss(a, b, 1.0).item() - (rows + cols) / 2) < 1e-6
    assert abs(clip_loss(a, b, 1.0).item() - 0.5367570) < 1e-6


def test_clip_loss_scale_and_identity():
    eye = torch.eye(2)
    assert abs(clip_loss(eye, eye, 1.0).item() - softplus(-1.0)) < 1e-6
    assert abs(clip_loss(eye, eye, 10.0).item() - softplus(-10.0)) < 1e-7


def test_dual_loss_adds_intra_modal_terms():
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # intra(a): logits [[1, .6], [.6, 1]] -> both rows softplus(-0.4); intra(b): identity -> softplus(-1)
    assert abs(intra_modal_loss(a, 1.0).item() - softplus(-0.4)) < 1e-6
    expected = clip_loss(b, a, 1.0).item() + 0.5 * 0.5 * (softplus(-0.4) + softplus(-1.0))
    assert abs(dual_contrastive_loss(a, b, 1.0, intra_weight=0.5).item() - expected) < 1e-6
