"""Evaluating a run or a model folder, whatever the model (`mmfusion eval`, and `mmfusion train` at its end).

contrastive: retrieval recall@K (scene-matched), zero-shot accuracy, plots; a CL-FT run adds its probe's
             accuracy.
fusion:      accuracy with every input and with each one removed (E4) on the split's samples, collated by the
             model's own Collate; unreadable samples are counted, not silently lost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import RunConfig
from .errors import ConfigError
from .eval.pruning import calibrate_pruning, check_threshold, predict_pruned

if TYPE_CHECKING:
    from .batch import Batch
    from .models.multimodal import MultiModalModel


def _model_dir(path: Path) -> Path:
    return path / "model" if (path / "model").is_dir() else path


def evaluate_fusion(cfg: RunConfig, model, split: str = "test") -> dict[str, Any]:
    """Accuracy of a fusion model on `split` of the run's data, with every input and with each one removed."""
    from collections import Counter

    from .data.loader import iterate_eval
    from .eval.missing import missing_modality_eval
    from .run import fusion_target, load_split

    dataset = load_split(cfg, split)
    collate = model.collate(cfg.data.inputs, fusion_target(cfg, model.config))
    batches, skipped = [], Counter()
    for batch in iterate_eval(dataset, collate, cfg.eval.batch_size, cfg.data.num_workers):
        skipped.update(reason for _, reason in batch.meta.get("skipped", []))
        if batch.data:
            batches.append(batch)
    if not batches:
        raise ConfigError(f"no usable sample in the {split} split to evaluate (skipped: {dict(skipped)})")
    accuracy = missing_modality_eval(model, batches)
    source = cfg.data.synthetic.task if cfg.data.source == "synthetic" else getattr(cfg.data, split)
    metrics: dict[str, Any] = {
        "split": split,
        "data": source,
        "fusion": model.config.fusion,
        "n": sum(len(b) for b in batches),
    }
    if cfg.data.source == "synthetic":
        metrics["task"] = cfg.data.synthetic.task
    metrics.update({f"accuracy_{k}": v for k, v in accuracy.items()})
    if skipped:
        metrics["skipped"] = dict(skipped)
    return metrics


def evaluate_probe(cfg: RunConfig, model_dir: Path, split: str = "test") -> dict[str, Any]:
    """Accuracy of a saved CL-FT probe (model_dir/probe.safetensors) on `split`."""
    from .run import load_split
    from .train.stages import ContrastiveProbe, probe_accuracy

    model = ContrastiveProbe.from_pretrained(model_dir)
    if cfg.model.image.image_size != model.image_size:
        cfg = cfg.model_copy(update={"model": model.config})
    dataset = load_split(cfg, split)
    return {
        "probe_label": model.config.probe.label,
        "probe_accuracy": probe_accuracy(model, dataset, cfg.eval.batch_size),
        "probe_n": len(dataset),
        "probe_chance": 1.0 / len(model.classes),
    }


# ---- router pruning from the command line (mmfusion.eval.pruning does the pruning) ---------------------------
def task_batches(cfg: RunConfig, model: MultiModalModel, split: str) -> list[Batch]:
    """The run's `split`, collated by the model's Collate in batches of eval.batch_size."""
    from .data.loader import iterate_eval
    from .run import fusion_target, load_split

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
    from .config import load_config

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
    from . import load_model

    check_threshold(threshold)
    cfg = run_config_of(path)
    model = load_model(path)
    if cfg.kind != "fusion":
        raise ConfigError(f"--prune-threshold: {path} is a {cfg.kind} run; pruning is for fusion models")
    return model, calibrate(model, cfg, str(path))


def _write(metrics: dict[str, Any], out: Path, plots=()) -> None:
    from .eval.report import format_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(format_table(metrics))
    print(f"metrics: {out / 'metrics.json'}")
    for p in plots:
        if p:
            print(f"plot: {p}")


def evaluate_run(
    path: Path, cfg: RunConfig, split: str, out: Path, prune_threshold: float | None = None
) -> dict:
    """Evaluate the model of run directory (or model folder) `path` on `split` of `cfg`'s data; writes
    <out>/metrics.json (and plots) and prints a table."""
    model_dir = _model_dir(path)
    if cfg.kind == "unified":
        from . import load_model
        from .unified.evaluate import evaluate_unified
        from .unified.recipe import load_rows

        if prune_threshold is not None:
            raise ConfigError("--prune-threshold is for router-fusion models; this is a unified run")
        # generation is slow: at most eval.max_rows held-out rows (synthetic n_test defaults to 1000)
        rows = load_rows(cfg.data, cfg.model, split)
        metrics = {"split": split, **evaluate_unified(load_model(path), rows, max_rows=cfg.eval.max_rows)}
        _write(metrics, out)
        return metrics
    if cfg.kind == "vlm":
        from . import load_model
        from .run import load_split
        from .unified.vlm_eval import evaluate_vlm

        if prune_threshold is not None:
            raise ConfigError("--prune-threshold is for router-fusion models; this is a vlm run")
        rows = load_split(cfg, split)  # generation is slow: at most eval.max_rows rows
        metrics = {"split": split, **evaluate_vlm(load_model(path), rows, max_rows=cfg.eval.max_rows)}
        _write(metrics, out)
        return metrics
    if cfg.kind == "fusion":
        from .models.multimodal import MultiModalModel

        model = MultiModalModel.from_pretrained(model_dir)
        pruned = {}
        if prune_threshold is not None:  # first: a model without router gates fails before any evaluation
            pruned = pruned_eval(model, cfg, prune_threshold, split)
        metrics = {**evaluate_fusion(cfg, model, split), **pruned}
        _write(metrics, out)
        return metrics
    if prune_threshold is not None:
        raise ConfigError(
            f"--prune-threshold: {path} is a two-tower run; modality pruning is for router-fusion models"
        )
    from .eval.report import evaluate_contrastive, plot_loss, plot_retrieval_grid
    from .models.contrastive import ContrastiveModel
    from .run import load_split
    from .train.stages import has_probe

    model = ContrastiveModel.from_pretrained(model_dir)
    if cfg.model.image.image_size != model.image_size:
        cfg = cfg.model_copy(update={"model": model.config})
    dataset = load_split(cfg, split)
    metrics, emb = evaluate_contrastive(model, dataset, cfg.eval.recall_at, cfg.eval.batch_size)
    metrics = {"split": split, **metrics}
    if cfg.eval.paraphrase:
        if cfg.data.source != "synthetic":
            raise ConfigError("eval.paraphrase: paraphrased captions exist for the synthetic world only")
        from .eval.paraphrase import evaluate_paraphrase

        metrics.update(evaluate_paraphrase(model, dataset, cfg.eval.recall_at, cfg.eval.batch_size))
    if has_probe(model_dir):  # a CL-FT run: the classification probe on the image embedding
        metrics.update(evaluate_probe(cfg, model_dir, split))
    plots = [
        plot_loss(path / "metrics.jsonl", out / "plots" / "loss.png"),
        plot_retrieval_grid(emb, dataset, out / "plots" / "retrieval_grid.png", cfg.eval.grid_queries),
    ]
    _write(metrics, out, plots)
    return metrics


__all__ = [
    "evaluate_fusion",
    "evaluate_probe",
    "evaluate_run",
    "pruned_eval",
    "pruning_model",
    "run_config_of",
]
