"""The services of the split deployment (`mmfusion serve MODEL --split`): the encoder service and the fusion
service, child processes behind the front (the `mmfusion serve` process, whose backend is `remote.RemoteBackend`).

    client --JSON--> front (this process): public API, index + search, LRU cache keyed by content hash
                       | misses of one modality:  POST /v1/tokens  {"image": [base64, ...]}   (JSON in)
                       |   encoder service: encoders + projections, batched per modality
                       |   <-- safetensors {"tokens": (P, N, dim) float32}                    (binary out)
                       | POST /v1/fuse  safetensors {"<m>": (B, N_m, dim), "<m>_mask": (B,) bool}
                       |   fusion service: fusion + head, batched
                       |   <-- JSON {"predictions": [{label, score, logits, ...}]}

Token tensors travel as safetensors bytes (`http.pack` / `http.unpack`; no JSON float lists). The front's
feature cache, its requests to these services and their errors' pass-through are in `remote.py`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import replace

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from ..errors import ConfigError
from .app import create_app
from .backend import LocalBackend
from .engine import Engine
from .http import (
    BINARY,
    MAX_ITEMS,
    MODALITIES,
    APIError,
    ServeSettings,
    as_list,
    install_error_handlers,
    invalid,
    media_type,
    pack,
    raw_inputs,
    read_body,
    read_json,
    unpack,
)
from .metrics import MetricsMiddleware, RequestMetrics, batcher_lines, prometheus_response


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
        rows = await backend.tokens(m, raw_inputs(m, as_list(data[m], m), m))
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
        if media_type(request) != BINARY:
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
        return prometheus_response(metrics.lines() + batcher_lines(batchers))

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


__all__ = ["create_encoder_app", "create_fusion_app", "samples_from_tensors"]
