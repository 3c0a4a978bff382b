"""Opt-in safety checks of /v1/search and /v1/classify (`mmfusion serve --scd FILE --filter FILE`, mmfusion.safety).

- SCD (--scd) on /v1/search (a calibration with task "search"): the query caption's score against its top-1
  index image, with the calibrated threshold; the response carries {"scd": {"score", "threshold", "flagged",
  ...}}: a flag, the results are still returned.
- SCD on /v1/classify (task "classify", a fusion classifier): each input with an image is classified again
  with `mutations` mutations of its image (its other inputs unchanged; `safety.scd.mutate_image_bytes`); its
  prediction carries {"scd": {"score": the fraction of mutations that change the label, "flagged", ...}};
  inputs without an image carry {"scd": {"checked": false, ...}}. Predictions are still returned.
- Concept filters (--filter): the query caption and the result images are checked at the input's safety level
  (strict when SCD flags the query); a blocked query is answered with no results and says why, blocked result
  images are left out and counted: {"filter": {"level", "query_blocked", "results_blocked"}}.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from ..safety.filters import ConceptFilters, level_for
from ..safety.scd import SCDCalibration, mutate_image_bytes, mutations_of


def classify_mutations(
    samples: list[dict[str, Any]], cal: SCDCalibration
) -> tuple[list[dict[str, Any]], list[int]]:
    """Raw /v1/classify samples (modality -> raw input) -> the samples to classify for the mutation score:
    `cal.mutations` per sample that has an image, its image mutated and its other inputs unchanged, and for
    each the index of its sample."""
    mutated, owners = [], []
    for i, s in enumerate(samples):
        if "image" in s:
            for raw in mutate_image_bytes(s["image"], cal.mutations, cal.seed, cal.sigma):
                mutated.append({**s, "image": raw})
                owners.append(i)
    return mutated, owners


def classify_mutation_scores(
    clean: list[dict[str, Any]], mutated: list[dict[str, Any]], owners: list[int]
) -> list[float | None]:
    """Predictions of the samples and of their mutations (`classify_mutations`) -> per sample the fraction of
    its mutations whose label differs from its own, None for a sample without mutations."""
    changed = [0] * len(clean)
    count = [0] * len(clean)
    for pred, i in zip(mutated, owners, strict=True):
        count[i] += 1
        changed[i] += pred["label"] != clean[i]["label"]
    return [c / n if n else None for c, n in zip(changed, count)]


class ServeSafety:
    """The checks one server runs: SCD on /v1/search or on /v1/classify (by the calibration's task) and
    concept filters on /v1/search (either may be None)."""

    def __init__(self, scd: SCDCalibration | None = None, filters: ConceptFilters | None = None):
        self.scd, self.filters = scd, filters

    @property
    def search_scd(self) -> SCDCalibration | None:
        return self.scd if self.scd is not None and self.scd.task == "search" else None

    @property
    def classify_scd(self) -> SCDCalibration | None:
        return self.scd if self.scd is not None and self.scd.task == "classify" else None

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.scd is not None:
            out["scd"] = {
                "task": self.scd.task,
                "score": self.scd.score,
                "threshold": self.scd.threshold,
                "fpr": self.scd.fpr,
            }
        if self.filters is not None:
            out["filter"] = [c.name for c in self.filters.concepts]
        return out

    async def _scd(self, backend, index, text: str, query: np.ndarray) -> dict[str, Any]:
        cal = self.search_scd
        assert cal is not None
        top = index.search(query, 1)[0]
        if cal.score == "distance":
            score = 1.0 - top["score"]
        else:  # a fixed seed per server: the same query always gets the same mutations and score
            vecs, _ = await backend.embed("text", mutations_of(text, cal.mutations, cal.seed))
            score = float(np.mean([index.search(v, 1)[0]["index"] != top["index"] for v in vecs]))
        return {
            "score": round(float(score), 6),
            "kind": cal.score,
            "threshold": cal.threshold,
            "fpr": cal.fpr,
            "flagged": cal.flag(score),
        }

    async def search(
        self, backend, index, text: str, query: np.ndarray, results: list[dict]
    ) -> tuple[dict[str, Any], list[dict]]:
        """The response fields these checks add, and the results to return."""
        extra: dict[str, Any] = {}
        if self.search_scd is not None:
            extra["scd"] = await self._scd(backend, index, text, query)
        if self.filters is not None:
            level = level_for(extra.get("scd", {}).get("flagged", False))
            blocked = self.filters.check("text", np.asarray(query)[None], level)[0]
            if blocked:
                extra["filter"] = {"level": level, "query_blocked": blocked, "results_blocked": len(results)}
                return extra, []
            emb = index.embeddings[[r["index"] for r in results]].numpy() if results else np.zeros((0, 1))
            hits = self.filters.check("image", emb, level) if results else []
            kept = [r for r, b in zip(results, hits) if not b]
            extra["filter"] = {
                "level": level,
                "query_blocked": [],
                "results_blocked": len(results) - len(kept),
            }
            results = kept
        return extra, results

    async def classify(
        self, backend, samples: list[dict[str, Any]], predictions: list[dict[str, Any]]
    ) -> None:
        """Add each prediction's "scd" field (task "classify"): its mutation score and flag."""
        cal = self.classify_scd
        assert cal is not None
        # PIL decode + noise + PNG encode of every mutation: off the event loop, like the server's other decoding
        mutated, owners = await asyncio.to_thread(classify_mutations, samples, cal)
        scores = classify_mutation_scores(
            predictions, await backend.classify(mutated) if mutated else [], owners
        )
        for pred, score in zip(predictions, scores, strict=True):
            pred["scd"] = {
                "checked": score is not None,
                "kind": cal.score,
                "threshold": cal.threshold,
                "fpr": cal.fpr,
            }
            if score is not None:
                pred["scd"].update(score=round(score, 6), flagged=cal.flag(score))
            else:
                pred["scd"].update(score=None, flagged=False)
