"""The front's backend in the split deployment (`mmfusion serve MODEL --split`): the LRU feature cache in this
process, the model work over HTTP on the encoder service and the fusion service (`split.py`).

The front caches each modality's projected tokens under sha256(model id, "<modality>/tokens", raw bytes), so an
image already seen is not sent to the encoder service again even when it comes with a new question; embeddings
are cached the same way under their own keys. A service that is down is a 503 with Retry-After at the front; its
own errors (undecodable image, empty text, 503 overload ...) pass through unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from typing import Any

import numpy as np

from ..errors import DataError
from .cache import FeatureCache, content_key
from .http import BINARY, APIError, ServeSettings, invalid, pack, unpack
from .metrics import cache_lines


class RemoteBackend:
    """The front's backend in the split deployment: the LRU feature cache here, model work over HTTP.

    `embed`: cached embeddings, misses from the encoder service's /v1/embed. `classify`: each modality's
    tokens from the cache or (misses only, one request per modality, concurrently) the encoder service's
    /v1/tokens, then one /v1/fuse on the fusion service. Counts upstream requests per service for /metrics.
    """

    def __init__(
        self,
        encoder_url: str,
        fusion_url: str | None,
        settings: ServeSettings,
        info: dict[str, Any] | None = None,
        mounts: dict[str, Any] | None = None,
    ):
        """`info`: the encoder service's /healthz (else `connect` reads it); `mounts`: httpx transports by
        URL prefix (tests run the services in process with httpx.ASGITransport)."""
        import httpx

        self.encoder_url = encoder_url.rstrip("/")
        self.fusion_url = fusion_url.rstrip("/") if fusion_url else None
        self.settings = settings
        self.cache = FeatureCache(settings.cache_size) if settings.cache else None
        self.client = httpx.AsyncClient(
            timeout=settings.timeout_s + 2,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            mounts=mounts,
        )
        self._info: dict[str, Any] | None = None
        if info is not None:
            self._set_info(info)
        self.upstream: Counter[str] = Counter()

    def _set_info(self, encoder_health: dict[str, Any]) -> None:
        keys = ("model_type", "model_id", "modalities", "dim", "head", "n_classes")
        self._info = {k: encoder_health[k] for k in keys if k in encoder_health}
        services = {"encoder": self.encoder_url}
        if self.fusion_url:
            services["fusion"] = self.fusion_url
        self._info["services"] = services

    @classmethod
    def connect(
        cls, encoder_url: str, fusion_url: str | None, settings: ServeSettings, wait_s: float = 60.0
    ) -> RemoteBackend:
        """Wait until the services answer /healthz (they are loading the model) and read what they serve."""
        backend = cls(encoder_url, fusion_url, settings)
        info = wait_healthy(backend.encoder_url, wait_s)
        if backend.fusion_url:
            fusion = wait_healthy(backend.fusion_url, wait_s)
            if fusion.get("model_id") != info.get("model_id"):
                raise DataError(
                    f"fusion service {fusion_url} serves model {fusion.get('model_id')}, the encoder service "
                    f"{info.get('model_id')}: start both from the same model folder"
                )
        backend._set_info(info)
        return backend

    def info(self) -> dict[str, Any]:
        assert self._info is not None, "RemoteBackend.connect() first"
        return dict(self._info)

    async def _post(self, service: str, url: str, **kwargs) -> Any:
        """POST to a service: its 200 response, else an APIError (503 + Retry-After when it is unreachable;
        its own error status, code and message otherwise)."""
        import httpx

        self.upstream[service] += 1
        try:
            r = await self.client.post(url, **kwargs)
        except httpx.HTTPError as e:
            raise APIError(
                503, "upstream_unavailable", f"{service} service: {type(e).__name__}", {"Retry-After": "1"}
            ) from None
        if r.status_code != 200:
            try:
                err = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                err = {"code": "upstream_error", "message": r.text[:200]}
            headers = {"Retry-After": r.headers["retry-after"]} if "retry-after" in r.headers else None
            raise APIError(r.status_code, err.get("code", "upstream_error"), err.get("message", ""), headers)
        return r

    @staticmethod
    def _wire(modality: str, raw: bytes | str) -> str:
        return raw if isinstance(raw, str) else base64.b64encode(raw).decode()

    async def embed(self, modality: str, raws: list[bytes | str]) -> tuple[list[np.ndarray], int]:
        info = self.info()
        if modality not in info["modalities"]:
            raise invalid(f"this model has no {modality} encoder; it embeds {', '.join(info['modalities'])}")
        keys = [content_key(info["model_id"], modality, r) for r in raws]
        out: list[np.ndarray | None] = [self.cache.get(k) if self.cache else None for k in keys]
        miss = [i for i, v in enumerate(out) if v is None]
        if miss:
            wire = [self._wire(modality, raws[i]) for i in miss]
            r = await self._post("encoder", f"{self.encoder_url}/v1/embed", json={modality: wire})
            vectors = r.json().get("embeddings", [])
            if len(vectors) != len(miss):
                raise APIError(
                    502, "upstream_error", f"encoder service: {len(vectors)} embeddings for {len(miss)}"
                )
            for i, v in zip(miss, vectors):
                out[i] = np.asarray(v, dtype=np.float32)
                if self.cache is not None:
                    self.cache.put(keys[i], out[i])
        return out, len(raws) - len(miss)  # type: ignore[return-value]

    async def classify(self, samples: list[dict[str, bytes | str]]) -> list[dict[str, Any]]:
        info = self.info()
        if self.fusion_url is None:
            raise APIError(
                404,
                "no_classifier",
                f"this server's model is {info['model_type']}; /v1/classify needs a multimodal model "
                "folder (model_type multimodal)",
            )
        # each sample's modality -> cache key; tokens known so far; per-modality misses (deduplicated)
        sample_keys = [
            {m: content_key(info["model_id"], f"{m}/tokens", raw) for m, raw in s.items()} for s in samples
        ]
        tokens: dict[str, np.ndarray] = {}
        need: dict[str, dict[str, bytes | str]] = {m: {} for m in info["modalities"]}
        for s, keys in zip(samples, sample_keys):
            for m, k in keys.items():
                if k in tokens or k in need[m]:
                    continue
                hit = self.cache.get(k) if self.cache is not None else None
                if hit is None:
                    need[m][k] = s[m]
                else:
                    tokens[k] = hit

        async def fetch(m: str, items: dict[str, bytes | str]) -> None:
            wire = [self._wire(m, raw) for raw in items.values()]
            r = await self._post("encoder", f"{self.encoder_url}/v1/tokens", json={m: wire})
            rows = unpack(r.content, "the encoder service's answer").get("tokens")
            if rows is None or rows.shape[0] != len(items):
                raise APIError(
                    502, "upstream_error", f"encoder service: no tokens for {len(items)} {m} inputs"
                )
            for k, row in zip(items, rows):
                tokens[k] = row
                if self.cache is not None:
                    self.cache.put(k, row)

        done = await asyncio.gather(
            *(fetch(m, items) for m, items in need.items() if items), return_exceptions=True
        )
        for e in done:
            if isinstance(e, BaseException):
                raise e
        tensors: dict[str, np.ndarray] = {}
        for m in info["modalities"]:
            rows = [keys.get(m) for keys in sample_keys]
            first = next((k for k in rows if k is not None), None)
            if first is None:
                continue  # absent from every row: the fusion service fills zeros
            x = np.zeros((len(samples), *tokens[first].shape), dtype=np.float32)  # (B, N_m, dim)
            for i, k in enumerate(rows):
                if k is not None:
                    x[i] = tokens[k]
            tensors[m], tensors[f"{m}_mask"] = x, np.array([k is not None for k in rows])
        r = await self._post(
            "fusion", f"{self.fusion_url}/v1/fuse", content=pack(tensors), headers={"content-type": BINARY}
        )
        return r.json()["predictions"]

    def metric_lines(self) -> list[str]:
        lines = ["# split deployment: batching metrics are on each service's own /metrics (see /healthz)"]
        lines += cache_lines(self.cache.stats() if self.cache is not None else None)
        lines += [
            "# HELP mmfusion_upstream_requests_total Requests the front sent to each service.",
            "# TYPE mmfusion_upstream_requests_total counter",
        ]
        lines += [
            f'mmfusion_upstream_requests_total{{service="{s}"}} {self.upstream[s]}'
            for s in ("encoder", "fusion")
        ]
        return lines

    async def close(self) -> None:
        await self.client.aclose()


def wait_healthy(url: str, wait_s: float) -> dict[str, Any]:
    """Poll `url`/healthz until it answers 200 (its JSON) or `wait_s` passes (DataError)."""
    import httpx

    deadline = time.monotonic() + wait_s
    while True:
        try:
            r = httpx.get(f"{url}/healthz", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise DataError(f"service {url} did not become healthy in {wait_s:g} s")
        time.sleep(0.2)


__all__ = ["RemoteBackend", "wait_healthy"]
