"""Evaluating a run or a model folder, whatever the model (`mmfusion eval`, and `mmfusion train` at its end).

contrastive: retrieval recall@K (scene-matched), zero-shot accuracy, plots; a CL-FT run adds its probe's
             accuracy.
fusion:      accuracy with every input and with each one removed (E4) on the split's samples, collated by the
             model's own Collate; unreadable samples are counted, not silently lost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import ConfigError


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
    if cfg.kind == "fusion":
        from .models.multimodal import MultiModalModel

        model = MultiModalModel.from_pretrained(model_dir)
        pruned = {}
        if prune_threshold is not None:  # first: a model without router gates fails before any evaluation
            from .eval.pruning import pruned_eval

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
    if has_probe(model_dir):  # a CL-FT run: the classification probe on the image embedding
        metrics.update(evaluate_probe(cfg, model_dir, split))
    plots = [
        plot_loss(path / "metrics.jsonl", out / "plots" / "loss.png"),
        plot_retrieval_grid(emb, dataset, out / "plots" / "retrieval_grid.png", cfg.eval.grid_queries),
    ]
    _write(metrics, out, plots)
    return metrics


__all__ = ["evaluate_fusion", "evaluate_probe", "evaluate_run"]
