"""Attention pieces of the unified decoder: rotary positions, per-modality masks, top-k and block-sparse attention.

Shapes: q (batch, heads, queries, head_dim); k, v (batch, heads, keys, head_dim). Queries sit at absolute
positions ``k_len - q_len .. k_len - 1`` (the newest tokens; earlier keys come from the KV cache). Boolean
masks use one polarity everywhere: **True = the query may attend to the key**.

- Rotary position embedding (RoPE): Su et al. 2021, "RoFormer" (rotate-half form, as in GPT-NeoX / LLaMA).
- Sliding window over image tokens (seed 003 "per-modality context windows"): a query at an IMAGE token sees
  only the last ``window`` keys (itself included); every other query sees its whole causal prefix.
- Top-k dynamic sparse attention: Gupta et al. 2021, "Memory-efficient Transformers via Top-k Attention"
  (seed 003, requirement A10). Each query keeps its ``k`` largest allowed scores and renormalises over them.
  This reference implementation materialises the full score matrix, so on CPU it *costs* more than dense
  attention (scores + top-k + scatter); it bounds the number of non-zero weights, not the work.
- `blocked_window_attention` is the variant that does save work: queries are processed in groups, and a
  group of image queries reads only the keys its window can reach (block-sparse attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError

IMAGE_MODALITY = 1  # == model.IMAGE; repeated here so this module has no import cycle with model.py


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (len(positions), head_dim) for rotate-half RoPE at integer `positions` (Su et al. 2021)."""
    if head_dim % 2:
        raise ConfigError(f"rotary embeddings need an even head dimension; got {head_dim}")
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (..., T, head_dim) by the angles in cos/sin (T, head_dim): x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def position_mask(
    q_pos: torch.Tensor, q_modality: torch.Tensor, k_pos: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """Causal (+ image sliding window) mask, bool (batch, 1, len(q_pos), len(k_pos)), True = may attend.

    q_pos (Q,) and k_pos (K,) are absolute positions; q_modality (batch, Q) the queries' modality ids.
    """
    qp, kp = q_pos[:, None], k_pos[None, :]
    causal = kp <= qp  # (Q, K)
    if window is None:
        return causal.expand(q_modality.shape[0], 1, *causal.shape)
    is_image = (q_modality == IMAGE_MODALITY)[:, None, :, None]  # (batch, 1, Q, 1)
    return causal & ((kp > qp - window) | ~is_image)


def attention_mask(q_modality: torch.Tensor, k_len: int, window: int | None = None) -> torch.Tensor:
    """`position_mask` for queries that are the last q_len of k_len positions: bool (batch, 1, q_len, k_len).

    q_modality: (batch, q_len) modality ids of the queries.
    """
    q_len = q_modality.shape[1]
    device = q_modality.device
    return position_mask(
        torch.arange(k_len - q_len, k_len, device=device),
        q_modality,
        torch.arange(k_len, device=device),
        window,
    )


def max_abs_logit(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """max |q·k| / sqrt(head_dim) over allowed query-key pairs, a detached 0-d tensor (stability monitor)."""
    with torch.no_grad():
        s = (q.detach().float() @ k.detach().float().transpose(-2, -1)).abs() / math.sqrt(q.shape[-1])
        if mask is not None:
            s = s.masked_fill(~mask, 0.0)
        else:  # no mask given: causal over the last q_len of k_len positions
            q_len, k_len = q.shape[-2], k.shape[-2]
            causal = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
            s = s.masked_fill(~causal, 0.0)
        return s.amax()


def topk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, topk: int, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k sparse attention (Gupta et al. 2021): softmax over each query's `topk` largest allowed scores.

    mask: bool (batch|1, 1, q_len, k_len), True = may attend, or a float additive mask (-inf = may not attend;
    e.g. the modality gate's log g). Returns (output (B, H, q_len, head_dim),
    weights (B, H, q_len, k_len)) — at most `topk` non-zero weights per query; identical to dense masked
    attention when `topk` >= the number of allowed keys.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, q_len, k_len): the full matrix is materialised
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    if topk < scores.shape[-1]:
        idx = scores.topk(topk, dim=-1).indices
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = scores.softmax(dim=-1)
    if dropout_p:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights


def window_plan(q_modality: torch.Tensor, window: int, block: int) -> list[tuple[torch.Tensor, int, int]]:
    """Query groups of `blocked_window_attention` and the key range each reads: [(query positions, k_lo, k_hi)].

    Positions that are IMAGE in every batch row form groups of up to `block` consecutive image positions,
    reading keys [first - window + 1, last + 1); the other positions (text, audio, mixed) form groups of up to
    `block` that read the causal prefix [0, last + 1).
    """
    image = (q_modality == IMAGE_MODALITY).all(0)  # (T,)
    plan = []
    img = image.nonzero().flatten()
    for group in img.split(block):
        plan.append((group, max(0, int(group[0]) - window + 1), int(group[-1]) + 1))
    for group in (~image).nonzero().flatten().split(block):
        plan.append((group, 0, int(group[-1]) + 1))
    return plan


def blocked_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_modality: torch.Tensor, window: int, block: int = 128
) -> torch.Tensor:
    """Causal attention with the image sliding window that skips the work outside the window (block-sparse).

    Groups of up to `block` image queries read only the keys their window reaches; groups of the other
    queries read their causal prefix (see `window_plan`). Equal to
    `scaled_dot_product_attention(q, k, v, attention_mask(q_modality, k_len, window))` (tested).
    Self-attention without a cache: q_len == k_len.
    """
    t = q.shape[-2]
    if k.shape[-2] != t:
        raise ConfigError(f"blocked_window_attention needs q_len == k_len; got {t} and {k.shape[-2]}")
    out = torch.empty_like(q)
    for pos, lo, hi in window_plan(q_modality, window, block):
        mask = position_mask(pos, q_modality[:, pos], torch.arange(lo, hi, device=q.device), window)
        y = F.scaled_dot_product_attention(q[..., pos, :], k[..., lo:hi, :], v[..., lo:hi, :], attn_mask=mask)
        out[..., pos, :] = y
    return out


def attention_pairs(q_modality: torch.Tensor, window: int | None, block: int | None = None) -> int:
    """Query-key pairs per head for self-attention over q_modality (batch, T).

    block=None: the allowed pairs (the non-zeros of `attention_mask`); block=B: the pairs
    `blocked_window_attention` evaluates with that block size.
    """
    b, t = q_modality.shape
    if block is None:
        return int(attention_mask(q_modality, t, window).sum())
    return b * sum(len(pos) * (hi - lo) for pos, lo, hi in window_plan(q_modality, window, block))
