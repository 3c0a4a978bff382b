"""Early fusion: all modality tokens (+ type embeddings) and a [FUSE] token through one Transformer (seed 001)."""

from __future__ import annotations

import torch
from torch import nn

from mmfusion.fusion.base import Fusion, FusionOutput, concat_tokens, zero_aux, zero_invalid
from mmfusion.layers import Transformer, init_transformer_


class EarlyFusion(Fusion):
    """Concatenate every modality's tokens (plus a learned type embedding) after a [FUSE] token; one Transformer.

    Absent modalities are masked out as attention keys (bool attn_mask (B, 1, 1+N, 1+N), True = may attend).
    pooled (B, D) = final [FUSE] token; tokens (B, N, D) = the modality tokens, absent positions zeroed.
    All modalities absent: the [FUSE] token attends only to itself, so pooled is a learned null vector
    (the same for every such sample), never NaN. Ref: seed 001 (拼接式架构 / early fusion), ViLT.
    """

    def __init__(
        self, modalities: list[str], dim: int, depth: int = 2, heads: int = 4, mlp_ratio: float = 4.0
    ):
        super().__init__(modalities, dim)
        self.type_embed = nn.Parameter(torch.randn(len(self.modalities), dim) * 0.02)  # (M, D)
        self.fuse_token = nn.Parameter(torch.randn(dim) * 0.02)  # (D,)
        self.transformer = Transformer(dim, depth, heads, mlp_ratio)
        init_transformer_(self.transformer, dim, depth)
        self.ln_post = nn.LayerNorm(dim)

    def fuse(self, features: dict[str, torch.Tensor], present: torch.Tensor) -> FusionOutput:
        typed = {m: features[m] + self.type_embed[i] for i, m in enumerate(self.modalities)}
        tokens, valid = concat_tokens(typed, present, self.modalities)  # (B, N, D), (B, N)
        b = tokens.shape[0]
        x = torch.cat([self.fuse_token.expand(b, 1, -1).to(tokens.dtype), tokens], dim=1)  # (B, 1+N, D)
        keys = torch.cat([valid.new_ones(b, 1), valid], dim=1)  # (B, 1+N); [FUSE] is always a valid key
        attn_mask = keys[:, None, None, :].expand(-1, 1, x.shape[1], -1)  # (B, 1, 1+N, 1+N)
        x = self.ln_post(self.transformer(x, attn_mask=attn_mask))
        out_tokens = zero_invalid(x[:, 1:], valid)
        return FusionOutput(x[:, 0], out_tokens, zero_aux(x), {"token_mask": valid})
