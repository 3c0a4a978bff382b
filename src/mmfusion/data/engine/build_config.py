"""The settings of `mmfusion data build` (a light module: the CLI reads it at parse time)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError

FIELD_HELP = {
    "image_size": "images (and video frames) are resized + centre-cropped to this square",
    "sample_rate": "audio is resampled to this rate",
    "max_audio_seconds": "audio is cut after this many seconds (after trimming)",
    "video_frames": "frames sampled uniformly from each clip",
    "min_image_side": "too_small under this many pixels (original size)",
    "blank_std": "blank_image when the processed pixels' std is under this",
    "silence_level": "silent_audio when the peak is under this; also the trim level",
    "min_audio_seconds": "too_short under this after trimming",
    "max_caption_chars": "caption_too_long over this",
    "min_letter_ratio": "garbled_caption when fewer letters among non-space characters",
    "phash_distance": "near_duplicate when 256-bit pHashes differ in at most this many bits",
    "colour_tolerance": "near_duplicate also needs every cell of the 4x4 colour signatures within this (0-255)",
    "min_alignment": "misaligned under this image-caption cosine (with a model)",
    "dedup_cosine": "near_duplicate at or above this image-embedding cosine (with a model)",
    "shard_size": "accepted samples per output shard",
    "model": "a trained contrastive model folder, for alignment and embedding dedup",
    "concept_filter": "a concept-filter file (`mmfusion filter calibrate`, with --model): filtered when blocked",
}


@dataclass(frozen=True)
class BuildConfig:
    """Every setting that changes a build's output (so all of it enters the build id); FIELD_HELP says
    what each does."""

    image_size: int = 224
    sample_rate: int = 16000
    max_audio_seconds: float = 30.0
    video_frames: int = 8
    min_image_side: int = 32
    blank_std: float = 2.0
    silence_level: float = 1e-3
    min_audio_seconds: float = 0.1
    max_caption_chars: int = 1000
    min_letter_ratio: float = 0.5
    phash_distance: int = 32
    colour_tolerance: int = 24
    min_alignment: float = 0.2
    dedup_cosine: float = 0.98
    shard_size: int = 1000
    model: str | None = None
    concept_filter: str | None = None

    def __post_init__(self) -> None:
        positive = ("image_size", "sample_rate", "max_audio_seconds", "video_frames", "shard_size")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"build config {name} = {getattr(self, name)}: expected a positive number")
        for name in (
            "min_image_side",
            "blank_std",
            "silence_level",
            "min_audio_seconds",
            "max_caption_chars",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"build config {name} = {getattr(self, name)}: expected >= 0")
        if not 0 <= self.min_letter_ratio <= 1:
            raise ConfigError(f"build config min_letter_ratio = {self.min_letter_ratio}: expected 0..1")
        if not 0 <= self.colour_tolerance <= 255:
            raise ConfigError(f"build config colour_tolerance = {self.colour_tolerance}: expected 0..255")
        if not 0 <= self.phash_distance <= 256:
            raise ConfigError(f"build config phash_distance = {self.phash_distance}: expected 0..256")
        if not -1 <= self.min_alignment <= 1 or not -1 <= self.dedup_cosine <= 1:
            raise ConfigError("build config min_alignment / dedup_cosine: expected cosines in -1..1")
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise ConfigError(f"--model {self.model}: not a model folder (no config.json)")
        if self.concept_filter is not None:
            if self.model is None:
                raise ConfigError("--filter needs --model: the filters compare the model's embeddings")
            if not Path(self.concept_filter).is_file():
                raise ConfigError(f"--filter {self.concept_filter}: no such file")


__all__ = ["FIELD_HELP", "BuildConfig"]
