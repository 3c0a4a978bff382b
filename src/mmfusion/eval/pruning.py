"""Router modality pruning (A11): skip the encoders of modalities whose router gate would be low. The command line
(`mmfusion eval --prune-threshold T`, `mmfusion serve --prune-threshold T`) is in mmfusion.evaluate.

Both calibrate the model on its run's validation split (`calibrate_pruning`: each modality's mean projected
token), then predict with `predict_pruned` / `logits_pruned`: the encoders of the candidate
modalities (all but the model's first, in sorted key order) are skipped on rows whose estimated router gate is
under T. eval reports the accuracy and the fraction of rows skipped per modality; serve lists each
prediction's skipped modalities. Only the router fusion has gates to prune by: other models are a config error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from ..batch import Batch
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..models.multimodal import MultiModalModel


@torch.no_grad()
def calibrate_pruning(model: MultiModalModel, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """Each modality's mean projected token (D,) over the present rows of `batches` (eval mode): the
    calibration predict_pruned() stands in for a modality that is not encoded yet, to estimate its router gate."""
    if model.config.fusion != "router":
        raise ConfigError(
            f"modality pruning needs the router fusion; this model uses {model.config.fusion!r}"
        )
    was_training = model.training
    model.eval()
    sums = {k: torch.zeros(model.config.dim, device=model.device) for k in model.modalities}
    counts = dict.fromkeys(model.modalities, 0)
    try:
        for batch in batches:
            _, feats, masks = model.encode_with_tokens(batch)
            for k in model.modalities:
                rows = masks[k]
                sums[k] += feats[k][rows].mean(dim=1).sum(dim=0).float()
                counts[k] += int(rows.sum())
    finally:
        model.train(was_training)
    empty = [k for k, c in counts.items() if c == 0]
    if empty:
        raise ConfigError(f"calibrate_pruning: no calibration sample has {empty}")
    return {k: sums[k] / counts[k] for k in model.modalities}


@torch.no_grad()
def predict_pruned(
    model: MultiModalModel,
    means: dict[str, torch.Tensor],
    batch: Batch,
    threshold: float,
    candidates: Iterable[str] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Predict while skipping the encoders of modalities whose router gate would fall under `threshold`.

    The other modalities are encoded first; each candidate (default: all but the first modality) is stood in
    for by its calibrated mean token (`means` from calibrate_pruning) and the router's gates are computed. Rows where a
    candidate's estimated gate < threshold never run its encoder: the modality counts as absent there (gate 0,
    the others renormalised). The rest encode it and are fused as usual. Returns (predictions (B,),
    {modality: bool (B,) rows skipped}). threshold 0 skips nothing and equals predict().
    """
    logits, skipped = logits_pruned(model, means, batch, threshold, candidates)
    pred = (logits > 0).long() if model.config.head == "match" else logits.argmax(dim=-1)
    return pred, skipped


@torch.no_grad()
def logits_pruned(
    model: MultiModalModel,
    means: dict[str, torch.Tensor],
    batch: Batch,
    threshold: float,
    candidates: Iterable[str] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """predict_pruned's logits (as `logits()` returns them) and rows skipped per modality."""
    candidates = list(model.modalities[1:] if candidates is None else candidates)
    unknown = [c for c in candidates if c not in model.modalities]
    if unknown or len(candidates) >= len(model.modalities):
        raise ConfigError(
            f"candidates {candidates}: must be a strict subset of the model's modalities {model.modalities}"
        )
    was_training = model.training
    model.eval()
    try:
        device = model.device
        masks = {
            k: batch.mask.get(k, torch.ones(len(batch), dtype=torch.bool)).to(device).bool()
            for k in model.modalities
        }
        feats = {
            k: model.modality_tokens(k, batch.data[k].to(device), masks[k])
            for k in model.modalities
            if k not in candidates
        }
        n = len(batch)
        guess = {k: means[k].to(device).expand(n, 1, -1) for k in candidates}
        gates = model.fusion({**feats, **guess}, masks).info["gates"]  # (B, M)
        skipped = {}
        for k in candidates:
            skip = masks[k] & (gates[:, model.fusion.modalities.index(k)] < threshold)
            others = torch.stack([masks[o] for o in model.modalities if o != k], dim=1).any(dim=1)
            skip &= others  # never skip a row's only modality
            skipped[k] = skip
            masks[k] = masks[k] & ~skip
            feats[k] = model.modality_tokens(k, batch.data[k].to(device), masks[k])
        logits = model.logits_from_tokens(feats, masks)
    finally:
        model.train(was_training)
    return logits, skipped


def check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--prune-threshold = {threshold}: a router gate threshold in [0, 1]")


__all__ = ["calibrate_pruning", "check_threshold", "logits_pruned", "predict_pruned"]
