import math

import pytest
import torch
import torch.nn.functional as F

from mmfusion.errors import ConfigError
from mmfusion.unified.attention import (
    apply_rope,
    attention_mask,
    attention_pairs,
    blocked_window_attention,
    max_abs_logit,
    rope_cos_sin,
    topk_attention,
    window_plan,
)

T_, I_ = 0, 1


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_rope_rotates_by_relative_position():
    q, k = torch.randn(8), torch.randn(8)
    cos, sin = rope_cos_sin(torch.arange(12), 8)

    def score(i, j):
        return float(apply_rope(q, cos[i], sin[i]) @ apply_rope(k, cos[j], sin[j]))

    # norms kept, and q.k depends only on the offset i - j (Su et al. 2021)
    assert apply_rope(q, cos[5], sin[5]).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)
    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    # position 0 is the identity; position 1 rotates the first pair by 1 radian
    assert torch.equal(apply_rope(q, cos[0], sin[0]), q)
    x = torch.tensor([1.0, 0, 0, 0])
    c, s = rope_cos_sin(torch.tensor([1]), 4)
    assert apply_rope(x, c[0], s[0]).tolist() == pytest.approx([math.cos(1), 0, math.sin(1), 0], abs=1e-6)
    with pytest.raises(ConfigError, match="even head dimension"):
        rope_cos_sin(torch.arange(3), 7)


def test_attention_mask_causal_and_image_window():
    mod = torch.tensor([[T_, I_, I_, I_, T_]])
    m = attention_mask(mod, 5, window=2)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],  # image query at 1 sees keys 0..1 (window 2)
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [1, 1, 1, 1, 1],  # text query: full causal prefix
    ]
    assert attention_mask(mod, 5)[0, 0].int().tolist() == torch.ones(5, 5).tril().int().tolist()
    # queries continuing a cache of 3: they are positions 3 and 4 of 5
    tail = attention_mask(mod[:, 3:], 5, window=2)[0, 0].int().tolist()
    assert tail == [[0, 0, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_topk_keeps_at_most_k_weights_and_equals_dense_when_k_covers_all():
    q, k, v = torch.randn(3, 2, 2, 10, 8).unbind(0)
    mask = attention_mask(torch.zeros(2, 10, dtype=torch.long), 10)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for topk in (10, 50):
        y, w = topk_attention(q, k, v, mask, topk)
        assert (y - dense).abs().max().item() < 1e-6
    y, w = topk_attention(q, k, v, mask, 3)
    nonzero = (w > 0).sum(-1)
    assert nonzero.max().item() == 3 and nonzero[..., 0].eq(1).all()  # query 0 has one allowed key
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert not (w > 0)[~mask.expand_as(w)].any()  # never outside the causal mask
    # the kept weights are the 3 largest scores of each query
    s = (q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf"))
    top = s[..., 5, :].topk(3).indices.sort().values
    assert torch.equal((w[..., 5, :] > 0).nonzero()[:, -1].view(2, 2, 3), top)
    assert (y - dense).abs().max().item() > 1e-3


def test_blocked_window_attention_equals_masked_dense_and_skips_work():
    mod = torch.tensor([[T_] * 6 + [I_] * 30 + [T_] * 4 + [I_] * 24] * 2)
    q, k, v = torch.randn(3, 2, 2, 64, 8).unbind(0)
    for window in (1, 5, 17):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(mod, 64, window))
        out = blocked_window_attention(q, k, v, mod, window, block=8)
        assert (out - ref).abs().max().item() < 1e-6
    # and the gradients (training uses this path for long sequences)
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    blocked_window_attention(*qkv, mod, 5, block=8).square().sum().backward()
    grads = [x.grad for x in qkv]
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    F.scaled_dot_product_attention(*qkv, attn_mask=attention_mask(mod, 64, 5)).square().sum().backward()
    assert all((g - x.grad).abs().max().item() < 1e-5 for g, x in zip(grads, qkv))
    # block 8, window 5: image groups [6..13], [14..21], [22..29], [30..35]+[40..41] (spanning the text
    # gap), [42..49], [50..57], [58..63]; text groups [0..5, 36, 37], [38, 39]
    full = attention_pairs(mod, None)
    assert full == 2 * 64 * 65 // 2
    windowed = attention_pairs(mod, 5)
    image_groups = [(8, 2, 14), (8, 10, 22), (8, 18, 30), (8, 26, 42), (8, 38, 50), (8, 46, 58), (6, 54, 64)]
    text_groups = [(8, 0, 38), (2, 0, 40)]
    blocked = attention_pairs(mod, 5, block=8)
    assert blocked == 2 * sum(n * (hi - lo) for n, lo, hi in image_groups + text_groups)
    plan = window_plan(mod, 5, 8)
    assert [(len(p), lo, hi) for p, lo, hi in plan] == image_groups + text_groups
    assert plan[3][0].tolist() == [30, 31, 32, 33, 34, 35, 40, 41]
    assert windowed <= blocked < full


def test_max_abs_logit_hand_checked():
    q = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])  # (1, 1, 2 queries, dim 2)
    k = torch.tensor([[[[3.0, 0.0], [0.0, -5.0]]]])
    # allowed pairs (causal): q0.k0 = 3, q1.k0 = 0, q1.k1 = -10 -> max |.| / sqrt(2) = 10 / sqrt(2)
    assert max_abs_logit(q, k, None).item() == pytest.approx(10 / math.sqrt(2))
    only_first = torch.tensor([[[[True, False], [True, False]]]])
    assert max_abs_logit(q, k, only_first).item() == pytest.approx(3 / math.sqrt(2))
