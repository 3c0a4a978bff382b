"""The HTTP inference server's app (FastAPI): embeddings, text -> image search, classification, metrics, demo page.

    app = create_app(model, index=index, settings=ServeSettings(max_batch=32))   # an ASGI app
    uvicorn.run(app, host="127.0.0.1", port=8000)                                 # what `mmfusion serve` does

Layers: `engine.Engine` wraps a model (decode + validate raw inputs, one batched model call per modality);
`backend.LocalBackend` puts the feature cache and one DynamicBatcher per encoder in front of it;
`remote.RemoteBackend` (the `--split` deployment) keeps the cache and sends the model work over HTTP to an
encoder service and a fusion service (`split.py`). The app itself only parses requests, maps errors to status
codes and records metrics. A unified model folder gets `generate_api.GenerateBackend` instead (POST
/v1/generate: caption, VQA, text -> image) and none of the embedding routes.

Errors are JSON `{"error": {"status", "code", "message"}}` (`http.py`): 400 non-JSON body or undecodable media,
401 bad or missing API key, 404 unknown route / no index / no classifier, 413 body over the limit, 415 wrong
Content-Type, 422 well-formed but invalid input (shape, NaN, empty text, wrong field), 503 + Retry-After when a
queue is full or a request times out. Anything unexpected is a 500 with the exception's type, never a dropped
connection.
"""

from __future__ import annotations

import asyncio
import base64
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

from ..modalities.base import MediaError
from .backend import LocalBackend
from .engine import Engine
from .generate_api import GenerateBackend, add_generate_routes
from .http import (
    MAX_ITEMS,
    MAX_TEXT_CHARS,
    MODALITIES,
    APIError,
    ServeSettings,
    api_key_check,
    as_list,
    install_error_handlers,
    invalid,
    json_body,
    media_type,
    raw_inputs,
    read_body,
    read_json,
    vectors_response,
)
from .metrics import MetricsMiddleware, RequestMetrics, prometheus_response

BINARY_TYPES = {
    "image": ("image/png", "image/jpeg"),
    "audio": ("audio/wav", "audio/x-wav", "audio/wave"),
    "video": ("application/x-npy", "application/octet-stream"),
    "text": ("text/plain",),
}


def _schemas() -> dict[str, dict[str, Any]]:
    text = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS, "pattern": r"\S"}  # not blank
    b64 = {"type": "string", "format": "byte", "minLength": 1}
    return {
        "embed": {
            "type": "object",
            "description": "Exactly one modality key: text (strings), image (base64 PNG/JPEG), audio (base64 "
            "WAV), video (base64 .npy (T, H, W, 3) uint8).",
            "properties": {
                m: {
                    "type": "array",
                    "items": text if m == "text" else b64,
                    "minItems": 1,
                    "maxItems": MAX_ITEMS,
                }
                for m in MODALITIES
            },
            "minProperties": 1,
            "maxProperties": 1,
            "additionalProperties": False,
        },
        "search": {
            "type": "object",
            "required": ["text"],
            "properties": {
                "text": text,
                "k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5},
                "include_images": {"type": "boolean", "default": False},
            },
        },
        "classify": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "inputs": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_ITEMS,
                    "items": {
                        "type": "object",
                        "properties": {m: text if m == "text" else b64 for m in MODALITIES},
                        "minProperties": 1,
                        "additionalProperties": False,
                    },
                }
            },
        },
    }


def _add_embedding_routes(app: FastAPI, v1: APIRouter, backend, settings: ServeSettings) -> None:
    """/v1/embed, /v1/embed/{modality}, /v1/search, /v1/index, /v1/index/image/{i}, /v1/classify on `v1`."""
    schemas = _schemas()

    def embeddings_response(modality: str, vecs: list[np.ndarray], hits: int) -> Response:
        info = backend.info()
        head = {"modality": modality, "model_id": info["model_id"], "dim": info["dim"], "cache_hits": hits}
        return vectors_response(head, vecs)

    @v1.post("/embed", openapi_extra=json_body(schemas["embed"]), summary="Embed a list of one modality")
    async def embed(request: Request):
        data = await read_json(request, settings.max_body_bytes)
        mods = [m for m in MODALITIES if m in data]
        unknown = sorted(set(data) - set(MODALITIES))
        if unknown:
            raise invalid(f"unknown field(s) {unknown}; give one of {list(MODALITIES)}")
        if len(mods) != 1:
            raise invalid(f"give exactly one of {list(MODALITIES)} (got {mods or 'none'})")
        m = mods[0]
        raws = raw_inputs(m, as_list(data[m], m), m)
        return embeddings_response(m, *await backend.embed(m, raws))

    binary_doc = {
        "requestBody": {
            "required": True,
            "content": {
                t: {"schema": {"type": "string", "format": "binary"}}
                for ts in BINARY_TYPES.values()
                for t in ts
            },
        }
    }

    @v1.post("/embed/{modality}", openapi_extra=binary_doc, summary="Embed one raw file (image/png ...)")
    async def embed_binary(modality: str, request: Request):
        if modality not in BINARY_TYPES:
            raise APIError(404, "not_found", f"no modality {modality!r}; one of {list(BINARY_TYPES)}")
        mt = media_type(request)
        if mt not in BINARY_TYPES[modality]:
            raise APIError(
                415,
                "unsupported_media_type",
                f"Content-Type {mt or 'missing'!r} for {modality}; send one of {list(BINARY_TYPES[modality])}",
            )
        body = await read_body(request, settings.max_body_bytes)
        if not body:
            raise invalid("body is empty")
        return embeddings_response(modality, *await backend.embed(modality, [body]))

    def need_index():
        if app.state.index is None:
            raise APIError(404, "no_index", "this server has no index: start it with --index INDEX_DIR")
        return app.state.index

    @v1.post("/search", openapi_extra=json_body(schemas["search"]), summary="Caption -> top-k index images")
    async def search(request: Request):
        data = await read_json(request, settings.max_body_bytes)
        text = data.get("text")
        if not isinstance(text, str) or not text.strip():
            raise invalid("text: expected a non-empty string (the caption to search for)")
        k = data.get("k", 5)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100:
            raise invalid(f"k = {k!r}: expected an integer in [1, 100]")
        include = data.get("include_images", False)
        if not isinstance(include, bool):
            raise invalid("include_images: expected true or false")
        index = need_index()
        vecs, hits = await backend.embed("text", [text])
        results = index.search(vecs[0], k)
        body: dict[str, Any] = {"query": text, "k": k, "cache_hits": hits}
        if app.state.safety is not None:  # --scd / --filter: flags and filter counts in the response
            extra, results = await app.state.safety.search(backend, index, text, vecs[0], results)
            body.update(extra)
        if include:
            for r in results:
                r["image_png_base64"] = base64.b64encode(index.image_png(r["index"])).decode()
        return {**body, "results": results}

    @v1.get("/index", summary="What the loaded index holds")
    async def index_info():
        return need_index().info()

    @v1.get(
        "/index/image/{i}",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
        summary="Image i of the index as PNG",
    )
    async def index_image(i: int):
        index = need_index()
        if not 0 <= i < len(index):
            raise APIError(404, "not_found", f"image {i} is not in the index (0..{len(index) - 1})")
        try:
            png = await asyncio.to_thread(index.image_png, i)
        except (OSError, MediaError) as e:
            raise APIError(404, "not_found", f"image {i}: file unreadable ({e})") from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @v1.post("/classify", openapi_extra=json_body(schemas["classify"]), summary="Fusion model prediction")
    async def classify(request: Request):
        data = await read_json(request, settings.max_body_bytes)
        inputs = as_list(data.get("inputs"), "inputs") if "inputs" in data else None
        if inputs is None:
            raise invalid('inputs: expected a list of objects like {"text": ..., "image": base64}')
        mods = backend.info()["modalities"]
        samples = []
        for i, s in enumerate(inputs):
            if not isinstance(s, dict):
                raise invalid(f"inputs[{i}] is {type(s).__name__}; expected an object")
            bad = sorted(set(s) - set(mods))
            if bad:
                raise invalid(f"inputs[{i}]: unknown modality {bad}; this model has {mods}")
            if not s:
                raise invalid(f"inputs[{i}] has no modality; give at least one of {mods}")
            samples.append({m: raw_inputs(m, [v], f"inputs[{i}].{m}")[0] for m, v in s.items()})
        predictions = await backend.classify(samples)
        safety = app.state.safety
        if safety is not None and safety.classify_scd is not None:  # --scd (task classify): a flag per input
            await safety.classify(backend, samples, predictions)
        return {"predictions": predictions}


def create_app(
    model: torch.nn.Module | None = None,
    *,
    index=None,
    settings: ServeSettings | None = None,
    backend: LocalBackend | Any = None,
    model_id: str | None = None,
    safety=None,
):
    """The FastAPI app for `model` (or a ready backend), with an optional EmbeddingIndex for /v1/search.

    An embedding backend (LocalBackend, remote.RemoteBackend) gets /v1/embed, /v1/search, /v1/classify,
    /v1/index and the demo page; a `generate_api.GenerateBackend` (a unified model folder) gets /v1/generate
    instead. Both get /healthz, /metrics, the API key, the JSON errors and the OpenAPI schema. `safety`
    (serve.safety.ServeSafety): the opt-in SCD flag of /v1/search or /v1/classify and the concept filters of
    /v1/search."""
    from .. import __version__

    settings = settings or ServeSettings()
    if backend is None:
        if model is None:
            raise ValueError("create_app needs a model or a backend")
        backend = LocalBackend(Engine(model, model_id), settings)
    unified = isinstance(backend, GenerateBackend)
    metrics = RequestMetrics()

    @asynccontextmanager
    async def lifespan(app):
        yield
        await backend.close()

    app = FastAPI(
        title="mmfusion inference server",
        version=__version__,
        description="Caption, VQA and text-to-image generation for an mmfusion unified model (caption, "
        "text-to-image and joint image-caption pairs for a joint diffusion model)."
        if unified
        else "Embeddings, text-to-image search and classification for an mmfusion model.",
        lifespan=lifespan,
    )
    app.state.backend, app.state.index, app.state.settings, app.state.metrics = (
        backend,
        index,
        settings,
        metrics,
    )
    app.state.safety = safety

    install_error_handlers(app)

    # no key, no dependency: FastAPI solves even a no-op dependency on every request
    key_check = [Depends(api_key_check(settings))] if settings.api_key else []
    v1 = APIRouter(prefix="/v1", dependencies=key_check)

    if unified:
        add_generate_routes(v1, backend, settings)
    else:
        _add_embedding_routes(app, v1, backend, settings)
    app.include_router(v1)

    @app.get("/healthz", summary="Liveness and what is loaded")
    async def healthz():
        if unified:
            return {"status": "ok", **backend.info(), "batching": settings.batching}
        index = app.state.index
        return {
            "status": "ok",
            **backend.info(),
            "index_size": len(index) if index is not None else 0,
            "batching": settings.batching,
            "cache": settings.cache,
            "safety": app.state.safety.info() if app.state.safety is not None else {},
        }

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text format")
    async def prometheus():
        return prometheus_response(metrics.lines() + backend.metric_lines())

    if not unified:

        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def demo():
            return HTMLResponse(demo_page())

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def demo_page() -> str:
    try:
        return resources.files("mmfusion.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        return "<!doctype html><title>mmfusion</title><p>Demo page not installed; POST /v1/search.</p>"


__all__ = ["create_app", "demo_page"]
