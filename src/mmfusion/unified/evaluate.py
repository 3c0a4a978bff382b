"""Evaluation of a unified model on held-out rows, as benchmarks/unified.py measures it: captioning BLEU / ROUGE-L /
CIDEr (greedy, text-only constrained decoding; mmfusion.eval.generation.caption_metrics), VQA exact match, and
audio captioning when the model has an audio tokenizer.

References: a synthetic scene's row (it has "scene") is scored against every template caption of its scene,
as the benchmark does; any other row against its own caption. An answer matches when it equals the row's
answer after stripping spaces (the benchmark's rule).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from ..data.sources import SkippedSample
from ..modalities.base import read_field
from ..modalities.image import preprocess_image
from .bundle import UnifiedBundle
from .rows import peek_rows, qa_pairs, row_tasks


def references(row: Mapping[str, Any]) -> list[str]:
    """The reference captions of a row: every template caption of its synthetic scene, else its caption."""
    scene = row.get("scene")
    if isinstance(scene, Mapping):
        from ..data.synthetic import TEMPLATES, Scene, caption_for

        sc = Scene.from_dict(scene)
        return [caption_for(sc, k) for k in range(len(TEMPLATES[len(sc.objects)]))]
    return [row["text"]]


def _encode(vq, tensors: list[torch.Tensor], batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        device = next(vq.parameters()).device
        x = torch.stack(tensors)
        return torch.cat([vq.eval().encode(c.to(device)).cpu() for c in x.split(batch)])


def evaluate_unified(
    bundle: UnifiedBundle,
    rows: Any,
    max_rows: int | None = None,
    max_new_tokens: int = 40,
) -> dict[str, Any]:
    """Metrics of `bundle` on the first `max_rows` rows (None = all) of a map-style dataset of held-out rows:

    caption_bleu / caption_rouge_l / caption_cider and caption_n over the image + text rows; vqa_exact_match
    and vqa_n over every question of the image rows; audio_caption_* likewise for audio + text rows (with an
    audio tokenizer); n_rows, and skipped (rows the source could not read, by reason)."""
    from ..eval.generation import caption_metrics
    from .generate_cli import answer_questions, caption_audio, caption_images

    bundle.eval()
    n = len(rows) if max_rows is None else min(max_rows, len(rows))
    has_audio = bundle.audio_vqvae is not None
    size = bundle.vqvae.image_size
    peeked = peek_rows(rows)[:n]
    skipped: Counter[str] = Counter()
    images, audio, captioned, heard, questions = [], [], [], [], []
    for i, p in enumerate(peeked):
        tasks = [] if isinstance(p, SkippedSample) else row_tasks(p, has_audio)
        if not tasks:
            skipped[p.reason if isinstance(p, SkippedSample) else "missing_modality"] += 1
            continue
        row = rows[i]
        if isinstance(row, SkippedSample):
            skipped[row.reason] += 1
            continue
        if "caption" in tasks or "vqa" in tasks:
            images.append(preprocess_image(read_field(row, "image"), size))
            if "caption" in tasks:
                captioned.append((len(images) - 1, references(row)))
            questions += [(len(images) - 1, q, a) for _, q, a in qa_pairs(row)]
        if "audio_caption" in tasks:
            spec = bundle.audio_frontend([read_field(row, "audio")], [int(read_field(row, "audio_sr"))])[0]
            audio.append(spec)
            heard.append((len(audio) - 1, references(row)))
    out: dict[str, Any] = {"n_rows": n, "skipped": dict(skipped)}
    codes = _encode(bundle.vqvae, images) if images else None
    if captioned:
        hyps = caption_images(bundle, codes[[k for k, _ in captioned]], max_new_tokens=max_new_tokens)
        scores = caption_metrics(hyps, [r for _, r in captioned])
        out.update({f"caption_{k}": v for k, v in scores.items()}, caption_n=len(hyps))
        out["caption_examples"] = [
            {"generated": h, "reference": r[0]} for h, (_, r) in zip(hyps[:4], captioned)
        ]
    if questions:
        answers = answer_questions(bundle, codes[[k for k, _, _ in questions]], [q for _, q, _ in questions])
        right = [a.strip() == ans for a, (_, _, ans) in zip(answers, questions)]
        out.update(vqa_exact_match=sum(right) / len(right), vqa_n=len(right))
    if heard:
        acodes = _encode(bundle.audio_vqvae, audio)
        hyps = caption_audio(bundle, acodes[[k for k, _ in heard]], max_new_tokens=max_new_tokens)
        scores = caption_metrics(hyps, [r for _, r in heard])
        out.update({f"audio_caption_{k}": v for k, v in scores.items()}, audio_caption_n=len(hyps))
    return out


def eval_hook(setup: Any, rows: Any, max_rows: int | None = 200):
    """A Trainer `on_eval(model, step)` for a unified run: the numeric metrics of `evaluate_unified` on the
    first `max_rows` of `rows`, with the model's decoder and `setup`'s tokenizers (a recipe.UnifiedSetup)."""

    def on_eval(model: torch.nn.Module, step: int) -> dict[str, float]:
        got = evaluate_unified(setup.bundle(model.decoder), rows, max_rows=max_rows)
        return {k: float(v) for k, v in got.items() if isinstance(v, int | float)}

    return on_eval


__all__ = ["eval_hook", "evaluate_unified", "references"]
