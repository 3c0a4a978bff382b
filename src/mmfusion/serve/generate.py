"""`POST /v1/generate` for unified model folders: captioning, VQA, text -> image and audio captioning over HTTP.

    backend = GenerateBackend(GenerateEngine(load_unified(folder)), settings)
    app = create_app(backend=backend, settings=settings)   # what `mmfusion serve UNIFIED_FOLDER` does

Requests (JSON) and answers:
  {"task": "caption", "image": <base64 PNG/JPEG>}                      -> {"text": ...}
  {"task": "vqa", "image": <base64>, "question": "..."}                 -> {"text": ...}
  {"task": "image", "prompt": "...", "n": 1..8, "cfg_scale": 1.0, "seed": 0} -> {"images": [<base64 PNG>]}
  {"task": "audio_caption", "audio": <base64 WAV/FLAC/OGG>}             -> {"text": ...}
audio_caption exists only for a model folder with audio_tokenizer/ (`train-unified --audio-tokenizer`); /healthz
lists the tasks of the loaded model, and the OpenAPI schema has only those.

The work is that of `mmfusion generate` (`unified.generate_cli`: `caption_images`, `answer_questions`,
`generate_images`, `caption_audio`, with the CLI's defaults: greedy text of at most 40 tokens, sampled
images), and an image becomes VQ codes as there: `preprocess_image` of the RGB image at the tokenizer's size,
then `encode_images`; a clip goes through the CLI's `load_audios` (soundfile, then the model's AudioFrontEnd),
then `encode_images` with the audio tokenizer.

Batching: caption, VQA and audio-caption requests (greedy) are grouped by one DynamicBatcher each; a group is
one `caption_images` / `answer_questions` / `caption_audio` call (prompts of equal length share one decoder
call). Text ->
image requests queue on their own batcher too (bounded queue, timeout, 503), but one request per call, its
n images in one batch: the sampler draws all rows' tokens from one seeded generator, so in a group a
request's images would depend on its neighbours and `seed` would not reproduce them. Model calls are
serialised (one lock): the batchers share one model.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from fastapi import Request

from ..errors import DataError
from .batching import DynamicBatcher, Overloaded
from .server import (
    MAX_TEXT_CHARS,
    ServeSettings,
    _b64,
    _batcher_lines,
    _json_body,
    decode_image,
    invalid,
    model_fingerprint,
    overloaded,
    read_json,
    undecodable,
)

TASKS = ("caption", "vqa", "image", "audio_caption")  # audio_caption: only with an audio tokenizer
TEXT_TASKS = ("caption", "vqa", "audio_caption")  # the tasks that answer {"text": ...}
FIELDS = {
    "caption": ("task", "image"),
    "vqa": ("task", "image", "question"),
    "image": ("task", "prompt", "n", "cfg_scale", "seed"),
    "audio_caption": ("task", "audio"),
}
MAX_IMAGES = 8  # n per text -> image request
MAX_CFG_SCALE = 20.0
MAX_SEED = 2**32 - 1
MAX_NEW_TOKENS = 40  # longest caption / answer: `mmfusion generate --max-new-tokens` default
# Longest clip accepted (the header's frames / rate, checked before decoding). The model hears only the
# AudioFrontEnd's first `seconds` (0.5 s by default): the rest is trimmed, so a longer clip only costs decoding.
MAX_AUDIO_SECONDS = 30.0
# Sample rates accepted (any rate in between: resampling goes through libsoxr, whose cost is linear in the
# clip for every rate ratio).
MIN_AUDIO_RATE, MAX_AUDIO_RATE = 1000, 384000


def _short(value: Any) -> str:
    """repr for an error message, cut to 40 characters (a field may hold megabytes)."""
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def unified_folder(path: str | Path) -> Path | None:
    """The unified model folder at `path` (or at `path/model`, a run directory, as `load_model` looks), or
    None. A folder counts when it has the parts only a unified model folder has (`decoder/` or `vocab.json`);
    `UnifiedBundle.load` then names any part that is missing."""
    for d in (Path(path), Path(path) / "model"):
        if (d / "decoder").is_dir() or (d / "vocab.json").is_file():
            return d
    return None


def load_unified(path: str | Path):
    """`UnifiedBundle.load(path)` on CUDA when there is one, else on the CPU (fp32)."""
    from ..unified.train import UnifiedBundle

    return UnifiedBundle.load(path, map_location="cuda" if torch.cuda.is_available() else "cpu")


# ---- the engine: validation and the batched task calls ---------------------------------------------------
class GenerateEngine:
    """A loaded UnifiedBundle: request validation and one batched call per task (run in worker threads)."""

    def __init__(self, bundle, model_id: str | None = None):
        from ..unified.generate_cli import code_grid

        self.bundle = bundle
        parts = {"decoder": bundle.decoder, "image_tokenizer": bundle.vqvae}
        if bundle.audio_vqvae is not None:  # folders without audio keep the ids they had
            parts["audio_tokenizer"] = bundle.audio_vqvae
        self.model_id = model_id or model_fingerprint(torch.nn.ModuleDict(parts))
        self.audio_frontend = bundle.audio_frontend  # None without audio_tokenizer/
        self.tasks = tuple(t for t in TASKS if t != "audio_caption" or self.audio_frontend is not None)
        self.builder = bundle.builder
        self.image_size = bundle.vqvae.image_size
        self.max_len = bundle.decoder.cfg.max_len
        self.tokens_per_image = bundle.vocab.tokens_per_image
        self._blank_codes = torch.zeros(code_grid(bundle), dtype=torch.long)  # for prompt lengths
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.bundle.decoder.parameters()).device

    def info(self) -> dict[str, Any]:
        """What /healthz reports: the loaded model's tasks and input sizes."""
        out = {
            "model_type": "unified",
            "model_id": self.model_id,
            "tasks": list(self.tasks),
            "image_size": self.image_size,
            "tokens_per_image": self.tokens_per_image,
            "max_len": self.max_len,
            "max_images": MAX_IMAGES,
        }
        if self.audio_frontend is not None:
            out.update(
                audio_sample_rate=self.audio_frontend.sample_rate,
                audio_seconds=self.audio_frontend.seconds,  # what the model hears of a clip
                tokens_per_audio=self.bundle.vocab.tokens_per_audio,
                max_audio_seconds=MAX_AUDIO_SECONDS,
            )
        return out

    # ---- validation (raises APIError naming the field) ------------------------------------------------
    def image(self, data: bytes) -> torch.Tensor:
        """Image file bytes -> (3, S, S) in [-1, 1] at the tokenizer's size, as `mmfusion generate` reads
        files (RGB, then preprocess_image). CPU work: call it off the event loop."""
        from ..modalities.image import preprocess_image

        try:
            return preprocess_image(decode_image(data, "image").convert("RGB"), self.image_size)
        except DataError as e:
            raise invalid(f"image: {e}") from None

    def audio(self, data: bytes) -> torch.Tensor:
        """Audio file bytes (WAV/FLAC/OGG) -> (1, n_mels, frames) AudioFrontEnd spectrogram, read by the CLI's
        `load_audios`. The header is checked first (rate, length), so a long clip is refused undecoded.
        CPU work: call it off the event loop."""
        import soundfile as sf

        from ..unified.tokenize_cli import load_audios

        try:
            info = sf.info(io.BytesIO(data))
        except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
            raise undecodable(
                f"audio is not a decodable audio file ({type(e).__name__}); send WAV, FLAC or OGG"
            ) from None
        if info.frames <= 0:
            raise invalid("audio has no samples")
        if not MIN_AUDIO_RATE <= info.samplerate <= MAX_AUDIO_RATE:
            raise invalid(
                f"audio has sample rate {info.samplerate} Hz; expected {MIN_AUDIO_RATE}-{MAX_AUDIO_RATE} Hz"
            )
        seconds = info.frames / info.samplerate
        if seconds > MAX_AUDIO_SECONDS:
            raise invalid(f"audio is {seconds:.2f} s long; at most {MAX_AUDIO_SECONDS:g} s")
        try:
            # soundfile reads file-like objects as well as paths: the CLI's reader, on the request's bytes
            spec = load_audios([("audio", io.BytesIO(data))], self.audio_frontend)[0]
        except DataError as e:
            if str(e).startswith("cannot read audio"):  # its header reads, its samples do not
                raise undecodable(f"audio is a {info.format} file whose samples cannot be decoded") from None
            if "no samples" in str(e):
                raise invalid("audio has no samples") from None
            message = str(e) if str(e).startswith("audio") else f"audio: {e}"  # e.g. NaN samples
            raise invalid(message) from None
        return spec

    def _text(self, data: dict[str, Any], field: str) -> str:
        value = data.get(field)
        if value is None:
            raise invalid(f"{field}: missing; expected a non-empty string")
        if not isinstance(value, str):
            raise invalid(f"{field} is {type(value).__name__}; expected a non-empty string")
        if not value.strip():
            raise invalid(f"{field} is empty")
        if len(value) > MAX_TEXT_CHARS:
            raise invalid(f"{field} has {len(value)} characters; at most {MAX_TEXT_CHARS}")
        return value

    def question(self, data: dict[str, Any]) -> str:
        """The VQA question, checked to fit the model's max_len after the image's codes."""
        q = self._text(data, "question")
        n = len(self.builder.vqa(self._blank_codes, q).ids)
        if n > self.max_len:
            extra = n - len(self.builder.text_ids(q))
            raise invalid(
                f"question is too long: {n - extra} tokens; this model (max_len {self.max_len}) takes at most "
                f"{self.max_len - extra} after the image's {self.tokens_per_image} codes"
            )
        return q

    def prompt(self, data: dict[str, Any]) -> str:
        """The text -> image prompt, checked to leave room in max_len for one image's codes and <eoi>."""
        p = self._text(data, "prompt")
        n = len(self.builder.image(p).ids) + self.tokens_per_image  # generate: prompt + new - 1 <= max_len
        if n > self.max_len:
            extra = n - len(self.builder.text_ids(p))
            raise invalid(
                f"prompt is too long: {n - extra} tokens; this model (max_len {self.max_len}) takes at most "
                f"{self.max_len - extra} before the image's {self.tokens_per_image} codes"
            )
        return p

    # ---- batched model calls (worker threads) ---------------------------------------------------------
    def _codes(self, images: list[torch.Tensor]) -> torch.Tensor:
        from ..unified.train import encode_images

        return encode_images(self.bundle.vqvae, torch.stack(images).to(self.device))

    def caption(self, images: list[torch.Tensor]) -> list[str]:
        """(3, S, S) images -> one caption each (greedy, as `mmfusion generate --task caption`)."""
        from ..unified.generate_cli import caption_images

        with self._lock, torch.inference_mode():
            return caption_images(self.bundle, self._codes(images), max_new_tokens=MAX_NEW_TOKENS)

    def vqa(self, items: list[tuple[torch.Tensor, str]]) -> list[str]:
        """(image, question) pairs -> one answer each (greedy, as `mmfusion generate --task vqa`)."""
        from ..unified.generate_cli import answer_questions

        with self._lock, torch.inference_mode():
            codes = self._codes([im for im, _ in items])
            return answer_questions(self.bundle, codes, [q for _, q in items], max_new_tokens=MAX_NEW_TOKENS)

    def audio_caption(self, specs: list[torch.Tensor]) -> list[str]:
        """(1, n_mels, frames) spectrograms -> one caption each (greedy, as `mmfusion generate --task
        audio-caption`)."""
        from ..unified.generate_cli import caption_audio
        from ..unified.train import encode_images

        vq = self.bundle.audio_vqvae
        with self._lock, torch.inference_mode():
            codes = encode_images(vq, torch.stack(specs).to(next(vq.parameters()).device))
            return caption_audio(self.bundle, codes, max_new_tokens=MAX_NEW_TOKENS)

    def images(self, requests: list[tuple[str, int, float, int]]) -> list[list[str]]:
        """(prompt, n, cfg_scale, seed) requests -> each its n images as base64 PNGs (one generate call per
        request: see the module docstring)."""
        from PIL import Image

        from ..unified.generate_cli import generate_images
        from ..unified.generation import SamplingConfig

        out = []
        for prompt, n, cfg_scale, seed in requests:
            with self._lock, torch.inference_mode():
                images, _ = generate_images(
                    self.bundle, [prompt], n, cfg_scale, SamplingConfig(strategy="sample", seed=seed)
                )
            pngs = []
            for im in images.numpy():  # (S, S, 3) uint8
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, format="PNG")
                pngs.append(base64.b64encode(buf.getvalue()).decode())
            out.append(pngs)
        return out

    def text_tokens(self, text: str) -> int:
        """BPE tokens of a returned caption / answer (the generated-token counter; <eos> not counted)."""
        return len(self.bundle.text_tokenizer.tokenizer.encode(text).ids) if text.strip() else 0


# ---- the backend: a batcher per task, counters -----------------------------------------------------------
class GenerateBackend:
    """GenerateEngine + one DynamicBatcher per task; `generate(body)` parses, queues and answers a request."""

    def __init__(self, engine: GenerateEngine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        batch, delay = (settings.max_batch, settings.max_delay_ms) if settings.batching else (1, 0.0)

        def batcher(name: str, fn, max_batch: int) -> DynamicBatcher:
            return DynamicBatcher(fn, max_batch, delay, settings.queue_size, settings.timeout_s, name=name)

        self.batchers: dict[str, DynamicBatcher] = {
            "caption": batcher("caption", engine.caption, batch),
            "vqa": batcher("vqa", engine.vqa, batch),
            "image": batcher("image", engine.images, 1),  # one request per call: see the module docstring
        }
        if "audio_caption" in engine.tasks:
            self.batchers["audio_caption"] = batcher("audio_caption", engine.audio_caption, batch)
        self.text_tokens: Counter[str] = Counter()
        self.images_total = 0

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def parse(self, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Validate everything but the image / audio bytes' content; returns (task, fields)."""
        tasks = list(self.engine.tasks)
        task = data.get("task")
        if task is None:
            raise invalid(f"task: missing; expected one of {tasks}")
        if task == "audio_caption" and task not in tasks:
            raise invalid(
                "task = 'audio_caption': this model has no audio tokenizer (audio_tokenizer/ in its folder; "
                "train it with `mmfusion train-unified --audio-tokenizer DIR`)"
            )
        if task not in tasks:
            raise invalid(f"task = {_short(task)}: expected one of {tasks}")
        unknown = sorted(set(data) - set(FIELDS[task]))
        if unknown:
            raise invalid(
                f"unknown field(s) {_short(unknown)} for task {task}; allowed: {list(FIELDS[task])}"
            )
        if task == "image":
            n = data.get("n", 1)
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
                raise invalid(f"n = {_short(n)}: expected an integer in [1, {MAX_IMAGES}]")
            cfg = data.get("cfg_scale", 1.0)
            # compared, never converted first: float() of a 400-digit JSON integer overflows
            if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not 0 <= cfg <= MAX_CFG_SCALE:
                raise invalid(f"cfg_scale = {_short(cfg)}: expected a number in [0, {MAX_CFG_SCALE:g}]")
            seed = data.get("seed", 0)
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                raise invalid(f"seed = {_short(seed)}: expected an integer in [0, {MAX_SEED}]")
            return task, {"prompt": self.engine.prompt(data), "n": n, "cfg_scale": float(cfg), "seed": seed}
        if task == "audio_caption":
            if "audio" not in data:
                raise invalid("audio: missing; task audio_caption needs a base64 WAV, FLAC or OGG file")
            return task, {"audio": _b64(data["audio"], "audio")}
        if "image" not in data:
            raise invalid(f"image: missing; task {task} needs a base64 PNG or JPEG")
        fields: dict[str, Any] = {"image": _b64(data["image"], "image")}
        if task == "vqa":
            fields["question"] = self.engine.question(data)
        return task, fields

    async def _submit(self, task: str, item: Any) -> Any:
        try:
            return await self.batchers[task].submit(item)
        except Overloaded as e:
            raise overloaded(e) from None

    async def generate(self, data: dict[str, Any]) -> dict[str, Any]:
        task, f = self.parse(data)
        out: dict[str, Any] = {"task": task, "model_id": self.engine.model_id}
        if task == "image":
            pngs = await self._submit("image", (f["prompt"], f["n"], f["cfg_scale"], f["seed"]))
            self.images_total += len(pngs)
            return {**out, "images": pngs}
        if task == "audio_caption":
            item = await asyncio.to_thread(self.engine.audio, f["audio"])  # decoding is CPU work
        else:
            image = await asyncio.to_thread(self.engine.image, f["image"])
            item = image if task == "caption" else (image, f["question"])
        text = await self._submit(task, item)
        self.text_tokens[task] += self.engine.text_tokens(text)
        return {**out, "text": text}

    def metric_lines(self) -> list[str]:
        lines = [
            "# HELP mmfusion_generated_text_tokens_total BPE tokens of the captions and answers returned.",
            "# TYPE mmfusion_generated_text_tokens_total counter",
        ]
        lines += [
            f'mmfusion_generated_text_tokens_total{{task="{t}"}} {self.text_tokens[t]}'
            for t in TEXT_TASKS
            if t in self.engine.tasks
        ]
        lines += [
            "# HELP mmfusion_generated_images_total Images returned by text -> image requests.",
            "# TYPE mmfusion_generated_images_total counter",
            f"mmfusion_generated_images_total {self.images_total}",
            "# HELP mmfusion_generated_image_tokens_total Image codes generated (images x tokens per image).",
            "# TYPE mmfusion_generated_image_tokens_total counter",
            f"mmfusion_generated_image_tokens_total {self.images_total * self.engine.tokens_per_image}",
        ]
        return lines + _batcher_lines(self.batchers)

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()


# ---- the route ---------------------------------------------------------------------------------------------
def generate_schema(tasks: tuple[str, ...] = TASKS) -> dict[str, Any]:
    """The request body of /v1/generate as JSON Schema: one object per task in `tasks` (a loaded model's)."""
    text = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS, "pattern": r"\S"}
    image = {"type": "string", "format": "byte", "minLength": 1, "description": "base64 PNG or JPEG"}
    audio = {
        "type": "string",
        "format": "byte",
        "minLength": 1,
        "description": f"base64 WAV, FLAC or OGG, at most {MAX_AUDIO_SECONDS:g} s",
    }
    bodies = [
        {
            "type": "object",
            "title": "caption",
            "required": ["task", "image"],
            "properties": {"task": {"type": "string", "enum": ["caption"]}, "image": image},
            "additionalProperties": False,
        },
        {
            "type": "object",
            "title": "vqa",
            "required": ["task", "image", "question"],
            "properties": {
                "task": {"type": "string", "enum": ["vqa"]},
                "image": image,
                "question": text,
            },
            "additionalProperties": False,
        },
        {
            "type": "object",
            "title": "image",
            "required": ["task", "prompt"],
            "properties": {
                "task": {"type": "string", "enum": ["image"]},
                "prompt": text,
                "n": {"type": "integer", "minimum": 1, "maximum": MAX_IMAGES, "default": 1},
                "cfg_scale": {"type": "number", "minimum": 0, "maximum": MAX_CFG_SCALE, "default": 1.0},
                "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED, "default": 0},
            },
            "additionalProperties": False,
        },
        {
            "type": "object",
            "title": "audio_caption",
            "required": ["task", "audio"],
            "properties": {"task": {"type": "string", "enum": ["audio_caption"]}, "audio": audio},
            "additionalProperties": False,
        },
    ]
    return {"oneOf": [b for b in bodies if b["title"] in tasks]}


def add_generate_routes(v1, backend: GenerateBackend, settings: ServeSettings) -> None:
    """POST /v1/generate on the `/v1` router (API key and error handling come from the app)."""

    @v1.post(
        "/generate",
        openapi_extra=_json_body(generate_schema(backend.engine.tasks)),
        summary="Caption an image or an audio clip, answer a question about an image, or generate images",
    )
    async def generate(request: Request):
        data = await read_json(request, settings.max_body_bytes)
        return await backend.generate(data)


__all__ = [
    "MAX_AUDIO_SECONDS",
    "GenerateBackend",
    "GenerateEngine",
    "add_generate_routes",
    "generate_schema",
    "unified_folder",
    "load_unified",
]
