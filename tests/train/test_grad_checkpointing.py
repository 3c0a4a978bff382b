"""Gradient checkpointing (T8): recomputing blocks in backward changes neither the loss nor any gradient."""

import torch

from mmfusion.config import ModelConfig
from mmfusion.fusion.early import EarlyFusion
from mmfusion.layers import set_grad_checkpointing
from mmfusion.modalities.text import TextTokenizer
from mmfusion.models.contrastive import ContrastiveModel

CAPTIONS = ["a small red circle", "a large blue square", "a small green triangle", "a large white cross"]


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_with_and_without(model, compute):
    model.train()
    assert set_grad_checkpointing(model, False) > 0
    ref_loss, ref_grads = loss_and_grads(model, compute)
    set_grad_checkpointing(model, True)
    loss, grads = loss_and_grads(model, compute)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name  # same kernels on the same inputs: bitwise


def test_contrastive_model_same_loss_and_gradients():
    tok = TextTokenizer.train(CAPTIONS * 4, vocab_size=60, context_length=8)
    cfg = ModelConfig.model_validate(
        {
            "embed_dim": 8,
            "text": {"width": 8, "depth": 2, "heads": 2, "context_length": 8},
            "image": {"image_size": 8, "patch_size": 4, "width": 8, "depth": 2, "heads": 2},
        }
    )
    torch.manual_seed(0)
    model = ContrastiveModel(cfg, tok)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, "text": tok.encode(CAPTIONS)}
    assert_same_with_and_without(model, lambda m: m(batch).loss)


def test_early_fusion_same_loss_and_gradients_with_masked_modality():
    torch.manual_seed(0)
    fusion = EarlyFusion(["text", "image"], 8, depth=2, heads=2)
    g = torch.Generator().manual_seed(1)
    feats = {"text": torch.randn(3, 4, 8, generator=g), "image": torch.randn(3, 2, 8, generator=g)}
    masks = {"text": torch.tensor([True, False, True]), "image": torch.tensor([True, True, False])}
    assert_same_with_and_without(fusion, lambda m: m(feats, masks).pooled.square().mean())
