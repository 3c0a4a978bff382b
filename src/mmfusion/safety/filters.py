"""Per-modality concept filters in a shared embedding space, with calibrated per-concept thresholds (Z4).

A concept ("red", "cross", or any text on a user's data) is a direction in a two-tower model's space: the mean
of its prompts' text embeddings minus the mean of its negative prompts' (`concept_vector`), L2-normalised. An input (an image, or a caption) scores cos(input embedding, concept
vector); it is blocked for the concept when the score is at or above the concept's threshold for the input's
modality and the current safety level. Thresholds are calibrated per concept and modality on labelled data for a
target recall: "normal" (default 0.90) and "strict" (default 0.99: more blocked, lower precision), or, for a level
given a precision target, for the most recall at that precision (`threshold_for_precision`). The level
adapts to the input: `level_for(flagged)` is strict for an input SCD flags as adversarial.

The file a calibration writes (`ConceptFilters.save`) holds the concept vectors, so applying filters needs only
the model's embeddings of the inputs: the data engine (`mmfusion data build --filter`) and the server use it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .files import read_json, write_json

LEVELS = ("normal", "strict")


def concept_vector(
    prompt_embeddings: np.ndarray, negative_embeddings: np.ndarray | None = None
) -> np.ndarray:
    """(P, D) L2-normalised prompt embeddings -> their mean, L2-normalised (D,); with (Q, D) embeddings of
    negative prompts (the concept's alternatives: other colours for a colour), the direction mean(prompts) -
    mean(negatives), L2-normalised: it cancels what all prompts share (a caption's template, the other words)."""
    v = np.asarray(prompt_embeddings, dtype=np.float64).mean(axis=0)
    if negative_embeddings is not None and len(negative_embeddings):
        v = v - np.asarray(negative_embeddings, dtype=np.float64).mean(axis=0)
    return (v / max(np.linalg.norm(v), 1e-12)).astype(np.float32)


def threshold_for_recall(scores: np.ndarray, labels: np.ndarray, recall: float) -> float:
    """The largest threshold t with `score >= t` catching at least `recall` of the positives: the
    ceil(recall * n_pos)-th largest positive score."""
    pos = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(labels, dtype=bool)])[::-1]
    if pos.size == 0:
        raise ValueError("threshold_for_recall: no positive example to calibrate on")
    if not 0 < recall <= 1:
        raise ValueError(f"recall = {recall}: expected a rate in (0, 1]")
    k = max(1, math.ceil(recall * pos.size - 1e-9))
    return float(pos[k - 1])


def threshold_for_precision(scores: np.ndarray, labels: np.ndarray, precision: float) -> float:
    """The smallest threshold t (the most recall) with `score >= t` blocking inputs of which at least
    `precision` are positives; a threshold blocks every input tied with it. ValueError when none reaches it."""
    if not 0 < precision <= 1:
        raise ValueError(f"precision = {precision}: expected a rate in (0, 1]")
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    prec = tp / np.arange(1, len(s) + 1)
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # position i blocks exactly the first i + 1 inputs
    ok = last_of_tie & (tp > 0) & (prec >= precision - 1e-12)
    if not ok.any():
        best = float(prec[last_of_tie & (tp > 0)].max()) if y.any() else 0.0
        raise ValueError(f"no threshold reaches precision {precision} (at best {best:.3f})")
    return float(s[np.nonzero(ok)[0].max()])


def precision_recall(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision, recall and counts of `score >= threshold` against boolean labels (precision 1.0 when nothing
    is blocked, recall 1.0 when there is no positive)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    blocked = s >= threshold
    tp = int((blocked & y).sum())
    return {
        "precision": tp / int(blocked.sum()) if blocked.any() else 1.0,
        "recall": tp / int(y.sum()) if y.any() else 1.0,
        "blocked": int(blocked.sum()),
        "positives": int(y.sum()),
        "n": int(y.size),
    }


def level_for(scd_flagged: bool) -> str:
    """The safety level of one input: strict when SCD flags it as adversarial, else normal."""
    return "strict" if scd_flagged else "normal"


@dataclass
class Concept:
    """One concept: its prompts (and negative prompts), its vector in the model's space (`concept_vector`) and
    modality -> level -> threshold."""

    name: str
    prompts: list[str]
    vector: list[float]
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    negatives: list[str] = field(default_factory=list)


@dataclass
class ConceptFilters:
    """A calibrated set of concept filters for one model (`model_id`); recall targets per level, and precision
    targets for the levels calibrated for precision instead (they override the level's recall target)."""

    concepts: list[Concept]
    model_id: str = ""
    recall: dict[str, float] = field(default_factory=lambda: {"normal": 0.9, "strict": 0.99})
    precision: dict[str, float] = field(default_factory=dict)

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, D) L2-normalised embeddings -> (N, C) cosines to the concept vectors."""
        vecs = np.asarray([c.vector for c in self.concepts], dtype=np.float32)  # (C, D)
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != vecs.shape[1]:
            raise ConfigError(
                f"filter embeddings have shape {emb.shape}; the concepts are {vecs.shape[1]}-dimensional "
                "(was the filter file calibrated with another model?)"
            )
        return emb @ vecs.T

    def thresholds(self, modality: str, level: str) -> np.ndarray:
        """(C,) thresholds of `modality` at `level`; a concept not calibrated for the modality never blocks."""
        if level not in LEVELS:
            raise ValueError(f"level {level!r}: expected one of {list(LEVELS)}")
        return np.asarray([c.thresholds.get(modality, {}).get(level, np.inf) for c in self.concepts])

    def check(
        self, modality: str, embeddings: np.ndarray, levels: list[str] | str = "normal"
    ) -> list[list[str]]:
        """The names of the concepts each of N inputs is blocked for (empty = passes); `levels`: one level for
        all or one per input."""
        s = self.scores(embeddings)
        levels = [levels] * len(s) if isinstance(levels, str) else list(levels)
        t = {lv: self.thresholds(modality, lv) for lv in set(levels)}
        return [
            [c.name for c, v, th in zip(self.concepts, row, t[lv]) if v >= th] for row, lv in zip(s, levels)
        ]

    def calibrate(self, modality: str, embeddings: np.ndarray, labels: np.ndarray) -> None:
        """Set every concept's thresholds for `modality` from labelled inputs: (N, D) embeddings, (N, C) booleans
        (input i shows concept c), each level at its precision target if it has one, else its recall target.
        DataError names the concept when a precision target cannot be reached."""
        s, y = self.scores(embeddings), np.asarray(labels, dtype=bool)
        if y.shape != s.shape:
            raise ValueError(f"labels have shape {y.shape}; expected {s.shape} (inputs, concepts)")
        for j, c in enumerate(self.concepts):
            th = {}
            for lv in LEVELS:
                if lv not in self.precision:
                    th[lv] = threshold_for_recall(s[:, j], y[:, j], self.recall[lv])
                    continue
                try:
                    th[lv] = threshold_for_precision(s[:, j], y[:, j], self.precision[lv])
                except ValueError as e:
                    raise DataError(
                        f"concept {c.name!r}, {modality}, {lv} level: {e} on the {len(y)} calibration inputs; "
                        "lower the precision target or use a recall target"
                    ) from None
            c.thresholds[modality] = th

    def report(self, modality: str, embeddings: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """concept -> level -> precision / recall / counts on labelled inputs, and concept -> "auroc" (how well
        the score ranks positives over negatives, whatever the threshold; None without both classes)."""
        from sklearn.metrics import roc_auc_score

        s, y = self.scores(embeddings), np.asarray(labels, dtype=bool)
        out: dict[str, Any] = {}
        for j, c in enumerate(self.concepts):
            th = self.thresholds(modality, "normal")[j], self.thresholds(modality, "strict")[j]
            out[c.name] = {lv: precision_recall(s[:, j], y[:, j], t) for lv, t in zip(LEVELS, th)}
            both = 0 < int(y[:, j].sum()) < len(y)
            out[c.name]["auroc"] = float(roc_auc_score(y[:, j], s[:, j])) if both else None
        return out

    def save(self, path: str | Path) -> Path:
        return write_json(asdict(self), path, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> ConceptFilters:
        def build(data: dict[str, Any]) -> ConceptFilters:
            concepts = [Concept(**c) for c in data.pop("concepts")]
            return cls(concepts, **data)

        return read_json(path, build, "a concept-filter file", "mmfusion filter calibrate")
