"""Late fusion: per-modality pooled vectors merged by learned attention over present modalities (seed 001)."""

from __future__ import annotations

import torch
from torch import nn

from mmfusion.fusion.base import Fusion, FusionOutput, masked_softmax, pool_modalities, zero_aux


class LateFusion(Fusion):
    """Mean-pool each modality, score it against a learned query, softmax over present modalities, weighted sum.

    pooled (B, D); tokens None; info["weights"] (B, M), exactly 0 for absent modalities.
    All modalities absent: pooled is a learned null vector (weights all 0), never NaN.
    Ref: seed 001 (分层式架构 / late fusion "通过注意力机制合并"), attention pooling (Ilse et al. 2018).
    """

    def __init__(self, modalities: list[str], dim: int):
        super().__init__(modalities, dim)
        self.norm = nn.LayerNorm(dim)
        self.key = nn.Linear(dim, dim)
        self.query = nn.Parameter(torch.randn(dim) * dim**-0.5)  # (D,)
        self.null = nn.Parameter(torch.zeros(dim))  # (D,) returned when nothing is present

    def fuse(self, features: dict[str, torch.Tensor], present: torch.Tensor) -> FusionOutput:
        v = self.norm(pool_modalities(features, self.modalities))  # (B, M, D)
        scores = self.key(v) @ self.query.to(v.dtype) * self.dim**-0.5  # (B, M)
        weights = masked_softmax(scores, present)
        pooled = (weights[..., None] * v).sum(dim=1)
        any_present = present.any(dim=1, keepdim=True)
        pooled = torch.where(any_present, pooled, self.null.to(pooled.dtype).expand_as(pooled))
        return FusionOutput(pooled, None, zero_aux(pooled), {"weights": weights})
