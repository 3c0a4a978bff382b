"""Stage (b) of `mmfusion data build`: per-modality decoding and normalisation of one file's bytes.

Each function takes the raw bytes of one file and returns the normalised content, or raises `Unusable`
with a reason code and a readable detail (stage (d) turns those into rejections):

- image: decoded fully (a truncated JPEG fails here), EXIF orientation applied, any mode -> RGB, then
  resized and centre-cropped to `size` x `size` (Lanczos) — the same square the encoders take.
- audio: decoded (WAV / FLAC / OGG), channels averaged to mono, resampled with soxr (VHQ) to `sample_rate`,
  leading/trailing samples under `trim_level` trimmed and the clip cut at `max_seconds`.
- video: a (T, H, W, 3) uint8 `.npy` clip; `frames` frames sampled uniformly in time, each resized like an
  image.
- text: strict UTF-8 (a BOM is dropped; anything else is `non_utf8_text`), Unicode NFC, control and format
  characters removed, runs of whitespace collapsed to one space, ends stripped.
"""

from __future__ import annotations

import io
import unicodedata

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageOps

from ...modalities.image import to_rgb_array


class Unusable(Exception):
    """A file cannot be used: `reason` is a short code (see quality.REASONS), `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def process_image(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes -> ((size, size, 3) uint8 RGB, original (width, height))."""
    if not data:
        raise Unusable("unreadable", "empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode everything now: truncation shows here, not later in the trainer
            img = ImageOps.exif_transpose(img)
            original = img.size
            rgb = Image.fromarray(to_rgb_array(img))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise Unusable("unreadable", f"cannot decode image: {e}") from None
    fitted = ImageOps.fit(rgb, (size, size), method=Image.Resampling.LANCZOS)
    return np.asarray(fitted, dtype=np.uint8), original


def process_audio(
    data: bytes, sample_rate: int, trim_level: float, max_seconds: float
) -> tuple[np.ndarray, float, float]:
    """Audio bytes -> (float32 mono wave at sample_rate, trimmed and cut; original seconds; original peak).

    A clip whose peak is under trim_level trims to nothing: that is stage (d)'s `silent_audio`.
    """
    if not data:
        raise Unusable("unreadable", "empty file")
    try:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise Unusable("unreadable", f"cannot decode audio: {e}") from None
    if wave.shape[0] == 0 or not np.isfinite(wave).all():
        raise Unusable("unreadable", "audio is empty or has NaN/infinite values")
    mono = np.clip(wave.mean(axis=1, dtype=np.float32), -1.0, 1.0)
    seconds, peak = mono.shape[0] / sr, float(np.abs(mono).max())
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="VHQ").astype(np.float32)
    loud = np.flatnonzero(np.abs(mono) >= trim_level)
    mono = mono[loud[0] : loud[-1] + 1] if loud.size else mono[:0]
    return np.clip(mono[: int(max_seconds * sample_rate)], -1.0, 1.0), seconds, peak


def process_video(data: bytes, frames: int, size: int) -> np.ndarray:
    """`.npy` bytes of a (T, H, W, 3) uint8 clip -> (frames, size, size, 3) uint8, frames sampled uniformly
    (a shorter clip repeats frames)."""
    try:
        clip = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise Unusable("unreadable", f"cannot load video array: {e}") from None
    if not (
        isinstance(clip, np.ndarray)
        and clip.dtype == np.uint8
        and clip.ndim == 4
        and clip.shape[-1] == 3
        and min(clip.shape) > 0
    ):
        got = f"shape {clip.shape}, dtype {clip.dtype}" if isinstance(clip, np.ndarray) else "an npz archive"
        raise Unusable("unreadable", f"expected a (T, H, W, 3) uint8 video array, got {got}")
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
