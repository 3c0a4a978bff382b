"""Building blocks of the fusion model: an encoder from its config, its token width, modality dropout, the head."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..modalities import MODALITIES, EncoderConfigBase


def build_encoder(cfg: EncoderConfigBase) -> nn.Module:
    """Encoder module for one config (its modality's builder); it is used through `forward_tokens` -> (B, N,
    width)."""
    if cfg.kind == "text" and getattr(cfg, "hf", None):  # a pretrained transformers encoder (models.hf_text)
        from .hf_text import HFTextTower

        return HFTextTower(cfg.hf, None, cfg.pooling, cfg.freeze, cfg.context_length, key="encoders.text.hf")
    enc = MODALITIES[cfg.kind].build_encoder(cfg)
    # Only the token path is used here (the model projects tokens itself), so a pooled projection would be
    # a parameter without gradients (DDP rejects those): replace it.
    if hasattr(enc, "proj"):
        enc.proj = nn.Identity()
    return enc


def token_width(encoder: nn.Module) -> int:
    """Width of `encoder.forward_tokens` outputs: its `width` attribute, else its LayerNorm's size."""
    if isinstance(getattr(encoder, "width", None), int):
        return encoder.width
    for name in ("ln_final", "ln_post"):
        ln = getattr(encoder, name, None)
        if isinstance(ln, nn.LayerNorm):
            return int(ln.normalized_shape[0])
    raise ConfigError(
        f"cannot tell the token width of {type(encoder).__name__}: give it an int attribute `width`"
    )


def modality_dropout(
    masks: Mapping[str, torch.Tensor], p: float, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Drop each present modality of each sample with probability p, never all of a sample's modalities.

    masks: modality -> bool (B,), True = present. A sample whose every present modality was drawn for dropping
    keeps one of them, chosen uniformly. Samples with nothing present stay empty. Returns new masks.
    """
    names = list(masks)
    present = torch.stack([masks[m] for m in names], dim=1)  # (B, M)
    if p <= 0:
        return dict(masks)
    device = present.device
    drop = torch.rand(present.shape, generator=generator, device=device) < p
    keep = present & ~drop
    emptied = present.any(dim=1) & ~keep.any(dim=1)  # (B,)
    score = torch.rand(present.shape, generator=generator, device=device).masked_fill(~present, -1.0)
    rescue = F.one_hot(score.argmax(dim=1), len(names)).bool() & emptied[:, None]
    keep = keep | rescue
    return {m: keep[:, i] for i, m in enumerate(names)}


class Head(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear on the pooled fusion output: (B, D) -> (B, out)."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


__all__ = ["Head", "build_encoder", "modality_dropout", "token_width"]
