"""Evaluation of a vlm captioner (mmfusion.models.vlm) on held-out rows: caption BLEU / ROUGE-L / CIDEr against
every template caption of a synthetic scene (as the unified model's evaluation), the objects read from the image
(the scene parser: the caption's object count and its left-most object's colour against the scene), and VQA
exact match on question / answer rows. Greedy decoding."""

from __future__ import annotations

from typing import Any

from ..data.sources import SkippedSample
from ..modalities.base import read_field
from .evaluate import references
from .train import parse_caption

BATCH = 64


def _grounding(caption: str, scene: dict) -> tuple[bool, bool]:
    """(object count right, left-most object's colour right) of a caption against its scene."""
    from ..data.synthetic import Scene

    parsed = parse_caption(caption)
    if parsed is None:
        return False, False
    key = Scene.from_dict(scene).key()
    return len(parsed) == len(key), parsed[0][1] == key[0][1]


def evaluate_vlm(model, rows: Any, max_rows: int | None = None, max_new_tokens: int = 40) -> dict[str, Any]:
    """caption_bleu / rouge_l / cider and caption_n over image + caption rows; count_accuracy and
    colour_accuracy (left-most object) over the synthetic ones (caption_parsed: the share the parser reads);
    vqa_exact_match and vqa_n over question + answer rows; n_rows."""
    from ..eval.generation import caption_metrics

    model.eval()
    n = len(rows) if max_rows is None else min(max_rows, len(rows))
    items = [rows[i] for i in range(n)]
    items = [r for r in items if not isinstance(r, SkippedSample) and read_field(r, "image") is not None]
    caps = [r for r in items if model.text.pair(r) is not None and read_field(r, "question") is None]
    qas = [r for r in items if read_field(r, "question") is not None and read_field(r, "answer") is not None]
    out: dict[str, Any] = {"n_rows": n}
    if caps:
        hyps = []
        for s in range(0, len(caps), BATCH):
            part = caps[s : s + BATCH]
            hyps += model.caption([r["image"] for r in part], max_new_tokens=max_new_tokens)
        refs = [references({**r, "text": model.text.pair(r)[1]}) for r in caps]
        out.update({f"caption_{k}": v for k, v in caption_metrics(hyps, refs).items()}, caption_n=len(caps))
        scenes = [(h, r["scene"]) for h, r in zip(hyps, caps) if isinstance(r.get("scene"), dict)]
        if scenes:
            marks = [_grounding(h, sc) for h, sc in scenes]
            out["caption_parsed"] = sum(parse_caption(h) is not None for h, _ in scenes) / len(scenes)
            out["count_accuracy"] = sum(c for c, _ in marks) / len(marks)
            out["colour_accuracy"] = sum(c for _, c in marks) / len(marks)
    if qas:
        answers = []
        for s in range(0, len(qas), BATCH):
            part = qas[s : s + BATCH]
            answers += model.answer(
                [r["image"] for r in part], [read_field(r, "question") for r in part], max_new_tokens=8
            )
        right = [
            a.replace(" ", "") == str(read_field(r, "answer")).replace(" ", "") for a, r in zip(answers, qas)
        ]
        out.update(vqa_exact_match=sum(right) / len(right), vqa_n=len(qas))
    return out


__all__ = ["evaluate_vlm"]
