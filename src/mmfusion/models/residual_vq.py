"""Residual vector quantization: a stack of VectorQuantizers (backend "mmfusion") or of the
vector-quantize-pytorch library's (backend "vqtorch"), each quantizing what the levels before it left over."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .quantizers import BACKENDS, VectorQuantizer, codebook_usage
from .vq_library import LibVectorQuantizer

COMMITMENT_PER_LEVEL = ("sum", "mean", "final")


class ResidualVQ(nn.Module):
    """`num_levels` EMA VectorQuantizers; level l quantizes the residual z - (codes of levels < l).

    indices are (..., num_levels); z_q = sum of the level codes (straight-through to z as a whole);
    info["commit_loss"] sums the levels' commitment losses; `forward(z, num_levels=n)` uses the first n
    levels only (coarser reconstruction, same codebooks). backend "vqtorch" makes each level a
    LibVectorQuantizer (the library's VectorQuantize); the residual loop is this one, which is what the
    library's own ResidualVQ does without beam search (it has no first-n-levels forward).

    quantize_dropout (opt-in, as in SoundStream and the library's `quantize_dropout`): in training mode a
    forward without `num_levels` uses the first n levels with n drawn uniformly from
    {quantize_dropout_cutoff, ..., num_levels} (torch's global RNG), so that every prefix of levels is trained
    to reconstruct; the skipped levels see no batch and get no codebook update. Eval mode always uses all
    levels. commitment_per_level: "sum" (default) adds the levels' commitment losses (level l pulls z towards
    the sum of the codes of levels <= l, so level 1 pulls it onto its coarse code as a plain VQ would), "mean"
    averages them over the levels used (EnCodec), "final" replaces them by one term, commitment *
    ||z - sg(sum of all levels' codes)||^2: the VQ-VAE commitment of the RVQ as one quantizer (computed in
    eval mode too, for either backend). At depth 1 all three are the same loss.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_levels: int = 4,
        backend: str = "mmfusion",
        quantize_dropout: bool = False,
        quantize_dropout_cutoff: int = 1,
        commitment_per_level: str = "sum",
        **vq_kwargs: Any,
    ):
        super().__init__()
        if num_levels < 1:
            raise ConfigError(f"num_levels must be >= 1; got {num_levels}")
        if not 1 <= quantize_dropout_cutoff <= num_levels:
            raise ConfigError(
                f"quantize_dropout_cutoff must be in [1, num_levels={num_levels}]; got {quantize_dropout_cutoff}"
            )
        if commitment_per_level not in COMMITMENT_PER_LEVEL:
            raise ConfigError(
                f"commitment_per_level must be one of {COMMITMENT_PER_LEVEL}; got {commitment_per_level!r}"
            )
        self.quantize_dropout, self.quantize_dropout_cutoff = quantize_dropout, quantize_dropout_cutoff
        self.commitment_per_level = commitment_per_level
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}; got {backend!r}")
        self.dim, self.codebook_size, self.num_levels = dim, codebook_size, num_levels
        level_cls = VectorQuantizer if backend == "mmfusion" else LibVectorQuantizer
        self.levels = nn.ModuleList(level_cls(dim, codebook_size, **vq_kwargs) for _ in range(num_levels))

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (..., n) with n <= num_levels -> summed codes (..., D)."""
        out = None
        for level in range(indices.shape[-1]):
            c = self.levels[level].indices_to_codes(indices[..., level])
            out = c if out is None else out + c
        return out

    def usage_stats(self, indices: torch.Tensor) -> dict[str, Any]:
        """Per-level stats plus their mean under the plain keys."""
        per = [codebook_usage(indices[..., i], self.codebook_size) for i in range(indices.shape[-1])]
        out: dict[str, Any] = {k: sum(p[k] for p in per) / len(per) for k in per[0]}
        out["levels"] = per
        return out

    def forward(
        self, z: torch.Tensor, num_levels: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        n = self.num_levels if num_levels is None else num_levels
        if (
            num_levels is None
            and self.training
            and self.quantize_dropout
            and self.quantize_dropout_cutoff < n
        ):
            n = int(torch.randint(self.quantize_dropout_cutoff, self.num_levels + 1, ()))
        if not 1 <= n <= self.num_levels:
            raise ConfigError(f"num_levels must be in [1, {self.num_levels}]; got {n}")
        residual, total = z, torch.zeros_like(z)
        all_idx, commit, replaced = [], z.new_zeros(()), 0
        for level in self.levels[:n]:
            q, idx, info = level(residual)
            q = q.detach()
            residual = residual - q
            total = total + q
            all_idx.append(idx)
            commit = commit + info["commit_loss"]
            replaced += info["replaced"]
        if self.commitment_per_level == "mean":
            commit = commit / n
        elif self.commitment_per_level == "final":
            commit = self.levels[0].commitment * F.mse_loss(z, total.detach())
        indices = torch.stack(all_idx, dim=-1)
        z_q = z + (total - z).detach()
        info = {"commit_loss": commit, "replaced": replaced}
        info.update(self.usage_stats(indices))
        return z_q, indices, info
