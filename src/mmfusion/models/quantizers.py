"""Quantizers of discrete tokenizers: EMA vector quantization and finite scalar quantization, with the codebook
statistics every quantizer reports.

Every quantizer maps z (..., D) -> (z_q, indices, info) with a straight-through estimator (gradients pass
from z_q to z unchanged), exposes `indices_to_codes(indices)` (the exact inverse of the code lookup) and
`usage_stats(indices)` (perplexity and fraction of codes used).

VectorQuantizer: codebook updated by exponential moving averages (no gradient), k-means initialisation from
the first training batch, dead-code replacement (a code whose EMA count falls below `dead_code_threshold`,
or that has been unused for `dead_code_patience` steps, is reset to a random encoder output of the current
batch), commitment loss `commitment * ||z - sg(z_q)||^2`.
FSQ: each of len(levels) channels is bounded with tanh and rounded to one of levels[i] values; no codebook.
ResidualVQ (residual_vq.py) stacks VectorQuantizers; vq_library.py wraps the `vector-quantize-pytorch`
library's quantizers behind the same interface (backend "vqtorch").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError

# "mmfusion": the quantizers of this module; "vqtorch": vq_library's adapters of vector-quantize-pytorch
BACKENDS = ("mmfusion", "vqtorch")
DEAD_CODE_SAMPLING = ("uniform", "error")


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage of a codebook by `indices` (any shape, ints in [0, codebook_size)).

    perplexity = exp(entropy of the code histogram) (1 .. codebook_size); usage = fraction of codes hit at
    least once; normalized_perplexity = perplexity / codebook_size.
    """
    counts = torch.bincount(indices.reshape(-1).long(), minlength=codebook_size).double()
    total = counts.sum().clamp_min(1.0)
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    perplexity = math.exp(entropy)
    return {
        "perplexity": perplexity,
        "normalized_perplexity": perplexity / codebook_size,
        "usage": (counts > 0).double().mean().item(),
    }


def kmeans(
    x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on x (N, D): (centres (k, D), counts (k,)). Seeds are random rows of x (with
    replacement if N < k); a cluster that empties keeps its previous centre."""
    n = x.shape[0]
    if n >= k:
        pick = torch.randperm(n, generator=generator, device="cpu")[:k]
    else:
        pick = torch.randint(0, n, (k,), generator=generator, device="cpu")
    centres = x[pick.to(x.device)].clone()
    counts = torch.zeros(k, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres, counts


class VectorQuantizer(nn.Module):
    """EMA vector quantizer over `codebook_size` codes of dimension `dim`.

    Codebook buffers (all saved): embed (K, D), cluster_size (K,) EMA of per-step counts, embed_avg (K, D) EMA
    of per-step sums, unused_steps (K,), initted. The EMA update, with n_k / s_k the batch count / sum of
    the vectors assigned to code k and Laplace smoothing eps:
        cluster_size = decay * cluster_size + (1 - decay) * n
        embed_avg    = decay * embed_avg    + (1 - decay) * s
        embed        = embed_avg / ((cluster_size + eps) / (N + K eps) * N),  N = cluster_size.sum()
    The batch is quantized with the codebook as it was before the update. Updates happen only in training
    mode; k-means initialisation (if `kmeans_init`) happens on the first training batch.

    Dead codes (training only, after the update): cluster_size < dead_code_threshold, or (if
    dead_code_patience) unused for >= dead_code_patience consecutive steps. Each is reset to a vector of the
    current batch, with cluster_size = max(dead_code_threshold, 1) and a fresh patience: a uniformly random one
    (dead_code_sampling="uniform"), or (="error") one drawn without replacement with probability proportional
    to its squared distance to its nearest code, so that new codes go where the codebook serves worst
    (k-means++-like seeding).
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
        dead_code_patience: int | None = None,
        dead_code_sampling: str = "uniform",
    ):
        super().__init__()
        if dead_code_sampling not in DEAD_CODE_SAMPLING:
            raise ConfigError(
                f"dead_code_sampling must be one of {DEAD_CODE_SAMPLING}; got {dead_code_sampling!r}"
            )
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay must be in [0, 1); got {decay}")
        if codebook_size < 1 or dim < 1:
            raise ConfigError(f"codebook_size and dim must be >= 1; got {codebook_size}, {dim}")
        self.dim, self.codebook_size = dim, codebook_size
        self.decay, self.eps, self.commitment = decay, eps, commitment
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_threshold, self.dead_code_patience = dead_code_threshold, dead_code_patience
        self.dead_code_sampling = dead_code_sampling
        embed = torch.randn(codebook_size, dim)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) -> codes (..., D) from the current codebook."""
        return F.embedding(indices.long(), self.embed)

    def usage_stats(self, indices: torch.Tensor) -> dict[str, float]:
        return codebook_usage(indices, self.codebook_size)

    @torch.no_grad()
    def _init_kmeans(self, flat: torch.Tensor) -> None:
        centres, counts = kmeans(flat, self.codebook_size, self.kmeans_iters)
        self.embed.copy_(centres)
        self.cluster_size.copy_(counts)
        self.embed_avg.copy_(centres * counts[:, None])
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.codebook_size).to(flat.dtype)
        sums = torch.zeros_like(self.embed).index_add_(0, idx, flat)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)

    @torch.no_grad()
    def _replace_dead(self, flat: torch.Tensor, err: torch.Tensor) -> int:
        dead = self.cluster_size < self.dead_code_threshold
        if self.dead_code_patience is not None:
            dead |= self.unused_steps >= self.dead_code_patience
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        n = flat.shape[0]
        if self.dead_code_sampling == "error" and n >= n_dead and bool((err > 0).sum() >= n_dead):
            # the worst-served vectors: drawn without replacement with probability ~ squared error
            pick = torch.multinomial(err.float().cpu(), n_dead, replacement=False)
        else:
            pick = torch.randperm(n)[:n_dead] if n >= n_dead else torch.randint(0, n, (n_dead,))
        fresh = flat[pick.to(flat.device)]
        size = max(self.dead_code_threshold, 1.0)
        self.embed[dead] = fresh
        self.embed_avg[dead] = fresh * size
        self.cluster_size[dead] = size
        self.unused_steps[dead] = 0
        return n_dead

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """z (..., D) -> z_q (..., D) (straight-through), indices (...), info: commit_loss (tensor),
        perplexity, usage, normalized_perplexity (this batch), replaced (dead codes reset this step)."""
        if z.shape[-1] != self.dim:
            raise DataError(f"VectorQuantizer expects last dim {self.dim}; got shape {tuple(z.shape)}")
        flat = z.detach().reshape(-1, self.dim).float()
        if self.training and not bool(self.initted):
            self._init_kmeans(flat)
        dist = (
            flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t() + self.embed.pow(2).sum(1)[None, :]
        )
        err, idx = dist.min(dim=1)
        err = err.clamp_min(0.0)  # the expanded distance can dip below 0 by rounding
        codes = F.embedding(idx, self.embed).view_as(z).to(z.dtype)
        replaced = 0
        if self.training:
            self._ema_update(flat, idx)
            if self.dead_code_threshold > 0 or self.dead_code_patience is not None:
                replaced = self._replace_dead(flat, err)
        commit = self.commitment * F.mse_loss(z, codes.detach())
        z_q = z + (codes - z).detach()
        indices = idx.view(z.shape[:-1])
        info: dict[str, Any] = {"commit_loss": commit, "replaced": replaced}
        info.update(self.usage_stats(idx))
        return z_q, indices, info


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): z (..., len(levels)) -> each channel i bounded by
    tanh and rounded to one of levels[i] values in [-1, 1]; codebook_size = prod(levels) (implicit).

    Channel i takes values (q - L_i // 2) / (L_i // 2), q in 0..L_i-1; index = sum_i q_i * prod(levels[:i]).
    """

    def __init__(self, levels: Sequence[int] = (8, 6, 5), eps: float = 1e-3):
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or min(levels) < 2:
            raise ConfigError(f"FSQ levels must be a non-empty list of ints >= 2; got {levels}")
        self.levels_list, self.eps = levels, eps
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=torch.long)
        self.register_buffer("basis", basis, persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        lv = self.levels.to(z.dtype)
        half_l = (lv - 1) * (1 - self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.long()[..., None] // self.basis) % self.levels
        half = (self.levels // 2).float()
        return (digits.float() - half) / half

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        half = (self.levels // 2).to(codes.dtype)
        digits = (codes * half + half).round().long()
        return (digits * self.basis).sum(dim=-1)

    def usage_stats(self, indices: torch.Tensor) -> dict[str, float]:
        return codebook_usage(indices, self.codebook_size)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        if z.shape[-1] != self.dim:
            raise DataError(f"FSQ expects last dim {self.dim} (= len(levels)); got shape {tuple(z.shape)}")
        bounded = self._bound(z.float())
        rounded = bounded + (bounded.round() - bounded).detach()
        half = (self.levels // 2).float()
        z_q = (rounded / half).to(z.dtype)
        indices = self.codes_to_indices(z_q.detach().float())
        info: dict[str, Any] = {"commit_loss": z.new_zeros(()), "replaced": 0}
        info.update(self.usage_stats(indices))
        return z_q, indices, info
