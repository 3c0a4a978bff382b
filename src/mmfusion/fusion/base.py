"""The fusion interface: modality-keyed token features + presence masks in, a `FusionOutput` out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from mmfusion.errors import MMFusionError


class AllModalitiesAbsentError(MMFusionError, ValueError):
    """Every modality is absent for at least one sample and the strategy has no null representation."""


@dataclass
class FusionOutput:
    """What every fusion strategy returns.

    pooled:   (B, D) fused representation for heads.
    tokens:   (B, N, D) fused token sequence when the strategy has one, else None. Positions of absent
              modalities are zero; `info["token_mask"]` (B, N) bool marks the valid ones (True = present).
    aux_loss: scalar, 0 when the strategy has none; models add it to the task loss.
    info:     diagnostics, e.g. router gates (B, M) or expert load (E,).
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None
    aux_loss: torch.Tensor
    info: dict[str, torch.Tensor] = field(default_factory=dict)


class Fusion(nn.Module, ABC):
    """Base class: fixes the modality order (sorted) and validates inputs; subclasses implement `fuse`.

    forward(features: modality -> (B, N_m, D), masks: modality -> bool (B,), True = present).
    Absent modalities are zero-filled before any computation and masked as keys / gates, so their
    placeholder values (noise, NaN) cannot change the output.
    """

    def __init__(self, modalities: list[str], dim: int):
        super().__init__()
        if not modalities:
            raise ValueError("a fusion needs at least one modality")
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"duplicate modality names in {modalities}")
        self.modalities: list[str] = sorted(modalities)
        self.dim = dim

    def forward(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> FusionOutput:
        return self.fuse(*self._prepare(features, masks))

    @abstractmethod
    def fuse(self, features: dict[str, torch.Tensor], present: torch.Tensor) -> FusionOutput:
        """features: modality -> (B, N_m, D), absent rows zeroed; present: bool (B, M) in `self.modalities` order."""

    def _prepare(
        self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        expected = set(self.modalities)
        if set(features) != expected or set(masks) != expected:
            raise ValueError(
                f"{type(self).__name__} expects modalities {self.modalities}; "
                f"got features for {sorted(features)} and masks for {sorted(masks)}"
            )
        batch = features[self.modalities[0]].shape[0]
        clean: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            x, mask = features[m], masks[m]
            if x.ndim != 3 or x.shape[0] != batch or x.shape[2] != self.dim:
                raise ValueError(
                    f"features[{m!r}] must have shape (B={batch}, N, D={self.dim}); got {tuple(x.shape)}"
                )
            if mask.dtype != torch.bool or mask.shape != (batch,):
                raise ValueError(
                    f"masks[{m!r}] must be a bool tensor of shape ({batch},); got {mask.dtype} {tuple(mask.shape)}"
                )
            clean[m] = torch.where(
                mask.to(x.device)[:, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device)
            )
        present = torch.stack([masks[m].to(clean[m].device) for m in self.modalities], dim=1)  # (B, M)
        return clean, present

    def _raise_if_all_absent(self, present: torch.Tensor) -> None:
        if torch.compiler.is_exporting():  # a data-dependent check; exported graphs leave it to their caller
            return
        empty = (~present.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise AllModalitiesAbsentError(
                f"{type(self).__name__}: every modality ({', '.join(self.modalities)}) is absent for "
                f"sample(s) {empty}; drop those samples or use a strategy with a null representation "
                "(early, late, router)"
            )


def concat_tokens(
    features: dict[str, torch.Tensor], present: torch.Tensor, modalities: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate modality tokens in `modalities` order: (B, N, D) tokens and bool (B, N) validity."""
    tokens = torch.cat([features[m] for m in modalities], dim=1)
    valid = torch.cat(
        [present[:, i : i + 1].expand(-1, features[m].shape[1]) for i, m in enumerate(modalities)], dim=1
    )
    return tokens, valid


def pool_modalities(features: dict[str, torch.Tensor], modalities: list[str]) -> torch.Tensor:
    """Mean-pool each modality's tokens: (B, M, D); absent rows are already zero, so they stay zero."""
    return torch.stack([features[m].mean(dim=1) for m in modalities], dim=1)


def masked_mean(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens: tokens (B, N, D), valid bool (B, N) -> (B, D); rows without any valid token give 0."""
    w = valid.to(tokens.dtype)
    return (tokens * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp(min=1.0)


def zero_invalid(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Zero the positions of absent tokens so the returned sequence cannot carry placeholder values."""
    return torch.where(valid[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))


def zero_aux(ref: torch.Tensor) -> torch.Tensor:
    """A scalar 0 on `ref`'s device, for strategies without an auxiliary loss."""
    return torch.zeros((), dtype=torch.float32, device=ref.device)


def masked_softmax(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Softmax over present entries only: logits (B, M), present bool (B, M) -> (B, M).

    Absent entries get exactly 0 and the present ones renormalise to 1; an all-absent row is all 0
    (not NaN). Computed in fp32.
    """
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    masked = torch.where(present, logits.float(), neg_inf)
    masked = torch.where(present.any(dim=-1, keepdim=True), masked, torch.zeros_like(masked))
    return (masked.softmax(dim=-1) * present).to(logits.dtype)
