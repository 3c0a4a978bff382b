"""Image–text retrieval recall@K (scene-matched) and zero-shot attribute classification (E3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data.loader import iterate_eval


def match_keys(batch_keys: Sequence[str | None], texts: Sequence[str]) -> list[str]:
    """Ground-truth identity per sample: the scene key when the data has one, else the caption itself."""
    return [k if k else t.strip().lower() for k, t in zip(batch_keys, texts)]


@torch.no_grad()
def embed_dataset(model, dataset, batch_size: int = 256, num_workers: int = 0) -> dict[str, Any]:
    """Embed every (image, caption) pair of `dataset` -> {"image": (N, D), "text": (N, D), "keys", "texts", "ids"}."""
    collate = model.collate()
    img, txt, keys, texts, ids, scenes, skipped = [], [], [], [], [], [], []
    model.eval()
    for batch in iterate_eval(dataset, collate, batch_size, num_workers):
        skipped += batch.meta.get("skipped", [])
        if not batch.data:
            continue
        img.append(model.embed_image_tensor(batch["image"]).float().cpu())
        txt.append(model.embed_text_ids(batch["text"]).float().cpu())
        keys += match_keys(batch.meta["scene_key"], batch.meta["text"])
        texts += batch.meta["text"]
        ids += batch.meta["id"]
        scenes += batch.meta["scene"]
    if not img:
        from ..errors import DataError

        raise DataError("no readable (image, text) pair to evaluate")
    return {
        "image": torch.cat(img),
        "text": torch.cat(txt),
        "keys": keys,
        "texts": texts,
        "ids": ids,
        "scenes": scenes,
        "skipped": skipped,
    }


def recall_at_k(
    sim: torch.Tensor, query_keys: Sequence[str], gallery_keys: Sequence[str], ks: Sequence[int]
) -> dict[int, float]:
    """sim (Q, G): fraction of queries with at least one gallery item of the same key among the top K."""
    gk = np.asarray(gallery_keys, dtype=object)
    qk = np.asarray(query_keys, dtype=object)
    order = sim.argsort(dim=1, descending=True)[:, : max(ks)].numpy()
    hits = gk[order] == qk[:, None]  # (Q, maxK)
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def retrieval_metrics(emb: dict[str, Any], ks: Sequence[int]) -> dict[str, float]:
    """Text->image and image->text recall@K over the whole split, scene-matched."""
    sim = emb["text"] @ emb["image"].t()  # (N texts, N images)
    out = {}
    for k, v in recall_at_k(sim, emb["keys"], emb["keys"], ks).items():
        out[f"t2i_recall@{k}"] = v
    for k, v in recall_at_k(sim.t(), emb["keys"], emb["keys"], ks).items():
        out[f"i2t_recall@{k}"] = v
    return out


def zero_shot_prompts() -> tuple[list[str], list[dict[str, str]]]:
    """Every single-object caption "a {size} {colour} {shape}" and its attributes (80 prompts)."""
    from ..data.synthetic import COLOURS, SHAPES, SIZES

    attrs = [{"size": z, "colour": c, "shape": s} for z in SIZES for c in COLOURS for s in SHAPES]
    return [f"a {a['size']} {a['colour']} {a['shape']}" for a in attrs], attrs


@torch.no_grad()
def zero_shot_accuracy(
    model, image_emb: torch.Tensor, labels: Sequence[str], attribute: str, prompts: list[str] | None = None
) -> float:
    """Zero-shot classification of `attribute` ("colour" | "shape") from text prompts alone.

    p(class | image) is the softmax over all single-object prompts (at the model's temperature),
    marginalised over the other attributes: p(red) = sum of p("a small red circle"), p("a large red
    square"), ... Averaging prompt embeddings per class (CLIP's ensembling) blurs the shape directions
    with the colour ones in this world, so the marginal is used. `prompts`: other wordings of the same
    prompts, in zero_shot_prompts()'s order.
    """
    default, attrs = zero_shot_prompts()
    prompts = default if prompts is None else prompts  # e.g. paraphrased: one per attribute combination
    probs = (model.scale().detach().float().cpu() * image_emb @ model.encode_text(prompts).t()).softmax(dim=1)
    names = sorted({a[attribute] for a in attrs})
    member = torch.tensor([[a[attribute] == n for n in names] for a in attrs], dtype=probs.dtype)  # (P, C)
    pred = (probs @ member).argmax(dim=1)
    return float(np.mean([names[p] == y for p, y in zip(pred.tolist(), labels)]))
