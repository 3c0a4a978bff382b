"""The in-process backend of the embedding server: the feature cache and one DynamicBatcher per encoder in front
of an `Engine`. (`remote.RemoteBackend` is the same interface over HTTP, for the `--split` front.)

A backend answers `info()`, `embed(modality, raws)`, `classify(samples)`, `metric_lines()` and `close()`;
the app (`app.create_app`) only parses requests and calls these.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from .batching import DynamicBatcher, Overloaded
from .cache import FeatureCache, content_key
from .engine import Engine
from .http import APIError, ServeSettings, invalid, overloaded
from .metrics import batcher_lines, cache_lines


class LocalBackend:
    """Engine + feature cache + one DynamicBatcher per encoder (and one for classification).

    `tokens=True` adds a batcher per encoder for projected tokens ("<modality>_tokens": the encoder
    service of the split deployment); `fusion=True` one for fusion + head on given tokens ("fusion": the
    fusion service)."""

    def __init__(self, engine: Engine, settings: ServeSettings, tokens: bool = False, fusion: bool = False):
        self.engine = engine
        self.settings = settings
        self.cache = FeatureCache(settings.cache_size) if settings.cache else None
        batch, delay = (settings.max_batch, settings.max_delay_ms) if settings.batching else (1, 0.0)

        def batcher(name: str, fn) -> DynamicBatcher:
            return DynamicBatcher(fn, batch, delay, settings.queue_size, settings.timeout_s, name=name)

        self.batchers: dict[str, DynamicBatcher] = {
            m: batcher(m, lambda items, m=m: engine.embed(m, items)) for m in engine.modalities
        }
        if engine.can_classify:
            self.batchers["classify"] = batcher("classify", engine.classify)
            if tokens:
                for m in engine.modalities:
                    self.batchers[f"{m}_tokens"] = batcher(
                        f"{m}_tokens", lambda items, m=m: engine.tokens(m, items)
                    )
            if fusion:
                self.batchers["fusion"] = batcher("fusion", engine.fuse)

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    async def _prepare(self, modality: str, raws: list[tuple[int, bytes | str]]) -> list[Any]:
        if not raws:
            return []
        if modality == "text":
            return [self.engine.prepare(modality, raw, f"{modality} #{i}") for i, raw in raws]
        # decoding images / audio / video is CPU work: keep it off the event loop
        return await asyncio.to_thread(
            lambda: [self.engine.prepare(modality, raw, f"{modality} #{i}") for i, raw in raws]
        )

    async def embed(self, modality: str, raws: list[bytes | str]) -> tuple[list[np.ndarray], int]:
        """Raw inputs -> embeddings (cache first, then the batcher); returns (vectors, cache hits)."""
        if modality not in self.engine.modalities:
            raise invalid(
                f"this model has no {modality} encoder; it embeds {', '.join(self.engine.modalities)}"
            )
        out: list[np.ndarray | None] = [None] * len(raws)
        keys: list[str] = []
        if self.cache is not None:  # no hashing with the cache off
            keys = [content_key(self.engine.model_id, modality, r) for r in raws]
            for i, k in enumerate(keys):
                out[i] = self.cache.get(k)
        misses = [(i, raws[i]) for i in range(len(raws)) if out[i] is None]
        prepared = await self._prepare(modality, misses)  # all validated before any is queued
        results = await self._submit_all(modality, prepared)
        for (i, _), vec in zip(misses, results):
            out[i] = vec
            if self.cache is not None:
                self.cache.put(keys[i], vec)
        return out, len(raws) - len(misses)  # type: ignore[return-value]

    async def classify(self, samples: list[dict[str, bytes | str]]) -> list[dict[str, Any]]:
        if "classify" not in self.batchers:
            raise APIError(
                404,
                "no_classifier",
                f"this server's model is {self.engine.model_type}; /v1/classify needs a multimodal model "
                "folder (model_type multimodal)",
            )

        def prep() -> list[dict[str, Any]]:
            return [
                {m: self.engine.prepare(m, raw, f"inputs[{i}].{m}") for m, raw in s.items()}
                for i, s in enumerate(samples)
            ]

        prepared = await asyncio.to_thread(prep)
        return await self._submit_all("classify", prepared)

    async def tokens(self, modality: str, raws: list[bytes | str]) -> list[np.ndarray]:
        """Raw inputs of one modality -> each its projected tokens (N, dim) (the encoder service; no cache:
        the front caches)."""
        if f"{modality}_tokens" not in self.batchers:
            raise APIError(
                404, "no_classifier", "this server does not serve tokens (a multimodal model only)"
            )
        prepared = await self._prepare(modality, list(enumerate(raws)))
        return await self._submit_all(f"{modality}_tokens", prepared)

    async def fuse(self, samples: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
        """Per-sample tokens (modality -> (N, dim)) -> predictions (the fusion service)."""
        return await self._submit_all("fusion", samples)

    async def _submit_all(self, batcher: str, items: list[Any]) -> list[Any]:
        """Queue every item on one batcher and wait for all; overload becomes a 503, other errors re-raise (after
        every item has finished, so none is left running unobserved)."""
        submit = self.batchers[batcher].submit
        if len(items) == 1:  # the common case: no gather, whose task per item costs more than the rest
            try:
                return [await submit(items[0])]
            except Overloaded as e:
                raise overloaded(e) from None
        results = await asyncio.gather(*(submit(p) for p in items), return_exceptions=True)
        for r in results:
            if isinstance(r, Overloaded):
                raise overloaded(r)
            if isinstance(r, BaseException):
                raise r
        return list(results)

    def metric_lines(self) -> list[str]:
        lines: list[str] = []
        lines += cache_lines(self.cache.stats() if self.cache is not None else None)
        lines += batcher_lines(self.batchers)
        return lines

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()


__all__ = ["LocalBackend"]
