"""Router modality pruning (A11) from the command line: `mmfusion eval --prune-threshold T` and
`mmfusion serve --prune-threshold T`.

Both calibrate the model on its run's validation split (`MultiModalModel.calibrate_pruning`: each modality's
mean projected token), then predict with `predict_pruned` / `logits_pruned`: the encoders of the candidate
modalities (all but the model's first, in sorted key order) are skipped on rows whose estimated router gate is
under T. eval reports the accuracy and the fraction of rows skipped per modality; serve lists each
prediction's skipped modalities. Only the router fusion has gates to prune by: other models are a config error.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..batch import Batch
    from ..config import RunConfig
    from ..models.multimodal import MultiModalModel


def check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--prune-threshold = {threshold}: a router gate threshold in [0, 1]")


def task_batches(cfg: RunConfig, model: MultiModalModel, split: str) -> list[Batch]:
    """The configured task's `split`, collated with the model's tokenizer in batches of eval.batch_size."""
    from ..run import task_collate, task_samples

    samples = task_samples(cfg, split)
    collate = task_collate(cfg, model.tokenizer)
    size = cfg.eval.batch_size
    return [collate(samples[i : i + size]) for i in range(0, len(samples), size)]


def calibrate(model: MultiModalModel, cfg: RunConfig, where: str) -> None:
    """calibrate_pruning on the run's val split; ConfigError unless `model` is a router-fusion model."""
    fusion = getattr(getattr(model, "config", None), "fusion", None)
    if fusion != "router":
        kind = f"a {fusion} fusion model" if fusion else f"a {type(model).__name__}"
        raise ConfigError(
            f"--prune-threshold: modality pruning needs a fusion model with the router fusion (its gates "
            f"decide which encoders to skip); {where} is {kind}"
        )
    model.calibrate_pruning(task_batches(cfg, model, "val"))


def pruned_eval(model: MultiModalModel, cfg: RunConfig, threshold: float, split: str) -> dict[str, Any]:
    """{"prune_threshold", "accuracy_pruned", "pruned_<modality>": fraction of rows whose encoder was skipped}
    on `split` of the run's task (every modality present), after calibrating on its val split."""
    check_threshold(threshold)
    calibrate(model, cfg, "this run")
    correct = total = 0
    skipped_rows: dict[str, int] = {}
    for batch in task_batches(cfg, model, split):
        pred, skipped = model.predict_pruned(batch, threshold)
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


def pruning_model(path: str | Path, threshold: float) -> MultiModalModel:
    """The model of run `path`, calibrated for serving with pruning at `threshold`."""
    from .. import load_model

    check_threshold(threshold)
    cfg = run_config_of(path)
    model = load_model(path)
    if cfg.task is None:
        raise ConfigError(
            f"--prune-threshold: {path} is a two-tower run; pruning is for fusion models on a task"
        )
    calibrate(model, cfg, str(path))
    return model


__all__ = ["calibrate", "check_threshold", "pruned_eval", "pruning_model", "run_config_of", "task_batches"]
