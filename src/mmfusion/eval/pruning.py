"""Router modality pruning (A11): skip the encoders of modalities whose router gate would be low, and its command
line, `mmfusion eval --prune-threshold T` and `mmfusion serve --prune-threshold T`.

Both calibrate the model on its run's validation split (`calibrate_pruning`: each modality's mean projected
token), then predict with `predict_pruned` / `logits_pruned`: the encoders of the candidate
modalities (all but the model's first, in sorted key order) are skipped on rows whose estimated router gate is
under T. eval reports the accuracy and the fraction of rows skipped per modality; serve lists each
prediction's skipped modalities. Only the router fusion has gates to prune by: other models are a config error.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..batch import Batch
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import RunConfig
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


def task_batches(cfg: RunConfig, model: MultiModalModel, split: str) -> list[Batch]:
    """The run's `split`, collated by the model's Collate in batches of eval.batch_size."""
    from ..data.loader import iterate_eval
    from ..run import fusion_target, load_split

    collate = model.collate(cfg.data.inputs, fusion_target(cfg, model.config))
    batches = iterate_eval(load_split(cfg, split), collate, cfg.eval.batch_size, cfg.data.num_workers)
    return [b for b in batches if b.data]


def calibrate(model: MultiModalModel, cfg: RunConfig, where: str) -> dict[str, torch.Tensor]:
    """calibrate_pruning on the run's val split; ConfigError unless `model` is a router-fusion model."""
    fusion = getattr(getattr(model, "config", None), "fusion", None)
    if fusion != "router":
        kind = f"a {fusion} fusion model" if fusion else f"a {type(model).__name__}"
        raise ConfigError(
            f"--prune-threshold: modality pruning needs a fusion model with the router fusion (its gates "
            f"decide which encoders to skip); {where} is {kind}"
        )
    return calibrate_pruning(model, task_batches(cfg, model, "val"))


def pruned_eval(model: MultiModalModel, cfg: RunConfig, threshold: float, split: str) -> dict[str, Any]:
    """{"prune_threshold", "accuracy_pruned", "pruned_<modality>": fraction of rows whose encoder was skipped}
    on `split` of the run's task (every modality present), after calibrating on its val split."""
    check_threshold(threshold)
    means = calibrate(model, cfg, "this run")
    correct = total = 0
    skipped_rows: dict[str, int] = {}
    for batch in task_batches(cfg, model, split):
        pred, skipped = predict_pruned(model, means, batch, threshold)
        correct += int((pred.cpu() == batch.data["label"].long()).sum())
        total += len(batch)
        for key, rows in skipped.items():
            skipped_rows[key] = skipped_rows.get(key, 0) + int(rows.sum())
    out: dict[str, Any] = {"prune_threshold": threshold, "accuracy_pruned": correct / max(total, 1)}
    out.update({f"pruned_{k}": v / max(total, 1) for k, v in sorted(skipped_rows.items())})
    return out


def run_config_of(path: str | Path) -> RunConfig:
    """The config.yaml of a run directory, or of the run whose model/ folder `path` is."""
    from ..config import load_config

    path = Path(path)
    for candidate in (path / "config.yaml", path.parent / "config.yaml" if path.name == "model" else None):
        if candidate is not None and candidate.is_file():
            return load_config(candidate)
    raise ConfigError(
        f"--prune-threshold calibrates on the run's validation split: {path} has no config.yaml (serve the run "
        "directory, not a bare model folder)"
    )


def pruning_model(path: str | Path, threshold: float) -> tuple[MultiModalModel, dict[str, torch.Tensor]]:
    """The model of run `path` and its pruning calibration (for serving with pruning at `threshold`)."""
    from .. import load_model

    check_threshold(threshold)
    cfg = run_config_of(path)
    model = load_model(path)
    if cfg.kind != "fusion":
        raise ConfigError(f"--prune-threshold: {path} is a {cfg.kind} run; pruning is for fusion models")
    return model, calibrate(model, cfg, str(path))


__all__ = [
    "calibrate",
    "calibrate_pruning",
    "check_threshold",
    "logits_pruned",
    "predict_pruned",
    "pruned_eval",
    "pruning_model",
    "run_config_of",
    "task_batches",
]
