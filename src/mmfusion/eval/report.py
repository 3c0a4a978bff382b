"""`mmfusion eval`: metrics.json + plots (loss curve, retrieval grid) for a contrastive model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .retrieval import embed_dataset, retrieval_metrics, zero_shot_accuracy


def evaluate_contrastive(
    model, dataset, recall_at=(1, 5, 10), batch_size: int = 256, prompts: list[str] | None = None
) -> tuple[dict[str, Any], dict]:
    """Retrieval recall@K both ways and, when samples carry scene records, zero-shot colour/shape accuracy
    (with `prompts` in place of the default zero-shot prompts, in their order)."""
    emb = embed_dataset(model, dataset, batch_size)
    metrics: dict[str, Any] = {"n_pairs": len(emb["keys"]), **retrieval_metrics(emb, recall_at)}
    single = [i for i, s in enumerate(emb["scenes"]) if s and len(s["objects"]) == 1]
    if single:
        idx = torch.tensor(single)
        for attr in ("colour", "shape"):
            labels = [emb["scenes"][i]["objects"][0][attr] for i in single]
            metrics[f"zero_shot_{attr}_acc"] = zero_shot_accuracy(
                model, emb["image"][idx], labels, attr, prompts
            )
        metrics["zero_shot_n_images"] = len(single)
    if emb["skipped"]:
        metrics["skipped"] = len(emb["skipped"])
    return metrics, emb


def plot_loss(metrics_jsonl: Path, out_png: Path) -> Path | None:
    """Training loss (and learning rate) against step from a run's metrics.jsonl."""
    if not metrics_jsonl.is_file():
        return None
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["loss"] for r in rows], label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("contrastive loss")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.5, label="learning rate")
    ax2.set_ylabel("learning rate")
    fig.legend(loc="upper right")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def dataset_id_index(dataset) -> dict[str, int]:
    """Sample id -> index for map-style datasets that can list their ids cheaply (else empty)."""
    if hasattr(dataset, "samples"):
        return {s.get("id"): i for i, s in enumerate(dataset.samples)}
    if hasattr(dataset, "ids"):
        return {s_id: i for i, s_id in enumerate(dataset.ids())}
    return {}


def plot_retrieval_grid(emb: dict, dataset, out_png: Path, n_queries: int = 4, top: int = 5) -> Path | None:
    """A few caption queries (evenly spaced over the split) with their top-5 images; green = correct scene."""
    if n_queries <= 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..modalities.image import to_rgb_array

    id_to_index = dataset_id_index(dataset)
    queries = np.linspace(0, len(emb["ids"]) - 1, n_queries).astype(int)
    sim = emb["text"][queries] @ emb["image"].t()
    fig, axes = plt.subplots(n_queries, top, figsize=(1.6 * top + 2.6, 1.7 * n_queries), squeeze=False)
    for row, (q, scores) in enumerate(zip(queries, sim)):
        best = scores.argsort(descending=True)[:top].tolist()
        for col, g in enumerate(best):
            ax = axes[row][col]
            sample = dataset[id_to_index[emb["ids"][g]]] if emb["ids"][g] in id_to_index else None
            if isinstance(sample, dict) and sample.get("image") is not None:
                ax.imshow(to_rgb_array(sample["image"]), interpolation="nearest")
            ok = emb["keys"][g] == emb["keys"][q]
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if ok else "red")
                spine.set_linewidth(4)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{float(scores[g]):.2f}", fontsize=7)
        axes[row][0].set_ylabel(emb["texts"][q], fontsize=7, rotation=0, ha="right", va="center", wrap=True)
    fig.suptitle("text -> image: top-5 (green = matching scene)", fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_png


def format_table(metrics: dict[str, Any]) -> str:
    """A short two-column results table for the terminal and the README."""
    rows = [
        (k, f"{v:.4f}" if isinstance(v, float) else str(v))
        for k, v in metrics.items()
        if not isinstance(v, dict)
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  ------"]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)
