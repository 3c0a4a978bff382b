"""Growing a KV cache without copying it every step: `append_kv`, an amortised `torch.cat` along positions.

Decoding one token at a time with `torch.cat([past, new], dim=2)` copies the whole cache every step: O(L) per
token, O(L^2) per sequence, which at batch 16 and a few hundred positions moves more bytes than the weights
do. `append_kv` instead keeps each layer's keys (and values) in a buffer with spare positions and returns a
view of its filled prefix; the next token is written into the spare room in place. When the room runs out the
buffer is re-allocated at twice the length (capped at the model's max_len), so each position is copied O(1)
times on average.

Safety: a cache may be extended twice from the same state (two continuations of one prompt). Only the view
whose length equals the buffer's filled length (the newest) is extended in place, and writes go to positions
no existing view covers; extending any older view copies into a fresh buffer, like `torch.cat`. With autograd
recording (training through a cache) it is always `torch.cat`, since in-place writes would invalidate saved
tensors.
"""

from __future__ import annotations

import torch

_FILLED = "_mmfusion_kv_filled"  # attribute on a buffer: how many positions of it some view exposes


def append_kv(past: torch.Tensor, new: torch.Tensor, max_len: int) -> torch.Tensor:
    """`torch.cat([past, new], dim=2)` for past (batch, heads, L, head_dim) and new (batch, heads, t, head_dim),
    returned as a view of a buffer with room for later positions (at most `max_len` in all)."""
    length, t = past.shape[2], new.shape[2]
    if torch.is_grad_enabled() and (past.requires_grad or new.requires_grad):
        return torch.cat([past, new], dim=2)
    buf = past._base
    if (
        buf is not None
        and getattr(buf, _FILLED, None) == length
        and buf.shape[2] >= length + t
        and buf.shape[:2] == past.shape[:2]
        and buf.dtype == new.dtype
        and past.data_ptr() == buf.data_ptr()
        and past.stride() == buf.stride()
    ):
        buf[:, :, length : length + t] = new
    else:
        capacity = min(max(2 * (length + t), 64), max_len)
        capacity = max(capacity, length + t)
        buf = new.new_empty(past.shape[0], past.shape[1], capacity, past.shape[3])
        buf[:, :, :length] = past
        buf[:, :, length : length + t] = new
    setattr(buf, _FILLED, length + t)
    return buf[:, :, : length + t]


__all__ = ["append_kv"]
