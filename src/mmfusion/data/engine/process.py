"""Stage (b) of `mmfusion data build`: per-modality decoding and normalisation of one file's bytes.

Each function takes the raw bytes of one file and returns the normalised content, or raises `Unusable`
with a reason code and a readable detail (stage (d) turns those into rejections). Decoding is the
modalities' own (`decode_image`, `decode_audio`, `decode_video`: one decoder per modality, shared with the
data sources and the server); their `MediaError` (corrupt_image / corrupt_audio / corrupt_video) is the
engine's `unreadable`, with the decoder's message as the detail.

- image: decoded fully (a truncated JPEG fails here), EXIF orientation applied, any mode -> RGB, then
  resized and centre-cropped to `size` x `size` (Lanczos) — the same square the encoders take.
- audio: decoded (WAV / FLAC / OGG), channels averaged to mono, resampled with soxr (VHQ) to `sample_rate`,
  leading/trailing samples under `trim_level` trimmed and the clip cut at `max_seconds`.
- video: a (T, H, W, 3) uint8 `.npy` clip; `frames` frames sampled uniformly in time (first and last
  included), each resized like an image.
- text: strict UTF-8 (a BOM is dropped; anything else is `non_utf8_text`), Unicode NFC, control and format
  characters removed, runs of whitespace collapsed to one space, ends stripped.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import Any

import numpy as np
import soxr
from PIL import Image, ImageOps

from ...modalities.audio import decode_audio
from ...modalities.base import MediaError
from ...modalities.image import decode_image
from ...modalities.video import decode_video


class Unusable(Exception):
    """A file cannot be used: `reason` is a short code (see quality.REASONS), `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _decode(decoder: Callable[[bytes], Any], data: bytes) -> Any:
    """decoder(data), with an empty file or the decoder's MediaError raised as Unusable("unreadable")."""
    if not data:
        raise Unusable("unreadable", "empty file")
    try:
        return decoder(data)
    except MediaError as e:
        raise Unusable("unreadable", e.problem) from None


def process_image(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes -> ((size, size, 3) uint8 RGB, original (width, height))."""
    pixels = _decode(decode_image, data)  # fully decoded (a truncated file fails here), EXIF applied, RGB
    rgb = Image.fromarray(pixels)
    original = rgb.size
    fitted = ImageOps.fit(rgb, (size, size), method=Image.Resampling.LANCZOS)
    return np.asarray(fitted, dtype=np.uint8), original


def process_audio(
    data: bytes, sample_rate: int, trim_level: float, max_seconds: float
) -> tuple[np.ndarray, float, float]:
    """Audio bytes -> (float32 mono wave at sample_rate, trimmed and cut; original seconds; original peak).

    A clip whose peak is under trim_level trims to nothing: that is stage (d)'s `silent_audio`.
    """
    mono, sr = _decode(decode_audio, data)  # channels averaged, clipped to [-1, 1]; empty / NaN refused
    seconds, peak = mono.shape[0] / sr, float(np.abs(mono).max())
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="VHQ").astype(np.float32)
    loud = np.flatnonzero(np.abs(mono) >= trim_level)
    mono = mono[loud[0] : loud[-1] + 1] if loud.size else mono[:0]
    return np.clip(mono[: int(max_seconds * sample_rate)], -1.0, 1.0), seconds, peak


def process_video(data: bytes, frames: int, size: int) -> np.ndarray:
    """`.npy` bytes of a (T, H, W, 3) uint8 clip -> (frames, size, size, 3) uint8, frames sampled uniformly
    (a shorter clip repeats frames)."""
    clip = _decode(decode_video, data)  # a (T, H, W, 3) uint8 array with T > 0, never unpickled
    if min(clip.shape) == 0:
        raise Unusable("unreadable", f"video frames are empty: shape {clip.shape}")
    idx = np.linspace(0, clip.shape[0] - 1, frames).round().astype(int)
    return np.stack(
        [
            np.asarray(ImageOps.fit(Image.fromarray(clip[i]), (size, size), Image.Resampling.LANCZOS))
            for i in idx
        ]
    )


def clean_text(text: str) -> str:
    """NFC, control/format characters dropped (tabs and newlines become spaces), whitespace collapsed."""
    text = unicodedata.normalize("NFC", text)
    kept = (
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf")
    )
    return " ".join("".join(kept).split())


def process_text(data: bytes) -> str:
    """Caption bytes -> cleaned text; non-UTF-8 bytes raise Unusable("non_utf8_text") naming the offset."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Unusable(
            "non_utf8_text", f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} ({e.reason})"
        ) from None
    return clean_text(text)


__all__ = ["Unusable", "clean_text", "process_audio", "process_image", "process_text", "process_video"]
