"""Pseudo-labels from cross-modal similarity (D5, seeds 002/003): label unlabelled images with a trained
image–text model by scoring them against class prototypes built from text.

A class is a label (by default a sample's ``scene_key``) with the captions of the labelled samples that
carry it. Each class's prototype is the re-normalised mean of its caption embeddings (CLIP-style prompt
ensembling); an image's class probabilities are softmax(scale x cosine) over the prototypes, with the
model's own learned temperature (``model.scale()``) unless one is given (0.07 for a model without one).
A pseudo-label is kept when its probability is >= the threshold (default 0.5: the best class outweighs all
the others together; measured precision per threshold in docs/data.md); kept samples get the
class's first caption as text and ``meta["pseudo_label"]`` / ``meta["pseudo_confidence"]``.

CLI: ``mmfusion data pseudo-label UNLABELLED --labelled LABELLED --model MODEL --out DIR``. The model is loaded
by the loader the CLI passes in (``mmfusion.load_model``): the data engine does not import the models.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

DEFAULT_THRESHOLDS = (0.0, 0.5, 0.7, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class PseudoLabel:
    """One image's best class, its probability and whether it passed the threshold."""

    id: str
    label: str
    confidence: float
    accepted: bool


def label_of(sample: Mapping[str, Any], field: str) -> str | None:
    """sample[field] or sample["meta"][field] as a string (None when absent)."""
    v = sample.get(field)
    if v is None:
        v = (sample.get("meta") or {}).get(field)
    return None if v is None else str(v)


def class_texts_from_labelled(
    samples: Iterable[Mapping[str, Any]], field: str = "scene_key"
) -> dict[str, list[str]]:
    """{label: sorted distinct captions} of the labelled samples that have both a caption and a label."""
    out: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        label, text = label_of(s, field), s.get("text")
        if label is not None and isinstance(text, str) and text:
            out[label].add(text)
    if not out:
        raise DataError(f"no labelled sample has both a caption and a {field!r} label")
    return {k: sorted(v) for k, v in sorted(out.items())}


def class_prototypes(model, class_texts: Mapping[str, Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Labels and their (C, D) L2-normalised prototypes: the mean caption embedding per class."""
    import torch
    import torch.nn.functional as F

    labels = list(class_texts)
    if not labels or any(not class_texts[k] for k in labels):
        raise ConfigError("class_texts needs at least one class, each with at least one text")
    flat = [t for k in labels for t in class_texts[k]]
    owner = torch.tensor([i for i, k in enumerate(labels) for _ in class_texts[k]])
    with torch.no_grad():
        emb = model.encode_text(flat)  # (N, D), normalised
    protos = torch.zeros(len(labels), emb.shape[1]).index_add_(0, owner, emb)
    return labels, F.normalize(protos, dim=-1)


def pseudo_label(
    model,
    images: Sequence[Any],
    class_texts: Mapping[str, Sequence[str]],
    threshold: float = 0.5,
    ids: Sequence[str] | None = None,
    temperature: float | None = None,
    batch_size: int = 256,
) -> list[PseudoLabel]:
    """Best class and its softmax probability for each image ((H, W, 3) uint8 arrays or what
    model.encode_image accepts); accepted when the probability is >= threshold."""
    import torch

    if not 0 <= threshold <= 1:
        raise ConfigError(f"threshold = {threshold}: expected a probability in [0, 1]")
    if temperature is not None and not temperature > 0:
        raise ConfigError(f"temperature = {temperature}: expected a number > 0")
    labels, protos = class_prototypes(model, class_texts)
    if temperature is None and not hasattr(model, "scale"):
        temperature = 0.07  # CLIP's initial temperature, for models without a learned one
    scale = 1.0 / temperature if temperature is not None else float(model.scale().detach())
    ids = list(ids) if ids is not None else [str(i) for i in range(len(images))]
    out: list[PseudoLabel] = []
    for s in range(0, len(images), batch_size):
        with torch.no_grad():
            emb = model.encode_image(list(images[s : s + batch_size]))  # (B, D), normalised
        probs = torch.softmax(scale * emb @ protos.t(), dim=-1)
        conf, best = probs.max(dim=-1)
        for j, (c, b) in enumerate(zip(conf.tolist(), best.tolist())):
            out.append(PseudoLabel(ids[s + j], labels[b], c, c >= threshold))
    return out


def precision_table(
    records: Sequence[PseudoLabel], truths: Mapping[str, str | None], thresholds: Sequence[float]
) -> list[dict[str, float]]:
    """Per threshold: kept (count), coverage (kept / all), precision (kept with label == truth / kept;
    NaN when nothing is kept). Samples without a truth are left out."""
    known = [r for r in records if truths.get(r.id) is not None]
    rows = []
    for t in thresholds:
        kept = [r for r in known if r.confidence >= t]
        right = sum(r.label == truths[r.id] for r in kept)
        rows.append(
            {
                "threshold": float(t),
                "kept": len(kept),
                "coverage": len(kept) / max(len(known), 1),
                "precision": right / len(kept) if kept else float("nan"),
            }
        )
    return rows


def apply_labels(
    samples: Sequence[dict[str, Any]],
    records: Sequence[PseudoLabel],
    class_texts: Mapping[str, Sequence[str]],
) -> list[dict[str, Any]]:
    """The accepted samples with the class's first caption as text and the pseudo-label in meta."""
    out = []
    for s, r in zip(samples, records):
        if r.accepted:
            meta = {
                **(s.get("meta") or {}),
                "pseudo_label": r.label,
                "pseudo_confidence": round(r.confidence, 6),
            }
            out.append({**s, "text": class_texts[r.label][0], "meta": meta})
    return out


def format_table(rows: Sequence[Mapping[str, float]]) -> str:
    lines = [f"{'threshold':>9} {'kept':>6} {'coverage':>9} {'precision':>10}"]
    lines += [
        f"{r['threshold']:>9.2f} {r['kept']:>6d} {r['coverage']:>9.3f} {r['precision']:>10.3f}" for r in rows
    ]
    return "\n".join(lines)


# ---- CLI -------------------------------------------------------------------------------------------------
def _open(path: str, modalities: tuple[str, ...]):
    from ..sources import open_source

    return open_source("jsonl" if path.endswith(".jsonl") else "webdataset", path, modalities=modalities)


def _read(path: str, modalities: tuple[str, ...], limit: int | None, desc: str) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from ..sources import SkippedSample

    out = []
    for s in tqdm(_open(path, modalities), desc=desc, unit="sample", leave=False):
        if not isinstance(s, SkippedSample):
            out.append(s)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{path}: no readable sample with {', '.join(modalities)}")
    return out


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{name} = {text!r}: expected comma-separated numbers") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmfusion data pseudo-label`."""
    parser.add_argument(
        "unlabelled", help="images to label: WebDataset shards (tar, folder, brace pattern) or a .jsonl"
    )
    parser.add_argument("--labelled", required=True, help="labelled samples with captions (shards or .jsonl)")
    parser.add_argument("--model", required=True, help="a trained image–text model folder or run directory")
    parser.add_argument(
        "--out", required=True, help="output folder: pseudo-*.tar shards + pseudo_report.json"
    )
    parser.add_argument("--label-field", default="scene_key", help="the label: a sample field or meta field")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="keep labels with probability >= this (0.5: the best class outweighs all others together)",
    )
    parser.add_argument(
        "--report-thresholds",
        default=",".join(map(str, DEFAULT_THRESHOLDS)),
        help="thresholds of the precision table (when the unlabelled data has true labels)",
    )
    parser.add_argument("--limit", type=int, default=None, help="label at most this many images")


def pseudo_label_main(args: argparse.Namespace, load_model: Callable[[str], Any]) -> int:
    """`mmfusion data pseudo-label`: label, write the accepted samples as shards, report precision.
    `load_model`: a model folder or run directory -> the model (mmfusion.load_model)."""
    from ..writers import write_webdataset

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit = {args.limit}: expected a positive number")
    thresholds = _floats(args.report_thresholds, "--report-thresholds")
    model = load_model(args.model).eval()
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise ConfigError(f"--model {args.model}: needs an image–text model (encode_image and encode_text)")
    class_texts = class_texts_from_labelled(
        _read(args.labelled, ("text",), None, "read labelled"), args.label_field
    )
    unlabelled = _read(args.unlabelled, ("image",), args.limit, "read unlabelled")
    records = pseudo_label(
        model,
        [s["image"] for s in unlabelled],
        class_texts,
        args.threshold,
        ids=[s["id"] for s in unlabelled],
    )
    out = Path(args.out)
    accepted = apply_labels(unlabelled, records, class_texts)
    shards = write_webdataset(accepted, out, name="pseudo") if accepted else []
    truths = {s["id"]: label_of(s, args.label_field) for s in unlabelled}
    report: dict[str, Any] = {
        "model": str(args.model),
        "label_field": args.label_field,
        "classes": len(class_texts),
        "unlabelled": len(unlabelled),
        "threshold": args.threshold,
        "accepted": len(accepted),
        "shards": [str(p) for p in shards],
        "with_true_label": sum(v is not None for v in truths.values()),
        "true_label_among_classes": sum(v in class_texts for v in truths.values() if v is not None),
        "precision": precision_table(records, truths, thresholds) if any(truths.values()) else [],
        "labels": [asdict(r) for r in records],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "pseudo_report.json").write_text(json.dumps(report, indent=1))
    print(
        f"{len(accepted)}/{len(unlabelled)} images labelled at threshold {args.threshold} "
        f"({len(class_texts)} classes); wrote {len(shards)} shard(s) and {out / 'pseudo_report.json'}"
    )
    if report["precision"]:
        print(format_table(report["precision"]))
    return 0


__all__ = [
    "PseudoLabel",
    "add_arguments",
    "apply_labels",
    "class_prototypes",
    "class_texts_from_labelled",
    "label_of",
    "precision_table",
    "pseudo_label",
    "pseudo_label_main",
]
