"""HTTP inference server (FastAPI): embeddings, text -> image search, classification, metrics, demo page.

    app = create_app(model, index=index, settings=ServeSettings(max_batch=32))   # an ASGI app
    uvicorn.run(app, host="127.0.0.1", port=8000)                                 # what `mmfusion serve` does

Layers: `Engine` wraps a model (decode + validate raw inputs, one batched model call per modality);
`LocalBackend` puts the feature cache and one DynamicBatcher per encoder in front of it; `split.RemoteBackend`
(the `--split` deployment) keeps the cache and sends the model work over HTTP to an encoder service and a
fusion service. The app itself only parses requests, maps errors to status codes and records metrics.
A unified model folder gets `generate.GenerateBackend` instead (POST /v1/generate: caption, VQA, text ->
image) and none of the embedding routes.

Errors are JSON `{"error": {"status", "code", "message"}}`: 400 non-JSON body or undecodable media, 401 bad
or missing API key, 404 unknown route / no index / no classifier, 413 body over the limit, 415 wrong
Content-Type, 422 well-formed but invalid input (shape, NaN, empty text, wrong field), 503 + Retry-After
when a queue is full or a request times out. Anything unexpected is a 500 with the exception's type, never a
dropped connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import json
import math
import time
from collections import Counter, deque
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch

try:  # the `serve` extra
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - the CLI prints this
    raise ImportError(f"the server needs FastAPI: pip install 'mmfusion[serve]' ({e})") from None

from ..batch import Batch
from ..errors import DataError
from .batching import DynamicBatcher, Overloaded
from .cache import FeatureCache, content_key

MODALITIES = ("text", "image", "audio", "video")
MAX_ITEMS = 256  # inputs per request
MAX_TEXT_CHARS = 10_000
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_VIDEO_FRAMES = 512
BINARY_TYPES = {
    "image": ("image/png", "image/jpeg"),
    "audio": ("audio/wav", "audio/x-wav", "audio/wave"),
    "video": ("application/x-npy", "application/octet-stream"),
    "text": ("text/plain",),
}


# ---- settings and errors ----------------------------------------------------------------------------------
@dataclass
class ServeSettings:
    max_batch: int = 32
    max_delay_ms: float = 5.0
    queue_size: int = 256
    timeout_s: float = 10.0
    cache_size: int = 4096
    batching: bool = True
    cache: bool = True
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024


class APIError(Exception):
    """An error with its HTTP status, a short machine code and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def invalid(message: str) -> APIError:
    return APIError(422, "invalid_input", message)


def undecodable(message: str) -> APIError:
    return APIError(400, "undecodable_input", message)


def overloaded(e: Overloaded) -> APIError:
    return APIError(503, e.reason, str(e), {"Retry-After": str(max(1, int(math.ceil(e.retry_after_s))))})


# ---- the model engine -------------------------------------------------------------------------------------
def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the config and weights (16 hex digits): the model id in cache keys and index files."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "model_dump_json"):
        h.update(config.model_dump_json().encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise invalid(f"{what} is {type(value).__name__}; expected a base64 string")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise undecodable(f"{what} is not valid base64") from None
    if not data:
        raise invalid(f"{what} is empty")
    return data


def decode_image(data: bytes, what: str):
    """Image file bytes -> a loaded PIL image; 400 when they are not a decodable image, 422 when it has more
    than MAX_IMAGE_PIXELS pixels (checked from the header, before the pixels are decoded)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise invalid(f"{what} is {im.width}x{im.height}; at most {MAX_IMAGE_PIXELS} pixels")
            im.load()
            return im.copy()
    except APIError:
        raise
    except Image.DecompressionBombError as e:
        raise invalid(f"{what}: {e}") from None
    except Exception as e:  # PIL raises many types for broken files
        raise undecodable(f"{what} is not a decodable image ({type(e).__name__}); send PNG or JPEG") from None


class Engine:
    """A loaded model: which modalities it embeds, how raw inputs become tensors, one batched call each.

    ContrastiveModel: text and image, its own projection heads (the training embedding space).
    MultiModalModel: every encoder it has; an embedding is the mean of the encoder's projected tokens
    (the fusion input), L2-normalised; `classify` runs the whole model (fusion + head).
    prune_threshold, prune_means: a router-fusion model with its pruning calibration
    (mmfusion.eval.pruning.pruning_model) classifies with modality pruning at this gate threshold; each
    prediction then lists its skipped modalities ("pruned").
    """

    def __init__(
        self,
        model: torch.nn.Module,
        model_id: str | None = None,
        prune_threshold: float | None = None,
        prune_means: dict[str, torch.Tensor] | None = None,
    ):
        from ..models.contrastive import ContrastiveModel

        self.model = model.eval()
        self.prune_threshold, self.prune_means = prune_threshold, prune_means
        self.model_id = model_id or model_fingerprint(model)
        self.contrastive = isinstance(model, ContrastiveModel)
        if self.contrastive:
            self.model_type = "contrastive"
            self.keys = {"text": "text", "image": "image"}  # modality -> batch key
            self.dim = model.config.embed_dim
        else:
            self.model_type = "multimodal"
            self.keys = {cfg.kind: key for key, cfg in sorted(model.config.encoders.items())}
            self.dim = model.config.dim
        self.tokenizer = model.tokenizer
        self._token_shapes: dict[str, tuple[int, int]] = {}

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if m in self.keys]

    @property
    def can_classify(self) -> bool:
        return not self.contrastive

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "model_id": self.model_id,
            "modalities": self.modalities,
            "dim": self.dim,
        }
        if self.can_classify:
            out["head"] = self.model.config.head
            out["n_classes"] = self.model.config.n_classes if self.model.config.head == "classify" else 2
        if self.prune_threshold is not None:
            out["prune_threshold"] = self.prune_threshold
        return out

    def _cfg(self, modality: str):
        return None if self.contrastive else self.model.config.encoders[self.keys[modality]]

    # ---- decoding: raw request payload -> model-ready item ------------------------------------------------
    def prepare(self, modality: str, raw: bytes | str, what: str) -> Any:
        """Validate and preprocess one input; raises APIError (400 undecodable, 422 invalid)."""
        if modality not in self.keys:
            raise invalid(f"this model has no {modality} encoder; it embeds {', '.join(self.modalities)}")
        if modality == "text":
            if isinstance(raw, bytes):
                try:
                    raw = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise undecodable(f"{what} is not UTF-8 text") from None
            if not isinstance(raw, str):
                raise invalid(f"{what} is {type(raw).__name__}; expected a string")
            if not raw.strip():
                raise invalid(f"{what} is empty")
            if len(raw) > MAX_TEXT_CHARS:
                raise invalid(f"{what} has {len(raw)} characters; at most {MAX_TEXT_CHARS}")
            return raw
        try:
            if modality == "image":
                return self._image(raw, what)
            if modality == "audio":
                return self._audio(raw, what)
            return self._video(raw, what)
        except DataError as e:
            raise invalid(f"{what}: {e}") from None

    def _image(self, data: bytes, what: str) -> torch.Tensor:
        from ..modalities.image import preprocess_image

        size = self.model.image_size if self.contrastive else self._cfg("image").image_size
        return preprocess_image(decode_image(data, what), size)

    def _audio(self, data: bytes, what: str) -> torch.Tensor:
        import soundfile as sf

        from ..modalities.audio import preprocess_audio

        try:
            wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
        except Exception as e:
            raise undecodable(f"{what} is not a decodable WAV file ({type(e).__name__})") from None
        if wave.size == 0:
            raise invalid(f"{what} has no samples")
        cfg = self._cfg("audio")
        seconds = max(cfg.max_frames - 1, 1) / 100.0  # hop 160 at 16 kHz: 100 frames per second
        mel = preprocess_audio(
            wave.T if wave.ndim == 2 else wave, int(sr), seconds=seconds, n_mels=cfg.n_mels
        )
        if not torch.isfinite(mel).all():
            raise invalid(f"{what} gives non-finite features (NaN or infinite samples?)")
        return mel

    def _video(self, data: bytes, what: str) -> torch.Tensor:
        from ..modalities.video import preprocess_video

        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:
            raise undecodable(f"{what} is not a decodable .npy array ({type(e).__name__})") from None
        if not isinstance(arr, np.ndarray) or arr.ndim != 4 or arr.shape[3] != 3:
            raise invalid(f"{what} has shape {getattr(arr, 'shape', None)}; expected (T, H, W, 3)")
        t, h, w, _ = arr.shape
        if not (1 <= t <= MAX_VIDEO_FRAMES) or h < 1 or w < 1 or h * w > MAX_IMAGE_PIXELS:
            raise invalid(f"{what} has shape {arr.shape}; need 1..{MAX_VIDEO_FRAMES} frames of a sane size")
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                raise invalid(f"{what} contains NaN or infinite values")
            raise invalid(f"{what} has dtype {arr.dtype}; expected uint8")
        cfg = self._cfg("video")
        return preprocess_video(arr, cfg.num_frames, cfg.image_size)

    def placeholder(self, modality: str) -> Any:
        """A valid stand-in row for an absent modality (masked out by the model)."""
        if modality == "text":
            return "a"
        cfg = self._cfg(modality)
        if modality == "image":
            return torch.zeros(3, cfg.image_size, cfg.image_size)
        if modality == "audio":
            return torch.zeros(cfg.n_mels, cfg.max_frames)
        return torch.zeros(cfg.num_frames, 3, cfg.image_size, cfg.image_size)

    # ---- model calls (run in a worker thread) ---------------------------------------------------------
    def _stack(self, modality: str, items: Sequence[Any], fixed_length: bool = False) -> torch.Tensor:
        """Prepared items -> one batch tensor. `fixed_length` pads text to the tokenizer's context length
        (the fusion paths): the fusion attends over padding tokens, so padding to the batch's longest text
        would make a prediction depend on which other requests share its batch."""
        if modality == "text":
            pad_to = self.tokenizer.context_length if fixed_length else None
            return self.tokenizer.encode(list(items), pad_to=pad_to)
        return torch.stack(list(items))

    @torch.inference_mode()
    def embed(self, modality: str, items: Sequence[Any]) -> list[np.ndarray]:
        """Prepared items of one modality -> one L2-normalised float32 vector each (one model call)."""
        x = self._stack(modality, items)
        if self.contrastive:
            emb = self.model.embed_text_ids(x) if modality == "text" else self.model.embed_image_tensor(x)
        else:
            emb = self.model.embed_modality(self.keys[modality], x)
        arr = emb.float().cpu().numpy()
        return [arr[i] for i in range(arr.shape[0])]

    @torch.inference_mode()
    def tokens(self, modality: str, items: Sequence[Any]) -> list[np.ndarray]:
        """Prepared items of one modality -> each its projected tokens (N, dim) float32: the fusion's input
        (MultiModalModel.modality_tokens, every row present; one encoder call). The encoder service's half of
        `classify`."""
        x = self._stack(modality, items, fixed_length=True).to(self.model.device)
        present = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        arr = self.model.modality_tokens(self.keys[modality], x, present).float().cpu().numpy()  # (B, N, dim)
        return [arr[i] for i in range(arr.shape[0])]

    def token_shape(self, modality: str) -> tuple[int, int]:
        """(N, dim) of `tokens(modality, ...)` rows; measured once on the placeholder input."""
        if modality not in self._token_shapes:
            self._token_shapes[modality] = self.tokens(modality, [self.placeholder(modality)])[0].shape
        return self._token_shapes[modality]

    @torch.inference_mode()
    def fuse(self, samples: Sequence[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
        """Samples (modality -> its tokens (N, dim), at least one) -> prediction dicts: fusion + head only
        (one call; absent modalities are zero rows masked out, as in MultiModalModel._encode). The fusion
        service's half of `classify`."""
        device = self.model.device
        feats, masks = {}, {}
        for m in self.modalities:
            present = torch.tensor([m in s for s in samples], dtype=torch.bool, device=device)
            rows = np.zeros((len(samples), *self.token_shape(m)), dtype=np.float32)
            for i, s in enumerate(samples):
                if m in s:
                    rows[i] = s[m]
            feats[self.keys[m]] = torch.from_numpy(rows).to(device)  # (B, N_m, dim)
            masks[self.keys[m]] = present  # (B,) True = present
        logits = self.model.logits_from_tokens(feats, masks)
        return self.predictions(logits)

    @torch.inference_mode()
    def classify(self, samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Samples (modality -> prepared item, at least one) -> prediction dicts (one model call)."""
        data, mask = {}, {}
        for m in self.modalities:
            present = [m in s for s in samples]
            fill = next((s[m] for s in samples if m in s), self.placeholder(m))
            data[self.keys[m]] = self._stack(m, [s.get(m, fill) for s in samples], fixed_length=True)
            mask[self.keys[m]] = torch.tensor(present, dtype=torch.bool)
        if self.prune_threshold is None:
            return self.predictions(self.model.logits(Batch(data, mask))[0])
        from ..eval.pruning import logits_pruned

        logits, skipped = logits_pruned(self.model, self.prune_means, Batch(data, mask), self.prune_threshold)
        out = self.predictions(logits)
        for i, p in enumerate(out):
            p["pruned"] = [
                m for m in self.modalities if self.keys[m] in skipped and bool(skipped[self.keys[m]][i])
            ]
        return out

    def predictions(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        """Head output ((B,) match logits or (B, C) class logits) -> one dict each: label, score, logits
        (and class probabilities)."""
        logits = logits.float().cpu()
        out = []
        if self.model.config.head == "match":
            for z in logits.tolist():
                p = 1.0 / (1.0 + math.exp(-z))
                out.append({"label": int(p > 0.5), "score": p, "logits": [z]})
        else:
            for z in logits:
                p = torch.softmax(z, dim=-1)
                out.append(
                    {
                        "label": int(p.argmax()),
                        "score": float(p.max()),
                        "probabilities": p.tolist(),
                        "logits": z.tolist(),
                    }
                )
        return out


# ---- backends: cache + batching around the engine (in process) or over HTTP (split) -----------------------
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
        keys = [content_key(self.engine.model_id, modality, r) for r in raws]
        if self.cache is not None:
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
        results = await asyncio.gather(
            *(self.batchers[batcher].submit(p) for p in items), return_exceptions=True
        )
        for r in results:
            if isinstance(r, Overloaded):
                raise overloaded(r)
            if isinstance(r, BaseException):
                raise r
        return list(results)

    def metric_lines(self) -> list[str]:
        lines: list[str] = []
        lines += _cache_lines(self.cache.stats() if self.cache is not None else None)
        lines += _batcher_lines(self.batchers)
        return lines

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()


def _cache_lines(stats: dict[str, Any] | None) -> list[str]:
    if stats is None:
        return ["# cache disabled"]
    return [
        "# HELP mmfusion_cache_hits_total Feature cache hits.",
        "# TYPE mmfusion_cache_hits_total counter",
        f"mmfusion_cache_hits_total {stats['hits']}",
        "# HELP mmfusion_cache_misses_total Feature cache misses.",
        "# TYPE mmfusion_cache_misses_total counter",
        f"mmfusion_cache_misses_total {stats['misses']}",
        "# HELP mmfusion_cache_hit_rate Hits / (hits + misses) since start.",
        "# TYPE mmfusion_cache_hit_rate gauge",
        f"mmfusion_cache_hit_rate {stats['hit_rate']:.6f}",
        "# TYPE mmfusion_cache_entries gauge",
        f"mmfusion_cache_entries {stats['entries']}",
        "# TYPE mmfusion_cache_evictions_total counter",
        f"mmfusion_cache_evictions_total {stats['evictions']}",
    ]


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _batcher_lines(batchers: dict[str, DynamicBatcher]) -> list[str]:
    lines = [
        "# HELP mmfusion_queue_depth Items waiting in each encoder's batching queue.",
        "# TYPE mmfusion_queue_depth gauge",
    ]
    lines += [f'mmfusion_queue_depth{{encoder="{n}"}} {b.queue_depth}' for n, b in batchers.items()]
    lines += [
        "# HELP mmfusion_model_executions_total Batched model calls.",
        "# TYPE mmfusion_model_executions_total counter",
    ]
    lines += [f'mmfusion_model_executions_total{{encoder="{n}"}} {b.executions}' for n, b in batchers.items()]
    lines += [
        "# HELP mmfusion_batch_size Items per model call.",
        "# TYPE mmfusion_batch_size histogram",
    ]
    for n, b in batchers.items():
        for le in BATCH_BUCKETS:
            count = sum(c for size, c in b.batch_sizes.items() if size <= le)
            lines.append(f'mmfusion_batch_size_bucket{{encoder="{n}",le="{le}"}} {count}')
        lines.append(f'mmfusion_batch_size_bucket{{encoder="{n}",le="+Inf"}} {b.executions}')
        lines.append(f'mmfusion_batch_size_sum{{encoder="{n}"}} {b.items}')
        lines.append(f'mmfusion_batch_size_count{{encoder="{n}"}} {b.executions}')
    lines += [
        "# HELP mmfusion_rejected_total Items refused with 503 (queue_full, timeout).",
        "# TYPE mmfusion_rejected_total counter",
    ]
    for n, b in batchers.items():
        for reason in ("queue_full", "timeout"):
            lines.append(f'mmfusion_rejected_total{{encoder="{n}",reason="{reason}"}} {b.rejected[reason]}')
    return lines


# ---- request metrics --------------------------------------------------------------------------------------
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestMetrics:
    """Request counts by (endpoint, status), a latency histogram per endpoint, and recent quantiles."""

    def __init__(self, window: int = 2048):
        self.counts: Counter[tuple[str, int]] = Counter()
        self.buckets: dict[str, list[int]] = {}
        self.sums: Counter[str] = Counter()
        self.recent: dict[str, deque[float]] = {}
        self.window = window
        self.in_flight = 0

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.counts[(endpoint, status)] += 1
        b = self.buckets.setdefault(endpoint, [0] * len(LATENCY_BUCKETS))
        for i, le in enumerate(LATENCY_BUCKETS):
            if seconds <= le:
                b[i] += 1
        self.sums[endpoint] += seconds
        self.recent.setdefault(endpoint, deque(maxlen=self.window)).append(seconds)

    def lines(self) -> list[str]:
        out = [
            "# HELP mmfusion_requests_total HTTP requests by endpoint and status.",
            "# TYPE mmfusion_requests_total counter",
        ]
        out += [
            f'mmfusion_requests_total{{endpoint="{e}",status="{s}"}} {n}'
            for (e, s), n in sorted(self.counts.items())
        ]
        out += [
            "# HELP mmfusion_request_duration_seconds Request latency.",
            "# TYPE mmfusion_request_duration_seconds histogram",
        ]
        for e, b in sorted(self.buckets.items()):
            total = sum(n for (ep, _), n in self.counts.items() if ep == e)
            out += [
                f'mmfusion_request_duration_seconds_bucket{{endpoint="{e}",le="{le}"}} {c}'
                for le, c in zip(LATENCY_BUCKETS, b)
            ]
            out.append(f'mmfusion_request_duration_seconds_bucket{{endpoint="{e}",le="+Inf"}} {total}')
            out.append(f'mmfusion_request_duration_seconds_sum{{endpoint="{e}"}} {self.sums[e]:.6f}')
            out.append(f'mmfusion_request_duration_seconds_count{{endpoint="{e}"}} {total}')
        out += [
            f"# HELP mmfusion_request_latency_seconds Latency quantiles over the last {self.window} requests.",
            "# TYPE mmfusion_request_latency_seconds summary",
        ]
        for e, r in sorted(self.recent.items()):
            arr = np.asarray(r)
            for q in (0.5, 0.9, 0.99):
                out.append(
                    f'mmfusion_request_latency_seconds{{endpoint="{e}",quantile="{q}"}} {np.quantile(arr, q):.6f}'
                )
            out.append(f'mmfusion_request_latency_seconds_sum{{endpoint="{e}"}} {arr.sum():.6f}')
            out.append(f'mmfusion_request_latency_seconds_count{{endpoint="{e}"}} {arr.size}')
        out += ["# TYPE mmfusion_requests_in_flight gauge", f"mmfusion_requests_in_flight {self.in_flight}"]
        return out


class MetricsMiddleware:
    """Pure ASGI middleware: time each HTTP request and count it under its route template and status."""

    def __init__(self, app, metrics: RequestMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight -= 1
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.observe(endpoint, status[0], time.perf_counter() - start)


# ---- request parsing --------------------------------------------------------------------------------------
def _media_type(request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed `limit` bytes (header or stream)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise APIError(400, "bad_request", f"Content-Length {length!r} is not a number") from None
        if declared > limit:
            raise APIError(413, "body_too_large", f"body is {declared} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed (JSON numbers must be finite)")


async def read_json(request, limit: int) -> dict[str, Any]:
    if _media_type(request) != "application/json":
        raise APIError(
            415,
            "unsupported_media_type",
            f"Content-Type is {request.headers.get('content-type') or 'missing'!r}; send application/json",
        )
    body = await read_body(request, limit)
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except ValueError as e:
        if "not allowed" in str(e):
            raise invalid(str(e)) from None
        raise APIError(400, "invalid_json", f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise invalid(f"body is a JSON {type(data).__name__}; expected an object")
    return data


def _as_list(value: Any, field: str) -> list[Any]:
    if isinstance(value, (str, bytes)):
        value = [value]
    if not isinstance(value, list):
        raise invalid(f"{field} is {type(value).__name__}; expected a list")
    if not value:
        raise invalid(f"{field} is an empty list")
    if len(value) > MAX_ITEMS:
        raise invalid(f"{field} has {len(value)} items; at most {MAX_ITEMS} per request")
    return value


def _raw_inputs(modality: str, values: list[Any], field: str) -> list[bytes | str]:
    if modality == "text":
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise invalid(f"{field}[{i}] is {type(v).__name__}; expected a string")
            if not v.strip():
                raise invalid(f"{field}[{i}] is empty")
        return values
    return [_b64(v, f"{field}[{i}]") for i, v in enumerate(values)]


# ---- the app ----------------------------------------------------------------------------------------------
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


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "code": code, "message": message}}, status, headers=headers
    )


def install_error_handlers(app: FastAPI) -> None:
    """Every error as JSON {"error": {"status", "code", "message"}}: APIError with its status, routing errors
    (404/405), validation errors as 422, and anything unexpected as a 500 naming the exception type."""

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error(e.status, e.code, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error(e.status_code, code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, "invalid_input", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _unexpected(request, e):
        return _error(500, "internal_error", f"{type(e).__name__}: {e}")


def _add_embedding_routes(app: FastAPI, v1: APIRouter, backend, settings: ServeSettings) -> None:
    """/v1/embed, /v1/embed/{modality}, /v1/search, /v1/index, /v1/index/image/{i}, /v1/classify on `v1`."""
    schemas = _schemas()

    def vectors(vs: list[np.ndarray]) -> list[list[float]]:
        return [np.asarray(v, dtype=np.float32).tolist() for v in vs]

    @v1.post("/embed", openapi_extra=_json_body(schemas["embed"]), summary="Embed a list of one modality")
    async def embed(request: Request):
        data = await read_json(request, settings.max_body_bytes)
        mods = [m for m in MODALITIES if m in data]
        unknown = sorted(set(data) - set(MODALITIES))
        if unknown:
            raise invalid(f"unknown field(s) {unknown}; give one of {list(MODALITIES)}")
        if len(mods) != 1:
            raise invalid(f"give exactly one of {list(MODALITIES)} (got {mods or 'none'})")
        m = mods[0]
        raws = _raw_inputs(m, _as_list(data[m], m), m)
        vecs, hits = await backend.embed(m, raws)
        info = backend.info()
        return {
            "modality": m,
            "model_id": info["model_id"],
            "dim": info["dim"],
            "cache_hits": hits,
            "embeddings": vectors(vecs),
        }

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
        mt = _media_type(request)
        if mt not in BINARY_TYPES[modality]:
            raise APIError(
                415,
                "unsupported_media_type",
                f"Content-Type {mt or 'missing'!r} for {modality}; send one of {list(BINARY_TYPES[modality])}",
            )
        body = await read_body(request, settings.max_body_bytes)
        if not body:
            raise invalid("body is empty")
        vecs, hits = await backend.embed(modality, [body])
        info = backend.info()
        return {
            "modality": modality,
            "model_id": info["model_id"],
            "dim": info["dim"],
            "cache_hits": hits,
            "embeddings": vectors(vecs),
        }

    def need_index():
        if app.state.index is None:
            raise APIError(404, "no_index", "this server has no index: start it with --index INDEX_DIR")
        return app.state.index

    @v1.post("/search", openapi_extra=_json_body(schemas["search"]), summary="Caption -> top-k index images")
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
        if include:
            for r in results:
                r["image_png_base64"] = base64.b64encode(index.image_png(r["index"])).decode()
        return {"query": text, "k": k, "cache_hits": hits, "results": results}

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
        except OSError as e:
            raise APIError(404, "not_found", f"image {i}: file unreadable ({e})") from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @v1.post("/classify", openapi_extra=_json_body(schemas["classify"]), summary="Fusion model prediction")
    async def classify(request: Request):
        data = await read_json(request, settings.max_body_bytes)
        inputs = _as_list(data.get("inputs"), "inputs") if "inputs" in data else None
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
            samples.append({m: _raw_inputs(m, [v], f"inputs[{i}].{m}")[0] for m, v in s.items()})
        return {"predictions": await backend.classify(samples)}


def create_app(
    model: torch.nn.Module | None = None,
    *,
    index=None,
    settings: ServeSettings | None = None,
    backend: LocalBackend | Any = None,
    model_id: str | None = None,
):
    """The FastAPI app for `model` (or a ready backend), with an optional EmbeddingIndex for /v1/search.

    An embedding backend (LocalBackend, split.RemoteBackend) gets /v1/embed, /v1/search, /v1/classify,
    /v1/index and the demo page; a `generate.GenerateBackend` (a unified model folder) gets /v1/generate
    instead. Both get /healthz, /metrics, the API key, the JSON errors and the OpenAPI schema."""
    from .. import __version__
    from .generate import GenerateBackend, add_generate_routes

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
        description="Caption, VQA and text-to-image generation for an mmfusion unified model."
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

    install_error_handlers(app)

    async def require_key(request: Request) -> None:
        if not settings.api_key:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(
                401,
                "unauthorized",
                "missing or wrong API key: send it as the x-api-key header or Authorization: Bearer KEY",
                {"WWW-Authenticate": "Bearer"},
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

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
        }

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text format")
    async def prometheus():
        lines = metrics.lines() + backend.metric_lines()
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

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


__all__ = [
    "APIError",
    "Engine",
    "LocalBackend",
    "ServeSettings",
    "create_app",
    "install_error_handlers",
    "model_fingerprint",
]
