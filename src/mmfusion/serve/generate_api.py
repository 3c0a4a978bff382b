"""`POST /v1/generate` for unified model folders: captioning, VQA, text -> image and audio captioning over HTTP.

    backend = GenerateBackend(GenerateEngine(load_unified(folder)), settings)
    app = create_app(backend=backend, settings=settings)   # what `mmfusion serve UNIFIED_FOLDER` does

Requests (JSON) and answers:
  {"task": "caption", "image": <base64 PNG/JPEG>}                      -> {"text": ...}
  {"task": "vqa", "image": <base64>, "question": "..."}                 -> {"text": ...}
  {"task": "image", "prompt": "...", "n": 1..8, "cfg_scale": 1.0, "seed": 0} -> {"images": [<base64 PNG>]}
  {"task": "audio_caption", "audio": <base64 WAV/FLAC/OGG>}             -> {"text": ...}
  {"task": "joint", "n": 1..8, "seed": 0}                  -> {"images": [...], "texts": [...]}
joint exists only for a joint diffusion model folder, served by `generate_diffusion.DiffusionEngine` (tasks
caption, image, joint) through this same backend.
audio_caption exists only for a model folder with audio_tokenizer/ (`train-unified --audio-tokenizer`); /healthz
lists the tasks of the loaded model, and the OpenAPI schema has only those. The model work is
`generate.GenerateEngine`'s.

Batching: caption, VQA and audio-caption requests (greedy) are grouped by one DynamicBatcher each; a group is
one `caption_images` / `answer_questions` / `caption_audio` call (prompts of equal length share one decoder
call). Text -> image requests queue on their own batcher too (bounded queue, timeout, 503), but one request per
call, its n images in one batch: the sampler draws all rows' tokens from one seeded generator, so in a group a
request's images would depend on its neighbours and `seed` would not reproduce them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from fastapi import Request

from .batching import DynamicBatcher, Overloaded
from .generate import MAX_AUDIO_SECONDS, MAX_IMAGES, TASKS, GenerateEngine
from .http import MAX_TEXT_CHARS, ServeSettings, b64_bytes, invalid, json_body, overloaded, read_json
from .metrics import batcher_lines

TEXT_TASKS = ("caption", "vqa", "audio_caption")  # the tasks that answer {"text": ...}
FIELDS = {
    "caption": ("task", "image"),
    "vqa": ("task", "image", "question"),
    "image": ("task", "prompt", "n", "cfg_scale", "seed"),
    "audio_caption": ("task", "audio"),
    "joint": ("task", "n", "seed"),
}
MAX_CFG_SCALE = 20.0
MAX_SEED = 2**32 - 1


def _short(value: Any) -> str:
    """repr for an error message, cut to 40 characters (a field may hold megabytes)."""
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


class GenerateBackend:
    """GenerateEngine + one DynamicBatcher per task; `generate(body)` parses, queues and answers a request."""

    def __init__(self, engine: GenerateEngine | Any, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        batch, delay = (settings.max_batch, settings.max_delay_ms) if settings.batching else (1, 0.0)

        def batcher(name: str, fn, max_batch: int) -> DynamicBatcher:
            return DynamicBatcher(fn, max_batch, delay, settings.queue_size, settings.timeout_s, name=name)

        calls = {
            "caption": ("caption", batch),
            "vqa": ("vqa", batch),
            "image": ("images", 1),  # one request per call: see the module docstring
            "audio_caption": ("audio_caption", batch),
            "joint": ("joint", 1),  # as image
        }
        self.batchers: dict[str, DynamicBatcher] = {
            t: batcher(t, getattr(engine, calls[t][0]), calls[t][1]) for t in engine.tasks
        }
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
        if task in ("image", "joint"):
            n = data.get("n", 1)
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
                raise invalid(f"n = {_short(n)}: expected an integer in [1, {MAX_IMAGES}]")
            cfg = data.get("cfg_scale", 1.0)  # joint: no such field (refused above as unknown)
            # compared, never converted first: float() of a 400-digit JSON integer overflows
            if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not 0 <= cfg <= MAX_CFG_SCALE:
                raise invalid(f"cfg_scale = {_short(cfg)}: expected a number in [0, {MAX_CFG_SCALE:g}]")
            seed = data.get("seed", 0)
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                raise invalid(f"seed = {_short(seed)}: expected an integer in [0, {MAX_SEED}]")
            if task == "joint":
                return task, {"n": n, "seed": seed}
            return task, {"prompt": self.engine.prompt(data), "n": n, "cfg_scale": float(cfg), "seed": seed}
        if task == "audio_caption":
            if "audio" not in data:
                raise invalid("audio: missing; task audio_caption needs a base64 WAV, FLAC or OGG file")
            return task, {"audio": b64_bytes(data["audio"], "audio")}
        if "image" not in data:
            raise invalid(f"image: missing; task {task} needs a base64 PNG or JPEG")
        fields: dict[str, Any] = {"image": b64_bytes(data["image"], "image")}
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
        if task == "joint":
            pngs, texts = await self._submit("joint", (f["n"], f["seed"]))
            self.images_total += len(pngs)
            for t in texts:
                self.text_tokens[task] += self.engine.text_tokens(t)
            return {**out, "images": pngs, "texts": texts}
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
            "# HELP mmfusion_generated_text_tokens_total Tokens of the captions and answers returned (BPE; words "
            "for a diffusion model).",
            "# TYPE mmfusion_generated_text_tokens_total counter",
        ]
        lines += [
            f'mmfusion_generated_text_tokens_total{{task="{t}"}} {self.text_tokens[t]}'
            for t in (*TEXT_TASKS, "joint")
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
        return lines + batcher_lines(self.batchers)

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
        {
            "type": "object",
            "title": "joint",
            "required": ["task"],
            "properties": {
                "task": {"type": "string", "enum": ["joint"]},
                "n": {"type": "integer", "minimum": 1, "maximum": MAX_IMAGES, "default": 1},
                "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED, "default": 0},
            },
            "additionalProperties": False,
        },
    ]
    return {"oneOf": [b for b in bodies if b["title"] in tasks]}


def add_generate_routes(v1, backend: GenerateBackend, settings: ServeSettings) -> None:
    """POST /v1/generate on the `/v1` router (API key and error handling come from the app)."""

    @v1.post(
        "/generate",
        openapi_extra=json_body(generate_schema(backend.engine.tasks)),
        summary="Caption an image or an audio clip, answer a question about an image, or generate images (or image-caption pairs)",
    )
    async def generate(request: Request):
        data = await read_json(request, settings.max_body_bytes)
        return await backend.generate(data)


__all__ = ["GenerateBackend", "add_generate_routes", "generate_schema"]
