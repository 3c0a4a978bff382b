"""The engine of `POST /v1/generate` for joint diffusion model folders (`mmfusion.diffusion`, docs/diffusion.md).

    engine = DiffusionEngine(load_diffusion_model(folder))   # what `mmfusion serve DIFFUSION_FOLDER` does
    backend = GenerateBackend(engine, settings)               # the same HTTP side as unified models

It offers the interface `generate_api.GenerateBackend` uses for the tasks a diffusion model has:
  {"task": "image", "prompt": "...", "n": 1..8, "cfg_scale": 1.0, "seed": 0} -> {"images": [<base64 PNG>]}
  {"task": "caption", "image": <base64 PNG/JPEG>}                         -> {"text": ...}
  {"task": "joint", "n": 1..8, "seed": 0}                                  -> {"images": [...], "texts": [...]}
The work is `mmfusion generate`'s (`diffusion.generate`): `sampling.sample` with DDIM_STEPS steps, eta 0, the
EMA weights; a prompt goes through the model's TextCodec (the world's caption vocabulary; an unknown word is a
400 naming it). An upload is decoded as for unified models (`media.read_image`, `preprocess_image` at the
model's size). Sampling draws every row's noise from one seeded generator, so each request (and each caption
image, with seed 0) is its own `sample` call: an answer never depends on the requests batched beside it.
Model calls are serialised (one lock).
"""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..modalities.image import preprocess_image
from .engine import model_fingerprint
from .generate import MAX_IMAGES
from .http import MAX_TEXT_CHARS, invalid
from .media import read_image

DIFFUSION_TASKS = ("caption", "image", "joint")
DDIM_STEPS = 25  # `mmfusion generate --ddim-steps` default


def load_diffusion_model(path: str | Path):
    """`diffusion.recipe.load_diffusion(path)` on CUDA when there is one, else on the CPU."""
    from ..diffusion.recipe import load_diffusion

    return load_diffusion(path, map_location="cuda" if torch.cuda.is_available() else "cpu")


def _pngs(images: torch.Tensor) -> list[str]:
    """(N, 3, S, S) in [-1, 1] -> N base64 PNGs."""
    from PIL import Image

    from ..diffusion.latents import images_to_unit

    out = []
    for im in images_to_unit(images).numpy():  # (S, S, 3) uint8
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


class DiffusionEngine:
    """A loaded JointDiffusion: request validation and the model calls of /v1/generate (in worker threads)."""

    def __init__(self, model, model_id: str | None = None, steps: int = DDIM_STEPS):
        from ..diffusion.recipe import text_codec

        self.model = model.eval()
        self.model_id = model_id or model_fingerprint(model)
        self.tasks = DIFFUSION_TASKS
        self.codec = text_codec(model.cfg)
        self.image_size = model.cfg.image_size
        self.tokens_per_image = model.cfg.image_tokens
        self.steps = steps
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        """What /healthz reports: the loaded model's tasks and sizes."""
        return {
            "model_type": "joint_diffusion",
            "model_id": self.model_id,
            "tasks": list(self.tasks),
            "image_size": self.image_size,
            "text_len": self.codec.text_len,
            "ddim_steps": self.steps,
            "max_images": MAX_IMAGES,
        }

    # ---- validation (raises APIError naming the field) ------------------------------------------------
    def image(self, data: bytes) -> torch.Tensor:
        """Image file bytes -> (3, S, S) in [-1, 1] at the model's size. CPU work: call it off the event loop."""
        try:
            return preprocess_image(read_image(data, "image"), self.image_size)
        except DataError as e:
            raise invalid(f"image: {e}") from None

    def prompt(self, data: dict[str, Any]) -> str:
        """The text -> image prompt: a non-empty string the model's TextCodec can encode."""
        value = data.get("prompt")
        if value is None:
            raise invalid("prompt: missing; expected a non-empty string")
        if not isinstance(value, str):
            raise invalid(f"prompt is {type(value).__name__}; expected a non-empty string")
        if not value.strip():
            raise invalid("prompt is empty")
        if len(value) > MAX_TEXT_CHARS:
            raise invalid(f"prompt has {len(value)} characters; at most {MAX_TEXT_CHARS}")
        try:
            self.codec.ids(value)
        except DataError as e:
            raise invalid(f"prompt: {e}") from None
        return value

    # ---- model calls (worker threads) -----------------------------------------------------------------
    def _sample(self, task: str, **kw):
        from ..diffusion.sampling import sample

        with self._lock, torch.inference_mode():
            return sample(self.model, task, steps=self.steps, **kw)

    def caption(self, images: list[torch.Tensor]) -> list[str]:
        """(3, S, S) images -> one caption each (unguided, seed 0; one sample call per image)."""
        return [self.codec.decode(self._sample("caption", image=im[None]).text)[0] for im in images]

    def images(self, requests: list[tuple[str, int, float, int]]) -> list[list[str]]:
        """(prompt, n, cfg_scale, seed) requests -> each its n images as base64 PNGs."""
        out = []
        for prompt, n, cfg_scale, seed in requests:
            text = self.codec.encode([prompt] * n)
            out.append(_pngs(self._sample("image", text=text, guidance=cfg_scale, seed=seed).image))
        return out

    def joint(self, requests: list[tuple[int, int]]) -> list[tuple[list[str], list[str]]]:
        """(n, seed) requests -> each its n (image, caption) pairs as (base64 PNGs, captions)."""
        out = []
        for n, seed in requests:
            s = self._sample("joint", n=n, seed=seed)
            out.append((_pngs(s.image), self.codec.decode(s.text)))
        return out

    def text_tokens(self, text: str) -> int:
        """Words of a returned caption (the generated-token counter)."""
        return len(text.split())


__all__ = ["DDIM_STEPS", "DIFFUSION_TASKS", "DiffusionEngine", "load_diffusion_model"]
