"""Discrete tokenizers: EMA vector quantization, residual VQ, finite scalar quantization, a VQ-VAE for images
and log-mel spectrograms, and the audio front end that turns waveforms into the VQ-VAE's [-1, 1] input.

Every quantizer maps z (..., D) -> (z_q, indices, info) with a straight-through estimator (gradients pass
from z_q to z unchanged), exposes `indices_to_codes(indices)` (the exact inverse of the code lookup) and
`usage_stats(indices)` (perplexity and fraction of codes used).

VectorQuantizer: codebook updated by exponential moving averages (no gradient), k-means initialisation from
the first training batch, dead-code replacement (a code whose EMA count falls below `dead_code_threshold`,
or that has been unused for `dead_code_patience` steps, is reset to a random encoder output of the current
batch), commitment loss `commitment * ||z - sg(z_q)||^2`.
ResidualVQ: `num_levels` VectorQuantizers, level l quantizes what levels < l left over.
FSQ: each of len(levels) channels is bounded with tanh and rounded to one of levels[i] values; no codebook.

backend "vqtorch": the same three quantizers from the `vector-quantize-pytorch` library (lucidrains), wrapped
behind this interface: LibVectorQuantizer (its VectorQuantize), ResidualVQ(backend="vqtorch") (levels of
LibVectorQuantizer) and LibFSQ (its FSQ).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..modalities.audio import LOG_MEL_EPS, LOG_MEL_MEAN, LOG_MEL_STD, WaveLike, preprocess_audios
from .persistence import load_weights, read_config, save_folder

MODEL_TYPE = "vqvae"
QUANTIZERS = ("vq", "rvq", "fsq")
BACKENDS = ("mmfusion", "vqtorch")
DEAD_CODE_SAMPLING = ("uniform", "error")
# VQVAE arguments added after its first release, with their defaults (see VQVAE.config)
LATER_DEFAULTS = {
    "backend": "mmfusion",
    "dead_code_sampling": "uniform",
    "rotation_trick": False,
    "fsq_noise_dropout": 0.0,
    "quantize_dropout": False,
    "quantize_dropout_cutoff": 1,
    "commitment_per_level": "sum",
}
COMMITMENT_PER_LEVEL = ("sum", "mean", "final")


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


# ---- vector-quantize-pytorch backend ----------------------------------------------------------------------


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


# ---- VQ-VAE -----------------------------------------------------------------------------------------------


class _ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@dataclass
class VQVAEOutput:
    recon: torch.Tensor  # (B, C, H, W) in roughly [-1, 1]
    indices: torch.Tensor  # (B, h, w) or (B, h, w, levels) for rvq
    loss: torch.Tensor  # recon_loss + commit_loss
    recon_loss: torch.Tensor
    commit_loss: torch.Tensor
    info: dict[str, Any]


def check_image_range(images: torch.Tensor, channels: int = 3) -> None:
    """Raise DataError unless `images` is a float (B, channels, H, W) batch that looks like [-1, 1] values."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != channels:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"VQVAE expects a (B, {channels}, H, W) float tensor in [-1, 1]; got {shape}")
    if not images.is_floating_point():
        raise DataError(
            f"VQVAE expects float images in [-1, 1]; got dtype {images.dtype} "
            "(use mmfusion.modalities.image.preprocess_images to convert [0, 255] pixels)"
        )
    hi, lo = images.max().item(), images.min().item()
    if hi > 1.5 or lo < -1.5:
        raise DataError(
            f"VQVAE expects images in [-1, 1]; got values in [{lo:.3g}, {hi:.3g}], which looks like "
            "[0, 255] pixels (use mmfusion.modalities.image.preprocess_images; for audio, AudioFrontEnd)"
        )


# ---- audio front end ----------------------------------------------------------------------------------------

# The project's log-mel (modalities/audio.py) is (ln(mel + 1e-6) - LOG_MEL_MEAN) / LOG_MEL_STD. Its floor is
# digital silence (ln 1e-6 -> -1.70); mel power 1 (ln 1 = 0 -> +1.75) is above anything a [-1, 1] waveform
# reaches (full-scale sines at 220 Hz - 4 kHz peak at +1.29 to +1.46). That interval maps linearly onto [-1, 1].
SPEC_LOW = (math.log(LOG_MEL_EPS) - LOG_MEL_MEAN) / LOG_MEL_STD  # silence -> -1
SPEC_HIGH = (0.0 - LOG_MEL_MEAN) / LOG_MEL_STD  # mel power 1 -> +1


def normalize_log_mel(log_mels: torch.Tensor) -> torch.Tensor:
    """Project log-mel (any shape) -> [-1, 1]: linear map of [SPEC_LOW, SPEC_HIGH] onto [-1, 1], clamped."""
    return ((log_mels - SPEC_LOW) * (2.0 / (SPEC_HIGH - SPEC_LOW)) - 1.0).clamp(-1.0, 1.0)


def denormalize_log_mel(x: torch.Tensor) -> torch.Tensor:
    """Inverse of normalize_log_mel on [-1, 1]: back to the project's log-mel units (AudioEncoder's input)."""
    return (x.clamp(-1.0, 1.0) + 1.0) * ((SPEC_HIGH - SPEC_LOW) / 2.0) + SPEC_LOW


@dataclass(frozen=True)
class AudioFrontEnd:
    """Waveforms -> (B, 1, n_mels, frames) spectrogram "images" in [-1, 1] for `VQVAE(in_channels=1)`.

    Each wave is mixed to mono, resampled to `sample_rate`, trimmed or zero-padded to `seconds`, turned into the
    project's log-mel by `preprocess_audios` (25 ms / 10 ms Hann STFT, HTK mel), mapped to [-1, 1] by
    `normalize_log_mel` (silence -> -1), and right-padded with silence (-1) to a multiple of 4 frames so the
    VQ-VAE's two stride-2 convs divide it (0.5 s at 16 kHz: 51 -> 52 frames). `inverse` gives back log-mels;
    no waveform is reconstructed (there is no vocoder: decoded tokens are spectrograms only).
    """

    sample_rate: int = 16000
    seconds: float = 0.5
    n_mels: int = 64
    hop: int = 160

    def __post_init__(self):
        if self.sample_rate < 1000 or self.seconds <= 0 or self.n_mels < 4 or self.n_mels % 4:
            raise ConfigError(
                "AudioFrontEnd needs sample_rate >= 1000, seconds > 0 and n_mels a positive multiple of 4; "
                f"got sample_rate={self.sample_rate}, seconds={self.seconds}, n_mels={self.n_mels}"
            )

    @property
    def frames(self) -> int:
        """Valid log-mel frames of one clip (before padding to a multiple of 4)."""
        return 1 + int(round(self.seconds * self.sample_rate)) // self.hop

    @property
    def shape(self) -> tuple[int, int]:
        """(n_mels, padded frames): the VQVAE `input_shape` to use."""
        return self.n_mels, -(-self.frames // 4) * 4

    def __call__(self, waves: Sequence[WaveLike], sample_rates: int | Sequence[int]) -> torch.Tensor:
        """waves (any PCM dtype, mono or multi-channel) -> (B, 1, n_mels, padded frames) float in [-1, 1]."""
        mels, _ = preprocess_audios(
            waves, sample_rates, target_rate=self.sample_rate, seconds=self.seconds, n_mels=self.n_mels,
            hop=self.hop,
        )  # fmt: skip
        x = normalize_log_mel(mels)
        return F.pad(x, (0, self.shape[1] - x.shape[-1]), value=-1.0)[:, None]

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, n_mels, padded frames) in [-1, 1] -> project log-mels (B, n_mels, frames) (padding dropped)."""
        return denormalize_log_mel(x[:, 0, :, : self.frames])

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample_rate": self.sample_rate,
            "seconds": self.seconds,
            "n_mels": self.n_mels,
            "hop": self.hop,
        }


class VQVAE(nn.Module):
    """Small conv VQ-VAE: (B, C, H, W) in [-1, 1] -> (H/4) x (W/4) tokens -> (B, C, H, W).

    C = `in_channels` (3 for RGB images, 1 for AudioFrontEnd spectrograms); (H, W) = `input_shape`, or
    (image_size, image_size) when it is None. Configs saved before these keys existed load as C = 3, square.

    Encoder: conv3x3 -> 2 stride-2 conv4x4 (S -> S/4) -> `num_res` residual blocks -> 1x1 to the quantizer
    dim (code_dim, or len(fsq_levels) for "fsq"); the decoder mirrors it with transposed convs.
    quantizer: "vq" (VectorQuantizer), "rvq" (ResidualVQ with rvq_levels), "fsq" (FSQ with fsq_levels;
    codebook_size is then prod(fsq_levels)).
    backend: "mmfusion" (this module's quantizers) or "vqtorch" (the vector-quantize-pytorch library's, see
    LibVectorQuantizer / LibFSQ; `rotation_trick` and `fsq_noise_dropout` are its options).
    dead_code_sampling ("mmfusion" only): how dead codes are re-seeded (see VectorQuantizer).
    quantize_dropout, quantize_dropout_cutoff, commitment_per_level ("rvq" only, either backend): see
    ResidualVQ.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 64,
        codebook_size: int = 256,
        quantizer: str = "vq",
        code_dim: int = 32,
        num_res: int = 1,
        rvq_levels: int = 4,
        fsq_levels: Sequence[int] = (8, 6, 5),
        decay: float = 0.99,
        commitment: float = 0.25,
        kmeans_init: bool = True,
        dead_code_threshold: float = 1.0,
        dead_code_patience: int | None = None,
        in_channels: int = 3,
        input_shape: Sequence[int] | None = None,
        backend: str = "mmfusion",
        dead_code_sampling: str = "uniform",
        rotation_trick: bool = False,
        fsq_noise_dropout: float = 0.0,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff: int = 1,
        commitment_per_level: str = "sum",
    ):
        super().__init__()
        if quantizer not in QUANTIZERS:
            raise ConfigError(f"quantizer must be one of {QUANTIZERS}; got {quantizer!r}")
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}; got {backend!r}")
        lib = backend == "vqtorch"
        if not lib and (rotation_trick or fsq_noise_dropout):
            raise ConfigError("rotation_trick and fsq_noise_dropout need backend='vqtorch'")
        if lib and (dead_code_patience is not None or dead_code_sampling != "uniform"):
            raise ConfigError("dead_code_patience and dead_code_sampling need backend='mmfusion'")
        rvq_opts = {
            "quantize_dropout": quantize_dropout,
            "quantize_dropout_cutoff": quantize_dropout_cutoff,
            "commitment_per_level": commitment_per_level,
        }
        if quantizer != "rvq" and any(v != LATER_DEFAULTS[k] for k, v in rvq_opts.items()):
            raise ConfigError(f"quantize_dropout, quantize_dropout_cutoff and commitment_per_level need "
                              f"quantizer='rvq'; got quantizer={quantizer!r}")  # fmt: skip
        shape = (image_size, image_size) if input_shape is None else tuple(int(v) for v in input_shape)
        if len(shape) != 2 or min(shape) < 4 or shape[0] % 4 or shape[1] % 4:
            name = "image_size" if input_shape is None else "input_shape"
            raise ConfigError(f"{name} must give (H, W) both divisible by 4 and >= 4; got {shape}")
        if in_channels < 1:
            raise ConfigError(f"in_channels must be >= 1; got {in_channels}")
        self.config = {
            "image_size": image_size,
            "channels": channels,
            "codebook_size": codebook_size,
            "quantizer": quantizer,
            "code_dim": code_dim,
            "num_res": num_res,
            "rvq_levels": rvq_levels,
            "fsq_levels": [int(v) for v in fsq_levels],
            "decay": decay,
            "commitment": commitment,
            "kmeans_init": kmeans_init,
            "dead_code_threshold": dead_code_threshold,
            "dead_code_patience": dead_code_patience,
            "in_channels": in_channels,
            "input_shape": None if input_shape is None else list(shape),
        }
        # keys added later are written only when they differ from their default, so that a default model's
        # config.json stays as it was (and older configs load with the defaults)
        later = {
            "backend": backend,
            "dead_code_sampling": dead_code_sampling,
            "rotation_trick": rotation_trick,
            "fsq_noise_dropout": fsq_noise_dropout,
            **rvq_opts,
        }
        self.config.update({k: v for k, v in later.items() if v != LATER_DEFAULTS[k]})
        self.backend = backend
        self.image_size, self.quantizer_type = image_size, quantizer
        self.in_channels, self.input_shape = in_channels, shape
        self.grid_shape = (shape[0] // 4, shape[1] // 4)  # (h, w) token grid
        self.grid = self.grid_shape[0] if shape[0] == shape[1] else None  # square side (None if not square)
        vq_kw: dict[str, Any] = dict(
            decay=decay,
            commitment=commitment,
            kmeans_init=kmeans_init,
            dead_code_threshold=dead_code_threshold,
        )
        if lib:
            vq_kw.update(rotation_trick=rotation_trick)
        else:
            vq_kw.update(dead_code_patience=dead_code_patience)
            if dead_code_sampling != "uniform":
                vq_kw.update(dead_code_sampling=dead_code_sampling)
        if quantizer == "vq":
            vq_cls = LibVectorQuantizer if lib else VectorQuantizer
            self.quantizer: nn.Module = vq_cls(code_dim, codebook_size, **vq_kw)
        elif quantizer == "rvq":
            rvq_kw = {k: v for k, v in rvq_opts.items() if v != LATER_DEFAULTS[k]}
            self.quantizer = ResidualVQ(
                code_dim, codebook_size, rvq_levels, backend=backend, **rvq_kw, **vq_kw
            )
        else:
            self.quantizer = LibFSQ(fsq_levels, fsq_noise_dropout) if lib else FSQ(fsq_levels)
        qdim = self.quantizer.dim
        c, c2 = channels, 2 * channels
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, c2, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(c2, c2, 4, stride=2, padding=1),
            *[_ResBlock(c2) for _ in range(num_res)],
            nn.SiLU(),
            nn.Conv2d(c2, qdim, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(qdim, c2, 3, padding=1),
            *[_ResBlock(c2) for _ in range(num_res)],
            nn.SiLU(),
            nn.ConvTranspose2d(c2, c, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, in_channels, 3, padding=1),
        )

    @property
    def tokens_per_image(self) -> int:
        """Token positions per input, (H/4) * (W/4) (each holds rvq_levels indices for "rvq")."""
        return self.grid_shape[0] * self.grid_shape[1]

    @property
    def code_shape(self) -> tuple[int, ...]:
        """Shape of one input's indices: (h, w), or (h, w, rvq_levels) for "rvq"."""
        levels = (self.config["rvq_levels"],) if self.quantizer_type == "rvq" else ()
        return (*self.grid_shape, *levels)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def _quantize(self, images: torch.Tensor, **kw: Any):
        check_image_range(images, self.in_channels)
        if tuple(images.shape[-2:]) != self.input_shape:
            h, w = self.input_shape
            raise DataError(f"VQVAE expects {h}x{w} (H x W) inputs; got {tuple(images.shape[-2:])}")
        z = self.encoder(images).permute(0, 2, 3, 1)  # (B, h, w, D)
        return self.quantizer(z, **kw)

    def _decode_codes(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q.permute(0, 3, 1, 2).contiguous())

    def forward(self, images: torch.Tensor, **quantizer_kw: Any) -> VQVAEOutput:
        z_q, indices, info = self._quantize(images, **quantizer_kw)
        recon = self._decode_codes(z_q)
        recon_loss = F.mse_loss(recon, images)
        commit = info.pop("commit_loss")
        return VQVAEOutput(recon, indices, recon_loss + commit, recon_loss, commit, info)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> indices (B, H/4, W/4) ((B, H/4, W/4, levels) for rvq).
        Uses the quantizer as it is (call .eval() first to leave the codebook untouched)."""
        return self._quantize(images)[1]

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices from `encode` -> images (B, C, H, W), clamped to [-1, 1]."""
        return self._decode_codes(self.quantizer.indices_to_codes(indices)).clamp(-1, 1)

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_folder(self, directory, MODEL_TYPE, self.config)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> VQVAE:
        """Rebuild from config.json and load model.safetensors; returned in eval mode."""
        return load_weights(cls(**read_config(directory, MODEL_TYPE)), directory, map_location)


def psnr(recon: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images (or normalised spectrograms) in [-1, 1] (peak-to-peak 2, i.e. the usual PSNR on
    [0, 1] pixels)."""
    mse = F.mse_loss(recon.clamp(-1, 1).float(), target.float()).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))
