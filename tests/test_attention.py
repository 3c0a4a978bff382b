"""mmfusion.layers.attention: the CPU matmul path computes SDPA's function (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from mmfusion.layers import MATMUL_ATTENTION_MAX_TOKENS, attention


def qkv(n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, length, 8, generator=g, requires_grad=True) for length in (n, m, m))


def both(n, m, **kw):
    q, k, v = qkv(n, m)
    ours = attention(q, k, v, **kw)
    (ours * torch.arange(ours.numel()).view_as(ours).sin()).sum().backward()
    g_ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    (ref * torch.arange(ref.numel()).view_as(ref).sin()).sum().backward()
    return ours, ref, g_ours, [t.grad for t in (q, k, v)]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"is_causal": True},
        {"attn_mask": torch.tensor([[True, True, False, True], [True, False, True, True]]).view(2, 1, 1, 4)},
        {"attn_mask": torch.randn(1, 1, 4, 4)},
    ],
    ids=["none", "causal", "bool", "float"],
)
def test_matmul_path_equals_sdpa(kw):
    ours, ref, g_ours, g_ref = both(4, 4, **kw)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_query_that_may_attend_to_nothing_gets_zero_as_sdpa():
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]]).view(1, 1, 3, 3)
    ours, ref, g_ours, g_ref = both(3, 3, attn_mask=mask)
    assert torch.equal(ours[:, :, 1], torch.zeros_like(ours[:, :, 1]))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(g).all() for g in g_ours)


def test_long_sequences_go_through_sdpa_unchanged():
    n = MATMUL_ATTENTION_MAX_TOKENS + 1
    q, k, v = qkv(n, n)
    with torch.no_grad():
        assert torch.equal(
            attention(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True)
        )


@pytest.mark.parametrize("is_causal", [False, True])
def test_fewer_queries_than_keys(is_causal):
    ours, ref, g_ours, g_ref = both(3, 5, is_causal=is_causal)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
