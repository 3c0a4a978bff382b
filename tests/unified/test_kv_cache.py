"""append_kv: an in-place-growing torch.cat along positions (mmfusion.unified.kv_cache)."""

import torch

from mmfusion.unified.kv_cache import append_kv
from mmfusion.unified.model import TEXT, UnifiedConfig, UnifiedDecoder


def kv(t: int, seed: int) -> torch.Tensor:
    return torch.randn(2, 3, t, 4, generator=torch.Generator().manual_seed(seed))


def test_equals_cat_and_grows_in_place():
    past = kv(5, 0)
    a = append_kv(past, kv(1, 1), max_len=100)
    assert torch.equal(a, torch.cat([past, kv(1, 1)], dim=2))
    b = append_kv(a, kv(2, 2), max_len=100)  # the newest view: written into the same buffer
    assert b.data_ptr() == a.data_ptr() and b._base is a._base
    assert torch.equal(b, torch.cat([past, kv(1, 1), kv(2, 2)], dim=2))
    assert a._base.shape[2] == 64  # capacity: max(2 * 6, 64), capped by max_len


def test_branching_from_an_older_state_copies():
    a = append_kv(kv(5, 0), kv(1, 1), max_len=100)
    b = append_kv(a, kv(1, 2), max_len=100)  # a continuation of a
    c = append_kv(a, kv(1, 3), max_len=100)  # a second continuation of a: must not overwrite b's token
    assert torch.equal(b[:, :, 6], kv(1, 2)[:, :, 0]) and torch.equal(c[:, :, 6], kv(1, 3)[:, :, 0])
    assert c.data_ptr() != b.data_ptr()


def test_capacity_capped_at_max_len_and_regrown():
    x = append_kv(kv(3, 0), kv(1, 1), max_len=6)
    assert x._base.shape[2] == 6
    y = append_kv(append_kv(x, kv(2, 2), max_len=6), kv(1, 3), max_len=8)  # 7 > 6: a new buffer
    assert y.shape[2] == 7 and torch.equal(y[:, :, :4], x) and torch.equal(y[:, :, 6], kv(1, 3)[:, :, 0])


def test_with_autograd_it_is_a_plain_cat():
    past = kv(3, 0).requires_grad_()
    out = append_kv(past, kv(1, 1), max_len=100)
    out.sum().backward()
    assert out._base is None and torch.equal(past.grad, torch.ones_like(past))


def test_two_continuations_of_one_cached_prompt_match_recomputation():
    torch.manual_seed(0)
    m = UnifiedDecoder(UnifiedConfig(vocab_size=30, dim=16, depth=2, heads=2, max_len=40)).eval()
    ids = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(1))
    mod = torch.full_like(ids, TEXT)
    with torch.no_grad():
        prompt = m(ids[:, :6], mod[:, :6], use_cache=True).cache
        step = m(ids[:, 6:7], mod[:, 6:7], cache=prompt, use_cache=True).cache
        first = m(ids[:, 7:9], mod[:, 7:9], cache=step, use_cache=True).logits
        other = (ids[:, 6:7] + 1) % 30  # a second branch from `prompt`, written after the first one
        second = m(other, mod[:, 6:7], cache=prompt, use_cache=True).logits
        again = m(ids[:, 7:9], mod[:, 7:9], cache=step, use_cache=True).logits  # the first branch, once more
        full = m(ids, mod).logits
        full_other = m(torch.cat([ids[:, :6], other], dim=1), mod[:, :7]).logits
    torch.testing.assert_close(first, full[:, 7:9], rtol=0, atol=1e-5)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(second, full_other[:, 6:7], rtol=0, atol=1e-5)
