"""Retrieval and zero-shot accuracy on paraphrased captions of the synthetic world (`eval.paraphrase: true`):
the same test images, captions and zero-shot prompts re-worded with words the training captions never use
(mmfusion.data.synthetic.paraphrase). Shows whether a text tower generalises beyond the words it was
trained on (docs/pretrained.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data.synthetic.paraphrase import paraphrase_prompts, paraphrase_split
from .report import evaluate_contrastive

PREFIX = "para_"


def evaluate_paraphrase(
    model, dataset, recall_at: Sequence[int] = (1, 5, 10), batch_size: int = 256, seed: int = 0
) -> dict[str, Any]:
    """evaluate_contrastive on `dataset` (synthetic samples with scenes) with paraphrased captions and
    paraphrased zero-shot prompts; the keys are prefixed "para_" (para_t2i_recall@1, para_zero_shot_colour_acc...)."""
    para = paraphrase_split(list(dataset), seed)
    metrics, _ = evaluate_contrastive(model, para, recall_at, batch_size, paraphrase_prompts()[0])
    return {PREFIX + k: v for k, v in metrics.items()}


def evaluate_plain_and_paraphrased(
    model, dataset, recall_at: Sequence[int] = (1, 5, 10), batch_size: int = 256, seed: int = 0
) -> dict[str, Any]:
    """Both sets' metrics in one dict: the plain keys and the "para_" ones."""
    plain, _ = evaluate_contrastive(model, dataset, recall_at, batch_size)
    return {**plain, **evaluate_paraphrase(model, dataset, recall_at, batch_size, seed)}


__all__ = ["PREFIX", "evaluate_paraphrase", "evaluate_plain_and_paraphrased"]
