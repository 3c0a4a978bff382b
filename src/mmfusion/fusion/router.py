"""Dynamic-Router fusion: per-input learned gates over modalities, renormalised over present ones (seed 000)."""

from __future__ import annotations

import torch
from torch import nn

from mmfusion.fusion.base import Fusion, FusionOutput, masked_softmax, pool_modalities, zero_aux


class RouterFusion(Fusion):
    """Gate logits from the concatenated pooled modality vectors (+ presence bits); pooled = gate-weighted sum.

    Absent modalities are zero-filled in the router input and set to -inf before the softmax, so they get
    gate exactly 0 and the present gates sum to 1. pooled (B, D); tokens None; info["gates"] (B, M).
    prune_threshold: in eval mode, info["prune"] (B, M) bool marks present modalities whose gate is below
    it (candidates for dynamic modality pruning, seed 001 模态动态剪枝); nothing is dropped here.
    All modalities absent: pooled is a learned null vector, gates all 0. Ref: seed 000 (Dynamic-Router).
    """

    def __init__(
        self, modalities: list[str], dim: int, hidden: int | None = None, prune_threshold: float | None = None
    ):
        super().__init__(modalities, dim)
        m = len(self.modalities)
        hidden = hidden or dim
        self.norm = nn.LayerNorm(dim)
        self.router = nn.Sequential(nn.Linear(m * dim + m, hidden), nn.GELU(), nn.Linear(hidden, m))
        self.null = nn.Parameter(torch.zeros(dim))  # (D,)
        self.prune_threshold = prune_threshold

    def fuse(self, features: dict[str, torch.Tensor], present: torch.Tensor) -> FusionOutput:
        v = self.norm(pool_modalities(features, self.modalities))  # (B, M, D)
        v = torch.where(present[..., None], v, torch.zeros((), dtype=v.dtype, device=v.device))
        router_in = torch.cat([v.flatten(1), present.to(v.dtype)], dim=1)  # (B, M*D + M)
        gates = masked_softmax(self.router(router_in), present)  # (B, M)
        pooled = (gates[..., None] * v).sum(dim=1)
        pooled = torch.where(
            present.any(dim=1, keepdim=True), pooled, self.null.to(pooled.dtype).expand_as(pooled)
        )
        info = {"gates": gates}
        if self.prune_threshold is not None and not self.training:
            info["prune"] = present & (gates < self.prune_threshold)
        return FusionOutput(pooled, None, zero_aux(pooled), info)
