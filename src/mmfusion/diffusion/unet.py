"""The conv image branch of the joint denoiser (`image_net: unet`, docs/diffusion.md round 3): a small conv
U-Net whose bottleneck is the transformer's image tokens.

The 32 px image (unpatchified) goes through a conv encoder that halves the side log2(patch) times, so its
bottleneck is the patch grid: (S / patch)^2 tokens of `width`, the same tokens the linear patch embedding
gives. The transformer mixes them with the text tokens (as before, so each modality keeps its own timestep
and t2i / i2t / joint sampling are unchanged); a conv decoder upsamples them back to S px, adding the
encoder's features of the same side (the U-Net's skips), and a zero-initialised 3x3 conv gives the 3 output
channels (so the head starts at 0, as the linear head does). Every level is FiLM-conditioned (GroupNorm, then
scale and shift from the conditioning vector: the image timestep embedding plus, with text_summary, the text
summary), as in the DDPM / ADM U-Nets (Ho et al. 2020, arXiv:2006.11239; Dhariwal & Nichol 2021,
arXiv:2105.05233). Why: with a linear embedding of 8 x 8 patches the patches drew partial objects that did not
agree (round 2); convs see across patch borders at full resolution, and the tokens carry translation-equivariant
features the text head can read for image -> text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _groups(ch: int) -> int:
    return next(g for g in (8, 4, 2, 1) if ch % g == 0)


class FiLMBlock(nn.Module):
    """x + conv3x3(SiLU(GroupNorm(x) * (1 + scale) + shift)), (scale, shift) = Linear(cond); the residual
    conv is zero-initialised, so the block starts as the identity."""

    def __init__(self, ch: int, cond: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.film = nn.Linear(cond, 2 * ch)
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        for p in (self.film.weight, self.film.bias, self.conv.weight, self.conv.bias):
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, ch, H, W), cond (B, cond) -> (B, ch, H, W)."""
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        return x + self.conv(F.silu(self.norm(x) * (1 + scale) + shift))


class ConvEncoder(nn.Module):
    """(B, 3, S, S) -> image tokens (B, (S / patch)^2, width) and the per-level features (the skips).

    Levels at sides S, S/2, ..., 2 S / patch with `channels` x 1, 2, 4, ... channels: a conv (stride 2 after
    the first level) then a FiLM block; a last stride-2 conv gives the token grid."""

    def __init__(self, patch: int, channels: int, width: int, cond: int):
        super().__init__()
        levels = patch.bit_length() - 1  # log2(patch)
        self.chs = [channels * 2**k for k in range(levels)]
        self.convs = nn.ModuleList()
        self.blocks = nn.ModuleList()
        prev = 3
        for k, ch in enumerate(self.chs):
            self.convs.append(nn.Conv2d(prev, ch, 3, stride=1 if k == 0 else 2, padding=1))
            self.blocks.append(FiLMBlock(ch, cond))
            prev = ch
        self.to_tokens = nn.Conv2d(prev, width, 3, stride=2, padding=1)

    def forward(self, image: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips, h = [], image
        for k, (conv, block) in enumerate(zip(self.convs, self.blocks)):
            h = block(conv(h if k == 0 else F.silu(h)), cond)
            skips.append(h)
        tokens = self.to_tokens(F.silu(h))  # (B, width, g, g)
        return tokens.flatten(2).transpose(1, 2), skips


class ConvDecoder(nn.Module):
    """Image tokens (B, g^2, width) + the encoder's skips -> (B, 3, S, S): per level (deepest first) nearest
    2x upsampling, a conv to the level's channels plus the skip of that side, a FiLM block; then a
    zero-initialised conv3x3 to 3 channels."""

    def __init__(self, chs: list[int], width: int, cond: int):
        super().__init__()
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        prev = width
        for ch in reversed(chs):
            self.ups.append(nn.Conv2d(prev, ch, 3, padding=1))
            self.blocks.append(FiLMBlock(ch, cond))
            prev = ch
        self.norm = nn.GroupNorm(_groups(prev), prev)
        self.out = nn.Conv2d(prev, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor, skips: list[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
        b, n, w = tokens.shape
        g = int(round(n**0.5))
        h = tokens.transpose(1, 2).reshape(b, w, g, g)
        for up, block, skip in zip(self.ups, self.blocks, reversed(skips)):
            h = block(up(F.interpolate(F.silu(h), scale_factor=2, mode="nearest")) + skip, cond)
        return self.out(F.silu(self.norm(h)))


__all__ = ["ConvDecoder", "ConvEncoder", "FiLMBlock"]
