"""Semantic-consistency detection (SCD) of adversarial inputs (requirement Z2, seed 000).

A model maps an input to an output: here a query embedding to its top-1 candidate of the other modality
(image -> caption, caption -> image) in the shared space of a two-tower model. The seed's SCD compares the
semantic embeddings of input and output; two scores per input, larger = more suspicious:

- distance: 1 - cos(input embedding, embedding of the model's output). A clean input sits close to what it
  retrieves; an adversarial one is pushed off its own answer and lands between answers.
- mutation: the fraction of M small random mutations of the input (pixel noise + a 1-pixel shift on images,
  one character edit on text) under which the output changes. Adversarial inputs sit near a decision
  boundary that the attack found, so their output is brittle.

On a fusion classifier (`mmfusion serve --scd` on /v1/classify) the output is the predicted label and the
mutation score is the fraction of M image mutations that change it (`mutate_image_bytes`: the same PNG
round trip the server's decoders see).

- combined: the larger of the two scores' ranks among clean calibration scores (`combined_scores`).

A threshold is calibrated on clean held-out inputs for a stated false-positive rate (`calibrate_threshold`);
an input is flagged when its score is above it. `detection_metrics` reports TPR, FPR and AUROC on clean vs
adversarial scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .files import read_json, write_json

SCORES = ("distance", "mutation")
TASKS = ("search", "classify")  # what a calibration checks in the server: /v1/search captions, /v1/classify
TYPO = "abcdefghijklmnopqrstuvwxyz"


def top1(queries: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) queries, (K, D) candidates, both L2-normalised -> (index of the top-1 candidate (N,), its cosine (N,))."""
    sims = queries.float() @ candidates.float().t()  # (N, K)
    best, idx = sims.max(dim=1)
    return idx, best


def distance_scores(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """(N, D) input and (N, D) output embeddings, L2-normalised -> 1 - cos per row (N,), in [0, 2]."""
    return 1.0 - (inputs.float() * outputs.float()).sum(dim=-1)


def mutation_scores(clean: torch.Tensor, mutated: torch.Tensor) -> torch.Tensor:
    """(N,) outputs of the inputs, (M, N) outputs of M mutations of each -> fraction of mutations whose output
    differs (N,), in {0, 1/M, ..., 1}."""
    if mutated.ndim != 2 or mutated.shape[1] != clean.shape[0]:
        raise ValueError(f"mutated outputs have shape {tuple(mutated.shape)}; expected (M, {clean.shape[0]})")
    return (mutated != clean[None]).float().mean(dim=0)


def mutate_images(x: torch.Tensor, generator: torch.Generator, sigma: float = 0.03) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> one random mutation of each: Gaussian noise of std `sigma` and a shift of
    -1, 0 or +1 pixel along each axis (one shift for the batch), clamped to [0, 1]."""
    dy, dx = (int(v) - 1 for v in torch.randint(0, 3, (2,), generator=generator))
    noise = torch.randn(x.shape, generator=generator) * sigma
    return (torch.roll(x, shifts=(dy, dx), dims=(2, 3)) + noise.to(x.device)).clamp(0.0, 1.0)


def mutate_image_bytes(raw: bytes, m: int, seed: int, sigma: float = 0.03) -> list[bytes]:
    """An encoded image (any format PIL reads) -> `m` PNG-encoded mutations of its RGB pixels (`mutate_images`,
    rounded to 8 bits), seeded: the same image and seed always give the same mutations."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(raw)) as im:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(m):
        pixels = (mutate_images(x, g, sigma)[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def mutate_text(text: str, rng: np.random.Generator) -> str:
    """One random character edit inside a word of `text`: substitute, delete or insert a lower-case letter
    (Levenshtein distance 1). A text without letters is returned unchanged."""
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    if not letters:
        return text
    i = letters[int(rng.integers(len(letters)))]
    c = TYPO[int(rng.integers(len(TYPO)))]
    op = int(rng.integers(3))
    if op == 0:
        return text[:i] + c + text[i + 1 :]
    if op == 1 and len(letters) > 1:
        return text[:i] + text[i + 1 :]
    return text[:i] + c + text[i:]


def mutations_of(text: str, m: int, seed: int) -> list[str]:
    """The m mutations of one text that the server scores (`mmfusion serve --scd`): a fresh generator seeded
    with `seed` per text, so a text always gets the same mutations."""
    rng = np.random.default_rng(seed)
    return [mutate_text(text, rng) for _ in range(m)]


def text_mutation_scores(
    texts: Sequence[str], predict: Callable[[list[str]], torch.Tensor], m: int, seed: int
) -> torch.Tensor:
    """Mutation score of each text: `predict(texts)` -> (N,) outputs; m mutations per text, seeded."""
    rng = np.random.default_rng(seed)
    texts = list(texts)
    clean = predict(texts)
    mutated = torch.stack([predict([mutate_text(t, rng) for t in texts]) for _ in range(m)])
    return mutation_scores(clean, mutated)


def image_mutation_scores(
    x: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor], m: int, seed: int, sigma: float = 0.03
) -> torch.Tensor:
    """Mutation score of each image ((N, 3, H, W) in [0, 1]); `predict(x)` -> (N,) outputs; m mutations, seeded."""
    g = torch.Generator().manual_seed(seed)
    clean = predict(x)
    mutated = torch.stack([predict(mutate_images(x, g, sigma)) for _ in range(m)])
    return mutation_scores(clean, mutated)


def clean_rank(calibration: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Each score's rank among clean calibration scores, in [0, 1]: the fraction below it, ties counted half
    (an empirical CDF). Puts scores of different scales on one scale."""
    c = np.sort(np.asarray(calibration, dtype=np.float64).ravel())
    s = np.asarray(scores, dtype=np.float64).ravel()
    below = np.searchsorted(c, s, side="left")
    upto = np.searchsorted(c, s, side="right")
    return (below + upto) / (2.0 * c.size)


def combined_scores(calibration: dict[str, np.ndarray], scores: dict[str, np.ndarray]) -> np.ndarray:
    """The "combined" score: the largest clean rank (`clean_rank`) of an input over several scores (distance and
    mutation), so an input extreme on either is suspicious; calibrate its threshold like any score."""
    return np.max([clean_rank(calibration[k], scores[k]) for k in scores], axis=0)


def calibrate_threshold(clean_scores: Sequence[float] | np.ndarray | torch.Tensor, fpr: float) -> float:
    """The threshold t with `score > t` flagging at most floor(fpr * n) of the n clean calibration scores
    (exactly that many when the scores have no tie at t): the (n - k)-th smallest, k = floor(fpr * n)."""
    s = np.sort(np.asarray(clean_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("calibrate_threshold: no clean scores")
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr = {fpr}: expected a rate in [0, 1)")
    k = math.floor(fpr * s.size + 1e-9)
    return float(s[s.size - k - 1])


def detection_metrics(
    clean_scores: Sequence[float] | np.ndarray, adv_scores: Sequence[float] | np.ndarray, threshold: float
) -> dict[str, float]:
    """TPR (adversarial flagged), FPR (clean flagged) at `threshold` and the threshold-free AUROC (sklearn:
    probability that an adversarial input scores above a clean one, ties counted half)."""
    from sklearn.metrics import roc_auc_score

    c = np.asarray(clean_scores, dtype=np.float64).ravel()
    a = np.asarray(adv_scores, dtype=np.float64).ravel()
    if c.size == 0 or a.size == 0:
        raise ValueError(f"detection_metrics needs clean and adversarial scores (got {c.size} and {a.size})")
    y = np.r_[np.zeros(c.size), np.ones(a.size)]
    return {
        "tpr": float((a > threshold).mean()),
        "fpr": float((c > threshold).mean()),
        "auroc": float(roc_auc_score(y, np.r_[c, a])),
        "threshold": float(threshold),
        "n_clean": int(c.size),
        "n_adv": int(a.size),
    }


@dataclass
class SCDCalibration:
    """A calibrated detector, saved as JSON and read by `mmfusion serve --scd`: which score, its threshold,
    the stated false-positive rate, the clean inputs it was calibrated on, the model it belongs to, and the
    server route it checks (`task`: "search" caption queries of a two-tower model, "classify" image inputs
    of a fusion classifier, mutation score only)."""

    score: str  # "distance" | "mutation"
    threshold: float
    fpr: float
    n_calibration: int
    model_id: str = ""
    mutations: int = 8  # mutation score: mutations per input
    seed: int = 0
    task: str = "search"
    sigma: float = 0.03  # image mutations: noise std on [0, 1] pixels

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score {self.score!r}: expected one of {list(SCORES)}")
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}: expected one of {list(TASKS)}")
        if self.task == "classify" and self.score != "mutation":
            raise ValueError("task 'classify' takes the mutation score (the distance score needs an index)")

    def flag(self, score: float) -> bool:
        return bool(score > self.threshold)

    def save(self, path: str | Path) -> Path:
        return write_json(asdict(self), path)

    @classmethod
    def load(cls, path: str | Path) -> SCDCalibration:
        return read_json(path, lambda data: cls(**data), "an SCD calibration file", "mmfusion scd calibrate")
