"""Opt-in safety checks of /v1/search (`mmfusion serve --scd FILE --filter FILE`, mmfusion.safety).

- SCD (--scd): the query caption's score against its top-1 index image, with the calibrated threshold; the
  response carries {"scd": {"score", "threshold", "flagged", ...}}: a flag, the results are still returned.
- Concept filters (--filter): the query caption and the result images are checked at the input's safety level
  (strict when SCD flags the query); a blocked query is answered with no results and says why, blocked result
  images are left out and counted: {"filter": {"level", "query_blocked", "results_blocked"}}.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..safety.filters import ConceptFilters, level_for
from ..safety.scd import SCDCalibration, mutations_of


class SearchSafety:
    """The checks one server runs on each search (either may be None)."""

    def __init__(self, scd: SCDCalibration | None = None, filters: ConceptFilters | None = None):
        self.scd, self.filters = scd, filters

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.scd is not None:
            out["scd"] = {"score": self.scd.score, "threshold": self.scd.threshold, "fpr": self.scd.fpr}
        if self.filters is not None:
            out["filter"] = [c.name for c in self.filters.concepts]
        return out

    async def _scd(self, backend, index, text: str, query: np.ndarray) -> dict[str, Any]:
        cal = self.scd
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
        if self.scd is not None:
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
