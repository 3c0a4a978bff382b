"""The split deployment (`mmfusion serve MODEL --split`): front/cache, encoder service, fusion service.

    client --JSON--> front (this process): public API, index + search, LRU cache keyed by content hash
                       | misses of one modality:  POST /v1/tokens  {"image": [base64, ...]}   (JSON in)
                       |   encoder service: encoders + projections, batched per modality
                       |   <-- safetensors {"tokens": (P, N, dim) float32}                    (binary out)
                       | POST /v1/fuse  safetensors {"<m>": (B, N_m, dim), "<m>_mask": (B,) bool}
                       |   fusion service: fusion + head, batched
                       |   <-- JSON {"predictions": [{label, score, logits, ...}]}

The front caches each modality's projected tokens under sha256(model id, "<modality>/tokens", raw bytes),
so an image already seen is not sent to the encoder service again even when it comes with a new question;
embeddings (`/v1/embed`) are cached the same way under their own keys. Token tensors travel as safetensors
bytes (no JSON float lists). A service that is down or overloaded is a 503 with Retry-After at the front;
its 4xx errors (undecodable image, empty text ...) pass through unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from ..errors import ConfigError, DataError
from .cache import FeatureCache, content_key
from .server import (
    MAX_ITEMS,
    MODALITIES,
    APIError,
    Engine,
    LocalBackend,
    MetricsMiddleware,
    RequestMetrics,
    ServeSettings,
    _as_list,
    _batcher_lines,
    _cache_lines,
    _media_type,
    _raw_inputs,
    create_app,
    install_error_handlers,
    invalid,
    read_body,
    read_json,
)

BINARY = "application/octet-stream"  # safetensors bytes


def pack(tensors: dict[str, np.ndarray]) -> bytes:
    """Named arrays -> safetensors bytes (the wire form of tokens and masks)."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def unpack(data: bytes, what: str) -> dict[str, np.ndarray]:
    """safetensors bytes -> named arrays; 400 naming `what` when they are not a safetensors file."""
    from safetensors.numpy import load

    try:
        return load(data)
    except Exception as e:  # safetensors raises SafetensorError / ValueError / OverflowError on junk
        raise APIError(
            400, "undecodable_input", f"{what} is not a safetensors file ({type(e).__name__})"
        ) from None


# ---- the encoder service --------------------------------------------------------------------------------
def create_encoder_app(model: torch.nn.Module, settings: ServeSettings | None = None) -> FastAPI:
    """The encoder service: the ordinary app (embed, batching, no cache, no API key: loopback only) plus
    `POST /v1/tokens` {"<modality>": [inputs]} -> safetensors {"tokens": (P, N, dim) float32}."""
    inner = replace(settings or ServeSettings(), cache=False, api_key=None)
    backend = LocalBackend(Engine(model), inner, tokens=True)
    app = create_app(backend=backend, settings=inner)

    @app.post("/v1/tokens", summary="Inputs of one modality -> projected tokens (safetensors bytes)")
    async def tokens(request: Request):
        data = await read_json(request, inner.max_body_bytes)
        mods = [m for m in MODALITIES if m in data]
        if len(mods) != 1 or len(data) != 1:
            raise invalid(f"give exactly one of {list(MODALITIES)} (got {sorted(data) or 'none'})")
        m = mods[0]
        rows = await backend.tokens(m, _raw_inputs(m, _as_list(data[m], m), m))
        return Response(pack({"tokens": np.stack(rows)}), media_type=BINARY)

    return app


# ---- the fusion service ---------------------------------------------------------------------------------
def samples_from_tensors(engine: Engine, tensors: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The body of POST /v1/fuse -> per-sample tokens (modality -> (N, dim)), validated (422 naming the
    tensor): "<m>" (B, N_m, dim) float32 finite and "<m>_mask" (B,) bool for each modality sent; modalities
    not sent are absent from every row; every row needs at least one present modality."""
    mods = engine.modalities
    unknown = sorted(set(tensors) - set(mods) - {f"{m}_mask" for m in mods})
    if unknown:
        raise invalid(f"unknown tensor(s) {unknown}; this model's modalities are {mods} (plus <m>_mask)")
    sent = [m for m in mods if m in tensors or f"{m}_mask" in tensors]
    if not sent:
        raise invalid(f"no tokens: send <modality> and <modality>_mask for some of {mods}")
    size = None
    for m in sent:
        if m not in tensors or f"{m}_mask" not in tensors:
            raise invalid(f"{m}: send both {m!r} (B, N, dim) and {m + '_mask'!r} (B,) bool")
        x, mask = tensors[m], tensors[f"{m}_mask"]
        if mask.dtype != np.bool_ or mask.ndim != 1:
            raise invalid(f"{m}_mask has dtype {mask.dtype} shape {mask.shape}; expected (B,) bool")
        size = mask.shape[0] if size is None else size
        if not 1 <= mask.shape[0] <= MAX_ITEMS or mask.shape[0] != size:
            raise invalid(
                f"{m}_mask has {mask.shape[0]} rows; expected {size} (1..{MAX_ITEMS}, same for all)"
            )
        want = (size, *engine.token_shape(m))
        if x.dtype != np.float32 or x.shape != want:
            raise invalid(f"{m} has dtype {x.dtype} shape {x.shape}; expected float32 {want}")
        if not np.isfinite(x).all():
            raise invalid(f"{m} contains NaN or infinite values")
    assert size is not None
    samples = [{m: tensors[m][i] for m in sent if tensors[f"{m}_mask"][i]} for i in range(size)]
    empty = [i for i, s in enumerate(samples) if not s]
    if empty:
        raise invalid(f"rows {empty[:10]} have no modality present; each row needs at least one")
    return samples


def create_fusion_app(model: torch.nn.Module, settings: ServeSettings | None = None) -> FastAPI:
    """The fusion service: `POST /v1/fuse` (safetensors tokens + masks, as `samples_from_tensors` reads them)
    -> {"predictions": [...]}, batched across requests; GET /healthz, GET /metrics."""
    from .. import __version__

    settings = settings or ServeSettings()
    engine = Engine(model)
    if not engine.can_classify:
        raise ConfigError(f"the fusion service needs a multimodal model; this one is {engine.model_type}")
    shapes = {m: engine.token_shape(m) for m in engine.modalities}  # measured once, before serving
    # the largest valid body: MAX_ITEMS rows of every modality's tokens and masks, plus the header
    limit = MAX_ITEMS * sum(4 * n * d + 1 for n, d in shapes.values()) + 64 * 1024
    backend = LocalBackend(engine, replace(settings, cache=False), fusion=True)
    batchers = {"fusion": backend.batchers["fusion"]}
    metrics = RequestMetrics()

    @asynccontextmanager
    async def lifespan(app):
        yield
        await backend.close()

    app = FastAPI(title="mmfusion fusion service", version=__version__, lifespan=lifespan)
    app.state.backend = backend
    install_error_handlers(app)

    binary_body = {
        "requestBody": {
            "required": True,
            "content": {BINARY: {"schema": {"type": "string", "format": "binary"}}},
        }
    }

    @app.post(
        "/v1/fuse",
        openapi_extra=binary_body,
        summary="Per-modality tokens + presence masks (safetensors) -> predictions",
    )
    async def fuse(request: Request):
        if _media_type(request) != BINARY:
            raise APIError(415, "unsupported_media_type", f"send the safetensors bytes as {BINARY}")
        body = await read_body(request, limit)
        samples = samples_from_tensors(engine, unpack(body, "body"))
        return {"predictions": await backend.fuse(samples)}

    @app.get("/healthz")
    async def healthz():
        return {
            "status": "ok",
            "role": "fusion",
            **engine.info(),
            "token_shapes": {m: list(s) for m, s in shapes.items()},
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        lines = metrics.lines() + _batcher_lines(batchers)
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


# ---- the front ------------------------------------------------------------------------------------------
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
        lines += _cache_lines(self.cache.stats() if self.cache is not None else None)
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


__all__ = [
    "RemoteBackend",
    "create_encoder_app",
    "create_fusion_app",
    "pack",
    "samples_from_tensors",
    "unpack",
    "wait_healthy",
]
