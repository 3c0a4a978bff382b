"""The engine of `POST /v1/generate` for unified model folders: request validation that needs the model, and one
batched call per task (captioning, VQA, text -> image, audio captioning). The HTTP side (request parsing, one
batcher per task, counters, the route) is `generate_api.py`.

    engine = GenerateEngine(load_unified(folder))       # what `mmfusion serve UNIFIED_FOLDER` does

The work is that of `mmfusion generate` (`unified.generate_cli`: `caption_images`, `answer_questions`,
`generate_images`, `caption_audio`, with the CLI's defaults: greedy text of at most 40 tokens, sampled
images). Uploads are decoded by the modality decoders (`media.read_image`: `decode_image`, RGB;
`decode_audio`), then an image becomes VQ codes as in the CLI (`preprocess_image` at the tokenizer's size,
then `encode_images`) and a clip goes through the model's AudioFrontEnd, then `encode_images` with the audio
tokenizer. Model calls are serialised (one lock): the task batchers share one model.
"""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..modalities.audio import decode_audio
from ..modalities.base import MediaError
from ..modalities.image import preprocess_image
from .engine import model_fingerprint
from .http import MAX_TEXT_CHARS, invalid, undecodable
from .media import read_image

TASKS = ("caption", "vqa", "image", "audio_caption")  # audio_caption: only with an audio tokenizer
MAX_IMAGES = 8  # n per text -> image request
MAX_NEW_TOKENS = 40  # longest caption / answer: `mmfusion generate --max-new-tokens` default
# Longest clip accepted (the header's frames / rate, checked before decoding). The model hears only the
# AudioFrontEnd's first `seconds` (0.5 s by default): the rest is trimmed, so a longer clip only costs decoding.
MAX_AUDIO_SECONDS = 30.0
# Sample rates accepted (any rate in between: resampling goes through libsoxr, whose cost is linear in the
# clip for every rate ratio).
MIN_AUDIO_RATE, MAX_AUDIO_RATE = 1000, 384000


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
        """Image file bytes -> (3, S, S) in [-1, 1] at the tokenizer's size: decoded to RGB (`read_image`),
        then `preprocess_image` as `mmfusion generate` reads files. CPU work: call it off the event loop."""
        try:
            return preprocess_image(read_image(data, "image"), self.image_size)
        except DataError as e:
            raise invalid(f"image: {e}") from None

    def audio(self, data: bytes) -> torch.Tensor:
        """Audio file bytes (WAV/FLAC/OGG) -> (1, n_mels, frames) AudioFrontEnd spectrogram of the clip as
        `decode_audio` reads it. The header is checked first (rate, length), so a long clip is refused
        undecoded. CPU work: call it off the event loop."""
        import soundfile as sf

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
            wave, rate = decode_audio(data)
        except MediaError as e:
            if e.__cause__ is not None:  # its header reads, its samples do not
                raise undecodable(f"audio is a {info.format} file whose samples cannot be decoded") from None
            # decode_audio refuses an empty or non-finite clip; the header said it is not empty
            raise invalid("audio contains NaN or infinite samples") from None
        try:
            return self.audio_frontend([wave], [rate])[0]
        except DataError as e:
            raise invalid(f"audio: {e}") from None

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


__all__ = ["MAX_AUDIO_SECONDS", "MAX_IMAGES", "TASKS", "GenerateEngine", "load_unified", "unified_folder"]
