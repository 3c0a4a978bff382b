"""Cross-modal attention fusion: CMAU (seed 001) and Flamingo's tanh-gated cross-attention block."""

from __future__ import annotations

import torch
from torch import nn

from mmfusion.fusion.base import Fusion, FusionOutput, concat_tokens, zero_aux
from mmfusion.layers import MLP, attention


class CrossAttention(nn.Module):
    """Multi-head attention with queries from x and keys/values from a context, through SDPA.

    x (B, Nq, D), context (B, Nk, D), key_valid bool (B, Nk) True = may attend -> (B, Nq, D).
    Query rows with no valid key get 0 (not NaN), so residual blocks pass them through unchanged.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        b, nq, d = x.shape
        nk, h = context.shape[1], self.heads
        q = self.q(x).view(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, nk, 2, h, d // h).permute(2, 0, 3, 1, 4)
        has_key = key_valid.any(dim=1)  # (B,)
        # Rows without keys attend to everything (finite, zero-filled context) and are zeroed below.
        mask = (key_valid | ~has_key[:, None])[:, None, None, :]  # (B, 1, 1, Nk)
        y = attention(q, k, v, attn_mask=mask)
        y = self.out(y.transpose(1, 2).reshape(b, nq, d))
        return torch.where(has_key[:, None, None], y, torch.zeros((), dtype=y.dtype, device=y.device))


class CrossModalAttentionUnit(nn.Module):
    """CMAU: queries from one modality's tokens, keys/values from all present tokens; residual + MLP (pre-LN).

    x (B, Nq, D), context (B, Nk, D), key_valid bool (B, Nk) -> (B, Nq, D). Ref: seed 001 (跨模态注意力单元 CMAU).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(width)
        self.attn = CrossAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_q(x), self.ln_kv(context), key_valid)
        return x + self.mlp(self.ln_2(x))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo gated xattn-dense: x + tanh(a_attn) * xattn(x, ctx), then x + tanh(a_ff) * ff(x).

    Shapes as CrossModalAttentionUnit. Both alphas start at 0, so at init the block is exactly the identity
    and a pretrained query stream is undisturbed. Ref: Alayrac et al. 2022 (Flamingo), seed 002 (FLAMINGO).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(width)
        self.attn = CrossAttention(width, heads)
        self.alpha_attn = nn.Parameter(torch.zeros(()))
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))
        self.alpha_ff = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        x = x + self.alpha_attn.tanh() * self.attn(self.ln_q(x), self.ln_kv(context), key_valid)
        return x + self.alpha_ff.tanh() * self.mlp(self.ln_2(x))


class CrossAttentionFusion(Fusion):
    """Stack of cross-modal units on one query modality's tokens.

    gated=False: CrossModalAttentionUnit, keys = all present modalities (query modality included, as in CMAU).
    gated=True:  GatedCrossAttentionBlock, keys = the other present modalities (Flamingo).
    pooled (B, D) = mean of the query stream; tokens (B, Nq, D) = the query stream.
    Absent query modality: its tokens are replaced by a learned null query token (repeated), so the output
    depends only on the present modalities. All modalities absent: raises AllModalitiesAbsentError
    (a ValueError naming the samples). Ref: seed 001 (CMAU), Flamingo.
    """

    def __init__(
        self,
        modalities: list[str],
        dim: int,
        query_modality: str,
        gated: bool = False,
        depth: int = 1,
        heads: int = 4,
        mlp_ratio: float = 4.0,
    ):
        super().__init__(modalities, dim)
        if query_modality not in self.modalities:
            raise ValueError(f"query_modality {query_modality!r} is not one of {self.modalities}")
        self.query_modality = query_modality
        self.gated = gated
        self.context_modalities = [m for m in self.modalities if not gated or m != query_modality]
        if not self.context_modalities:
            raise ValueError("gated cross-attention needs at least one modality besides the query modality")
        unit = GatedCrossAttentionBlock if gated else CrossModalAttentionUnit
        self.blocks = nn.ModuleList(unit(dim, heads, mlp_ratio) for _ in range(depth))
        self.null_query = nn.Parameter(torch.randn(dim) * 0.02)  # (D,)
        self.ln_post = nn.LayerNorm(dim)

    def fuse(self, features: dict[str, torch.Tensor], present: torch.Tensor) -> FusionOutput:
        self._raise_if_all_absent(present)
        qi = self.modalities.index(self.query_modality)
        x = features[self.query_modality]  # (B, Nq, D)
        x = torch.where(present[:, qi, None, None], x, self.null_query.to(x.dtype).expand_as(x))
        ci = [self.modalities.index(m) for m in self.context_modalities]
        context, key_valid = concat_tokens(features, present[:, ci], self.context_modalities)
        for block in self.blocks:
            x = block(x, context, key_valid)
        x = self.ln_post(x)
        return FusionOutput(x.mean(dim=1), x, zero_aux(x), {"query_present": present[:, qi]})
