"""Missing-modality evaluation (E4): a fusion model's accuracy with every modality, and with each one removed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from ..batch import Batch

if TYPE_CHECKING:
    from ..models.multimodal import MultiModalModel


@torch.no_grad()
def missing_modality_eval(model: MultiModalModel, batches: Iterable[Batch]) -> dict[str, float]:
    """Accuracy with every modality, and with each one removed (its mask set to False) (E4).

    Returns {"all": acc, "without_<modality>": acc, ...}. Samples left with no modality are skipped for
    strategies that cannot represent them (cross_attention, moe); with one modality, "without_*" is omitted.
    """
    batches = list(batches)
    was_training = model.training
    model.eval()
    settings: dict[str, str | None] = {"all": None}
    if len(model.modalities) > 1:
        settings.update({f"without_{m}": m for m in model.modalities})
    out: dict[str, float] = {}
    try:
        for name, removed in settings.items():
            correct = total = 0
            for b in batches:
                mask = {
                    k: b.mask.get(k, torch.ones(len(b), dtype=torch.bool)).bool() for k in model.modalities
                }
                if removed is not None:
                    mask[removed] = torch.zeros_like(mask[removed])
                keep = torch.stack(list(mask.values()), dim=1).any(dim=1)
                if not bool(keep.any()):
                    continue
                idx = keep.nonzero().flatten()
                sub = Batch(
                    {k: v[idx] for k, v in b.data.items()}, {k: v[idx] for k, v in mask.items()}, b.meta
                )
                pred = model.predict(sub).cpu()
                correct += int((pred == sub.data["label"].cpu().long()).sum())
                total += len(idx)
            out[name] = correct / max(total, 1)
    finally:
        model.train(was_training)
    return out


__all__ = ["missing_modality_eval"]
