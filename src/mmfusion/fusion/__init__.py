"""Fusion strategies behind one interface (`Fusion` -> `FusionOutput`) and an explicit name -> class table."""

from __future__ import annotations

from mmfusion.errors import ConfigError
from mmfusion.fusion.base import AllModalitiesAbsentError, Fusion, FusionOutput
from mmfusion.fusion.cross_attention import (
    CrossAttentionFusion,
    CrossModalAttentionUnit,
    GatedCrossAttentionBlock,
)
from mmfusion.fusion.early import EarlyFusion
from mmfusion.fusion.late import LateFusion
from mmfusion.fusion.moe import MoEFusion
from mmfusion.fusion.router import RouterFusion

FUSIONS: dict[str, type[Fusion]] = {
    "early": EarlyFusion,
    "late": LateFusion,
    "cross_attention": CrossAttentionFusion,
    "router": RouterFusion,
    "moe": MoEFusion,
}


def build_fusion(name: str, modalities: list[str], dim: int, **kwargs) -> Fusion:
    """Build the fusion strategy `name` (a key of FUSIONS) over `modalities` at width `dim`; kwargs go to its constructor."""
    if name not in FUSIONS:
        raise ConfigError(f"unknown fusion {name!r}; allowed: {', '.join(sorted(FUSIONS))}")
    return FUSIONS[name](modalities, dim, **kwargs)


__all__ = [
    "FUSIONS",
    "AllModalitiesAbsentError",
    "CrossAttentionFusion",
    "CrossModalAttentionUnit",
    "EarlyFusion",
    "Fusion",
    "FusionOutput",
    "GatedCrossAttentionBlock",
    "LateFusion",
    "MoEFusion",
    "RouterFusion",
    "build_fusion",
]
