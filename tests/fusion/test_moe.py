import math

import pytest
import torch
from torch import nn

from mmfusion.fusion.base import AllModalitiesAbsentError
from mmfusion.fusion.moe import MoEFusion


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# Four tokens of width 2; with an identity router (and no norm) the logits are the token values.
TOKENS = torch.tensor([[[2.0, 0.0], [1.0, 0.5], [0.0, 1.0], [3.0, 0.0]]])  # (B=1, N=4, D=2)


def _tiny(num_experts=2, top_k=1, **kw):
    """Width = num_experts, router weight = identity, no norm: router logits are the token values."""
    torch.manual_seed(0)
    moe = MoEFusion(["x"], num_experts, num_experts=num_experts, top_k=top_k, hidden=4, **kw)
    moe.norm = nn.Identity()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(num_experts))
    return moe


def _run(moe, tokens=TOKENS):
    return moe({"x": tokens}, {"x": torch.ones(tokens.shape[0], dtype=torch.bool)})


def test_hand_checked_top1_routing_and_losses():
    moe = _tiny(capacity_factor=None, load_balance_coef=1.0, z_loss_coef=0.5)
    out = _run(moe)
    assert out.info["expert_index"].flatten().tolist() == [0, 0, 1, 0]
    assert out.info["combine_weights"].flatten().tolist() == [1.0, 1.0, 1.0, 1.0]
    assert out.info["tokens_per_expert"].tolist() == [3.0, 1.0]
    # full-softmax mean probability of expert 0 (not the renormalised top-1 weight, which is always 1)
    p0 = (_sig(2.0) + _sig(0.5) + _sig(-1.0) + _sig(3.0)) / 4
    lb = 2 * (0.75 * p0 + 0.25 * (1 - p0))
    lse = [
        math.log(math.exp(2) + 1),
        math.log(math.exp(1) + math.exp(0.5)),
        math.log(1 + math.e),
        math.log(math.exp(3) + 1),
    ]
    z = sum(v * v for v in lse) / 4
    assert out.info["lb_loss"].item() == pytest.approx(lb, abs=1e-6)
    assert out.info["z_loss"].item() == pytest.approx(z, abs=1e-5)
    assert out.aux_loss.item() == pytest.approx(lb + 0.5 * z, abs=1e-5)
    assert out.info["load_cv"].item() == pytest.approx(0.5)  # std([3, 1]) / mean = 1 / 2
    # dropless: every token gets x + 1.0 * expert(x)
    x = TOKENS[0]
    expected = torch.stack([x[i] + moe.experts[e](x[i : i + 1])[0] for i, e in enumerate([0, 0, 1, 0])])
    torch.testing.assert_close(out.tokens[0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.pooled[0], expected.mean(0), rtol=0, atol=1e-6)


def test_capacity_overflow_passes_through_residual_unchanged():
    out = _run(_tiny(capacity_factor=0.5))  # capacity = ceil(0.5 * 4 * 1 / 2) = 1 per expert
    assert out.info["kept"].flatten().tolist() == [True, False, True, False]
    assert out.info["dropped"].item() == 2
    assert torch.equal(out.tokens[0, [1, 3]], TOKENS[0, [1, 3]])  # overflow: exactly the input
    assert not torch.equal(out.tokens[0, 0], TOKENS[0, 0])
    out = _run(_tiny(capacity_factor=1.0))  # capacity 2: expert 0 keeps its first two tokens
    assert out.info["kept"].flatten().tolist() == [True, True, True, False]
    assert torch.equal(out.tokens[0, 3], TOKENS[0, 3])


def test_capacity_serves_first_choices_before_second_choices():
    tokens = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    out = _run(_tiny(top_k=2, capacity_factor=0.5), tokens)  # capacity = ceil(0.5 * 2 * 2 / 2) = 1
    assert out.info["expert_index"].tolist() == [[0, 1], [1, 0]]
    assert out.info["kept"].tolist() == [[True, False], [True, False]]


def test_top2_combine_weights_are_renormalised_top_probs():
    tokens = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.5, 3.0]]])
    out = _run(_tiny(num_experts=3, top_k=2, capacity_factor=None), tokens)
    probs = tokens[0].softmax(-1)
    assert out.info["expert_index"].tolist() == [[1, 0], [2, 1]]
    w = out.info["combine_weights"]
    torch.testing.assert_close(w[0], probs[0, [1, 0]] / probs[0, [1, 0]].sum(), rtol=0, atol=1e-7)
    torch.testing.assert_close(w[1], probs[1, [2, 1]] / probs[1, [2, 1]].sum(), rtol=0, atol=1e-7)
    torch.testing.assert_close(w.sum(-1), torch.ones(2), rtol=0, atol=1e-7)
    f = torch.tensor([1.0, 2.0, 1.0]) / 4
    assert out.info["lb_loss"].item() == pytest.approx(3 * (f * probs.mean(0)).sum().item(), abs=1e-6)


def test_aux_free_bias_changes_selection_not_weights():
    tokens = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.5, 3.0]]])
    moe = _tiny(num_experts=3, top_k=2, capacity_factor=None, aux_free_bias=True, bias_update_rate=0.1)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    out = _run(moe, tokens)
    probs = tokens[0].softmax(-1)
    assert out.info["expert_index"].tolist() == [[2, 1], [2, 1]]
    torch.testing.assert_close(
        out.info["combine_weights"][0], probs[0, [2, 1]] / probs[0, [2, 1]].sum(), rtol=0, atol=1e-7
    )
    moe.expert_bias.zero_()
    moe.update_expert_bias(torch.tensor([3.0, 1.0, 2.0]))  # mean 2: overloaded expert 0 goes down
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.1, 0.1, 0.0]))
    assert not moe.expert_bias.requires_grad


@pytest.mark.parametrize(
    "kw", [{}, {"capacity_factor": None}, {"aux_free_bias": True}, {"hierarchical": True}]
)
def test_shapes_and_masked_modality_cannot_change_output(make_inputs, assert_mask_invariant, kw):
    torch.manual_seed(0)
    moe = MoEFusion(["text", "image", "audio"], 8, num_experts=3, top_k=2, hidden=16, **kw)
    feats, masks = make_inputs()
    out = moe(feats, masks)
    assert out.pooled.shape == (4, 8) and out.tokens.shape == (4, 9, 8)
    assert out.aux_loss.ndim == 0 and out.aux_loss.item() > 0
    n_present = int(out.info["token_mask"].sum())
    assert out.info["expert_index"].shape == (n_present, 2)
    assert out.info["tokens_per_expert"].sum().item() == 2 * n_present
    assert_mask_invariant(moe, feats, masks)


def test_hierarchical_routes_within_modality_combination(make_inputs):
    torch.manual_seed(0)
    moe = MoEFusion(["text", "image", "audio"], 8, num_experts=2, top_k=2, hidden=16, hierarchical=True)
    assert moe.num_experts == 2 * 7 and moe.base is not None
    feats, masks = make_inputs()
    out = moe(feats, masks)
    valid = out.info["token_mask"]
    present = torch.stack([masks[m] for m in moe.modalities], dim=1).long()  # audio, image, text
    combo = (present * torch.tensor([1, 2, 4])).sum(1) - 1
    group = combo[:, None].expand_as(valid)[valid]
    assert torch.equal(out.info["expert_index"] // 2, group[:, None].expand(-1, 2))


def test_gradients_reach_router_and_experts(make_inputs):
    torch.manual_seed(0)
    moe = MoEFusion(["text", "image", "audio"], 8, num_experts=3, top_k=2, hidden=16, capacity_factor=None)
    feats, masks = make_inputs()
    out = moe(feats, masks)
    (out.pooled.square().sum() + out.aux_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    used = out.info["tokens_per_expert"] > 0
    assert used.any()
    for expert, u in zip(moe.experts, used.tolist()):
        assert (expert.fc1.weight.grad is not None) == u


def test_all_absent_raises_naming_samples(make_inputs):
    feats, masks = make_inputs(present={m: [True, False] for m in ("text", "image", "audio")})
    with pytest.raises(AllModalitiesAbsentError, match=r"sample\(s\) \[1\]"):
        MoEFusion(["text", "image", "audio"], 8)(feats, masks)


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k must be in"):
        MoEFusion(["x"], 4, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        MoEFusion(["x"], 4, capacity_factor=0.0)
