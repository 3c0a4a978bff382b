"""backend "vqtorch": the `vector-quantize-pytorch` library's (lucidrains) quantizers behind the interface of
mmfusion.models.quantizers: LibVectorQuantizer (its VectorQuantize) and LibFSQ (its FSQ); ResidualVQ with
backend="vqtorch" stacks LibVectorQuantizers. The library is imported when one is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .quantizers import codebook_usage


class LibVectorQuantizer(nn.Module):
    """`vector_quantize_pytorch.VectorQuantize` (EMA codebook, k-means init, dead-code expiry) behind the
    VectorQuantizer interface: z (..., D) -> (z_q, indices (...), info with commit_loss, replaced, usage stats).

    Library semantics that differ from VectorQuantizer: dead codes are those with EMA count below
    `dead_code_threshold` only (no patience rule) and are reset to random vectors of the current batch with
    count `dead_code_threshold`; `rotation_trick` (its default for dim > 1) replaces the straight-through
    gradient by the rotation trick (Fifty et al. 2024), off here unless asked for. The codebook buffers live
    under `vq._codebook` (embed (1, K, D), embed_avg, cluster_size (1, K), initted) and are saved with it.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment: float = 0.25,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 1.0,
        rotation_trick: bool = False,
    ):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay must be in [0, 1); got {decay}")
        if codebook_size < 1 or dim < 1:
            raise ConfigError(f"codebook_size and dim must be >= 1; got {codebook_size}, {dim}")
        self.dim, self.codebook_size = dim, codebook_size
        self.decay, self.dead_code_threshold, self.commitment = decay, dead_code_threshold, commitment
        self.vq = VectorQuantize(
            dim,
            codebook_size,
            decay=decay,
            eps=eps,
            commitment_weight=commitment,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=dead_code_threshold,
            rotation_trick=rotation_trick,
        )

    @property
    def embed(self) -> torch.Tensor:
        """The codebook (K, D)."""
        return self.vq._codebook.embed[0]

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) -> codes (..., D) from the current codebook."""
        return self.vq.get_output_from_indices(indices.long())

    def usage_stats(self, indices: torch.Tensor) -> dict[str, float]:
        return codebook_usage(indices, self.codebook_size)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """z (..., D) -> z_q (..., D), indices (...), info: commit_loss (tensor, 0 in eval mode), perplexity,
        usage, normalized_perplexity (this batch), replaced (dead codes reset this step)."""
        if z.shape[-1] != self.dim:
            raise DataError(f"LibVectorQuantizer expects last dim {self.dim}; got shape {tuple(z.shape)}")
        flat = z.reshape(1, -1, self.dim)  # the library wants (batch, tokens, dim)
        before = self.vq._codebook.cluster_size[0].clone() if self.training else None
        z_q, idx, commit = self.vq(flat)
        idx = idx.reshape(-1)
        replaced = 0
        if before is not None and self.dead_code_threshold > 0:
            # the library does not report it: codes whose EMA count fell below the threshold this step
            counts = torch.bincount(idx, minlength=self.codebook_size).to(before.dtype)
            after = before * self.decay + counts * (1 - self.decay)
            replaced = min(int((after < self.dead_code_threshold).sum()), idx.numel())
        info: dict[str, Any] = {"commit_loss": commit.reshape(()), "replaced": replaced}
        info.update(self.usage_stats(idx))
        return z_q.reshape(z.shape), idx.view(z.shape[:-1]), info


class LibFSQ(nn.Module):
    """`vector_quantize_pytorch.FSQ` behind the FSQ interface: z (..., len(levels)) -> (z_q in [-1, 1],
    indices (...), info). `noise_dropout` > 0 (with the library's symmetry-preserving rounding, Zhang et al.
    2024) replaces that fraction of the rounded values by a random offset in training."""

    def __init__(self, levels: Sequence[int] = (8, 6, 5), noise_dropout: float = 0.0):
        super().__init__()
        from vector_quantize_pytorch import FSQ as _LibFSQ

        levels = [int(v) for v in levels]
        if not levels or min(levels) < 2:
            raise ConfigError(f"FSQ levels must be a non-empty list of ints >= 2; got {levels}")
        if not 0.0 <= noise_dropout < 1.0:
            raise ConfigError(f"noise_dropout must be in [0, 1); got {noise_dropout}")
        self.levels_list, self.dim = levels, len(levels)
        self.codebook_size = math.prod(levels)
        self.fsq = _LibFSQ(levels, preserve_symmetry=noise_dropout > 0, noise_dropout=noise_dropout)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) -> codes (..., len(levels)) in [-1, 1]."""
        # flattened: the library reads a (B, H, W) index grid as an image and puts the channels first
        codes = self.fsq.indices_to_codes(indices.long().reshape(1, -1))
        return codes.reshape(*indices.shape, self.dim)

    def usage_stats(self, indices: torch.Tensor) -> dict[str, float]:
        return codebook_usage(indices, self.codebook_size)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        if z.shape[-1] != self.dim:
            raise DataError(f"FSQ expects last dim {self.dim} (= len(levels)); got shape {tuple(z.shape)}")
        z_q, indices = self.fsq(z.reshape(1, -1, self.dim))
        info: dict[str, Any] = {"commit_loss": z.new_zeros(()), "replaced": 0}
        info.update(self.usage_stats(indices))
        return z_q.reshape(z.shape).to(z.dtype), indices.view(z.shape[:-1]).long(), info
