"""Generation metrics (E1, E2): caption BLEU / ROUGE-L / CIDEr through their reference libraries, and
FID / IS / attribute accuracy of generated images under the SyntheticJudge; plus sample-grid plots.

Caption metrics and their text handling (each library's own, so the numbers equal the libraries'):
- ``bleu``: sacrebleu corpus BLEU on the raw strings with sacrebleu's defaults (13a tokenizer, case-sensitive,
  exponential smoothing), 0..100. A sample may have any number of references.
- ``rouge_l``: rouge-score's ROUGE-L F-measure (its default tokenizer: lowercase, non-alphanumerics -> spaces,
  no stemming), best reference per sample (``score_multi``), mean over samples, 0..1.
- ``cider``: pycocoevalcap's ``Cider`` scorer (CIDEr-D: n = 1..4, Gaussian length penalty sigma = 6, clipped
  counts, x10) on text tokenised by ``tokenize_caption`` (lowercase, runs of [a-z0-9] kept, everything else a
  separator) instead of the Java PTB tokenizer. IDF comes from the evaluated corpus's references, so a corpus
  of one sample scores 0 and the value depends on the whole corpus.

Image metrics are "under our judge": FID / IS computed by torchmetrics with the SyntheticJudge's features /
joint class logits in place of Inception-v3. They rank image sets of the synthetic world; they are not
comparable to published Inception-FID/IS numbers.
"""

from __future__ import annotations

import re
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.synthetic import Scene
from ..errors import DataError
from .judge import SyntheticJudge, as_unit_images, joint_log_probs, target_object

# ---- caption metrics --------------------------------------------------------------------------------------


def _check_corpus(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    """DataError unless hyps is N >= 1 strings and refs is N non-empty lists of strings."""
    if isinstance(hyps, str) or not isinstance(hyps, Sequence):
        raise DataError(f"hyps must be a list of strings, got {type(hyps).__name__}")
    if isinstance(refs, str) or not isinstance(refs, Sequence):
        raise DataError(f"refs must be a list of lists of reference strings, got {type(refs).__name__}")
    if len(hyps) != len(refs):
        raise DataError(
            f"got {len(hyps)} hypotheses but {len(refs)} reference lists; expected one list per hypothesis"
        )
    if not hyps:
        raise DataError("empty corpus: expected at least one hypothesis")
    for i, h in enumerate(hyps):
        if not isinstance(h, str):
            raise DataError(f"hyps[{i}] is {type(h).__name__}; expected a string")
    for i, r in enumerate(refs):
        if isinstance(r, str) or not isinstance(r, Sequence):
            raise DataError(f"refs[{i}] is {type(r).__name__}; expected a list of reference strings")
        if not r:
            raise DataError(f"refs[{i}] is empty; expected at least one reference string")
        for j, x in enumerate(r):
            if not isinstance(x, str):
                raise DataError(f"refs[{i}][{j}] is {type(x).__name__}; expected a string")
        if not any(x.strip() for x in r):
            raise DataError(f"refs[{i}] holds only blank strings; expected at least one non-empty reference")


def tokenize_caption(text: str) -> str:
    """CIDEr's text normalisation: lowercase, keep runs of [a-z0-9], join with single spaces.

    'A red circle, left.' -> 'a red circle left' (stands in for the Java PTB tokenizer of coco-caption)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (0..100) of hyps[i] against the references refs[i] (any number per sample)."""
    import sacrebleu

    _check_corpus(hyps, refs)
    depth = max(len(r) for r in refs)
    # sacrebleu wants reference streams: streams[k][i] = k-th reference of sample i; None = no such reference
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(depth)]
    return float(sacrebleu.corpus_bleu(list(hyps), streams).score)


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """rouge-score ROUGE-L F-measure (0..1): best reference per sample, mean over samples."""
    from rouge_score import rouge_scorer

    _check_corpus(hyps, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score_multi(list(r), h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    return float(sum(scores) / len(scores))


def cider(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """pycocoevalcap Cider (CIDEr-D, x10) of the corpus, texts normalised by tokenize_caption."""
    from pycocoevalcap.cider.cider import Cider

    _check_corpus(hyps, refs)
    res = {i: [tokenize_caption(h)] for i, h in enumerate(hyps)}
    gts = {i: [tokenize_caption(x) for x in r] for i, r in enumerate(refs)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def caption_metrics(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"bleu": 0..100, "rouge_l": 0..1, "cider": 0..10} of the corpus (see the module docstring)."""
    return {"bleu": bleu(hyps, refs), "rouge_l": rouge_l(hyps, refs), "cider": cider(hyps, refs)}


# ---- image metrics under the judge ------------------------------------------------------------------------


class _JudgeFeatures(nn.Module):
    """torchmetrics feature extractor: float (N, 3, S, S) in [0, 1] -> the judge's (N, D) features."""

    def __init__(self, judge: SyntheticJudge):
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge(x)[0]


class _JudgeClassLogits(nn.Module):
    """torchmetrics IS classifier: float (N, 3, S, S) in [0, 1] -> (N, 80) joint (shape, colour, size) logits."""

    def __init__(self, judge: SyntheticJudge):
        super().__init__()
        self.judge = judge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return joint_log_probs(self.judge(x)[1])


def _batches(images: Any, judge: SyntheticJudge, batch_size: int, name: str, minimum: int):
    x = as_unit_images(images, judge.config.image_size)
    if x.shape[0] < minimum:
        raise DataError(f"{name} has {x.shape[0]} images; expected at least {minimum}")
    for s in range(0, x.shape[0], batch_size):
        yield x[s : s + batch_size].to(judge.device)


@torch.no_grad()
def fid(real_images: Any, fake_images: Any, judge: SyntheticJudge, batch_size: int = 256) -> float:
    """Fréchet distance between the judge-feature Gaussians of two image sets (torchmetrics
    FrechetInceptionDistance with the judge as feature extractor): "FID under our judge", >= 0.

    Images: uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1]; at least 2 per set (use hundreds: the
    estimate is biased upwards for small N)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    was = judge.training
    judge.eval()
    metric = FrechetInceptionDistance(feature=_JudgeFeatures(judge), normalize=False).to(judge.device)
    for x in _batches(real_images, judge, batch_size, "real_images", 2):
        metric.update(x, real=True)
    for x in _batches(fake_images, judge, batch_size, "fake_images", 2):
        metric.update(x, real=False)
    value = float(metric.compute())
    judge.train(was)
    return max(value, 0.0)  # eigen-solver round-off can give -1e-6 for identical sets


@torch.no_grad()
def inception_score(
    fake_images: Any, judge: SyntheticJudge, splits: int = 10, seed: int = 0, batch_size: int = 256
) -> tuple[float, float]:
    """(mean, std over `splits`) of exp(E KL(p(y|x) || p(y))) with torchmetrics InceptionScore, p(y|x) the
    judge's joint distribution over the 80 (shape, colour, size) classes: "IS under our judge", in [1, 80].

    torchmetrics shuffles before splitting; `seed` fixes that shuffle (the global RNG is left untouched)."""
    from torchmetrics.image.inception import InceptionScore

    if splits < 1:
        raise DataError(f"splits must be >= 1, got {splits}")
    was = judge.training
    judge.eval()
    with warnings.catch_warnings():  # "will save all extracted features in buffer": (N, 80) floats here
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = InceptionScore(feature=_JudgeClassLogits(judge), splits=splits, normalize=False)
    metric = metric.to(judge.device)
    for x in _batches(fake_images, judge, batch_size, "fake_images", max(2, splits)):
        metric.update(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    judge.train(was)
    return float(mean), float(std)


def attribute_accuracy(images: Any, scenes: Sequence[Scene | dict[str, Any]], judge: SyntheticJudge) -> float:
    """Fraction of images whose judged (shape, colour) equals that of their scene's left-most object
    (for a one-object prompt such as "a red circle": is it a red circle?). Scenes: Scene or to_dict()."""
    preds = judge.predict_attributes(images)
    if len(preds) != len(scenes):
        raise DataError(f"got {len(preds)} images but {len(scenes)} scenes; expected one scene per image")
    hits = 0
    for p, s in zip(preds, scenes):
        o = target_object(s)
        hits += p["shape"] == o.shape and p["colour"] == o.colour
    return hits / len(preds)


# ---- plots -------------------------------------------------------------------------------------------------


def save_image_grid(
    images: Any,
    captions: Sequence[str],
    path: str | Path,
    ncols: int | None = None,
    title: str | None = None,
    wrap: int = 24,
) -> Path:
    """Write a PNG grid of images, each with its caption underneath (wrapped at `wrap` characters).

    images: uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1]; captions: N strings ("" for none)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = as_unit_images(images)
    n = x.shape[0]
    if len(captions) != n:
        raise DataError(f"got {n} images but {len(captions)} captions; expected one caption per image")
    ncols = ncols or min(n, 8)
    if ncols < 1:
        raise DataError(f"ncols must be >= 1, got {ncols}")
    nrows = -(-n // ncols)
    lines = max(1, max(len(textwrap.wrap(c, wrap)) for c in captions))
    cell, text_h, top = 1.5, 0.11 * lines + 0.08, 0.35 if title else 0.1  # inches
    height = nrows * (cell + text_h) + top
    fig = Figure(figsize=(1.6 * ncols, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=0.02, right=0.98, bottom=text_h / height, top=1 - top / height, wspace=0.08, hspace=text_h / cell
    )
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(x[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            caption = "\n".join(textwrap.wrap(captions[i], wrap))
            ax.text(0.5, -0.03, caption, transform=ax.transAxes, ha="center", va="top", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.08 / height)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


__all__ = [
    "attribute_accuracy",
    "bleu",
    "caption_metrics",
    "cider",
    "fid",
    "inception_score",
    "rouge_l",
    "save_image_grid",
    "tokenize_caption",
]
