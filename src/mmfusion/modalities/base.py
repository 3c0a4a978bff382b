"""What a modality is, in one place: its encoder config and builder, its media decoder, its preprocessing, the
placeholder that stands in for an absent input, and how a batch is stacked (ARCHITECTURE.md "The flow").

Each modality file (`text.py`, `image.py`, `audio.py`, `video.py`) exports one `ModalitySpec` as `SPEC`;
`mmfusion.modalities.MODALITIES` is the table of them. Data sources decode media with `spec.decode`, the one
collate (`mmfusion.data.collate`) preprocesses with `spec.preprocess`, models build encoders with
`spec.build_encoder`, the server and the tokenizer CLI decode uploads and files with `spec.decode` too.
Adding a modality (a depth map, a point cloud) is one new file with its SPEC and one `register_modality` call
(docs/modalities.md).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import DataError
from ..schema import Section

# Built-in encoder sizes: width, depth, heads (the encoders' own constructor arguments).
ENCODER_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"width": 32, "depth": 1, "heads": 2},
    "small": {"width": 64, "depth": 2, "heads": 4},
    "base": {"width": 128, "depth": 3, "heads": 4},
}


class MediaError(DataError):
    """A media file or buffer that cannot be decoded. `reason`: a short code (corrupt_image, corrupt_audio,
    corrupt_video, missing_file ...) that data sources count skipped samples by; the message says why."""

    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason, self.problem = reason, problem


def as_source(src: Any) -> Any:
    """What the decoders read: bytes become a file object; paths and file objects pass through."""
    return io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src


class EncoderConfigBase(Section):
    """Size of one encoder: `size` fills width / depth / heads that are not given explicitly. Each modality's
    config subclasses it with `kind: Literal["<modality>"]` and its own input settings."""

    kind: str
    size: Literal["tiny", "small", "base"] = "tiny"
    width: int = Field(32, ge=8)
    depth: int = Field(1, ge=1, le=96)
    heads: int = Field(2, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _fill_size(cls, data: Any) -> Any:
        if isinstance(data, dict):
            size = data.get("size", "tiny")
            if size in ENCODER_SIZES:
                data = {**ENCODER_SIZES[size], **data}
        return data


def read_field(sample: Mapping[str, Any], field: str) -> Any:
    """A sample's raw value of `field` (None = absent): the field itself, else an extra manifest field kept in
    sample["meta"]."""
    value = sample.get(field)
    if value is None and isinstance(sample.get("meta"), Mapping):
        value = sample["meta"].get(field)
    return value


@dataclass(frozen=True)
class ModalitySpec:
    """One modality.

    name:           the modality's name: the encoder `kind`, the default batch key and manifest field.
    encoder_config: its encoder's typed config (a subclass of EncoderConfigBase with kind = name).
    build_encoder:  config -> nn.Module with `forward_tokens(x) -> (B, N, width)` and an int `width`.
    decode:         a file path, file object or bytes -> the raw value samples hold (image: (H, W, 3) uint8;
                    audio: (float32 mono wave, sample rate); video: (T, H, W, 3) uint8); raises MediaError.
                    None for values that live in the manifest itself (text).
    preprocess:     (raw values, encoder config, tokenizer or None) -> the batch tensor (B, ...) the encoder
                    takes. Every row of a batch has the same shape (stacking is part of preprocessing).
    placeholder:    config -> a raw value that stands in for an absent input (its row is masked out and never
                    reaches the encoder; it only keeps the batch tensor rectangular).
    extensions:     file name extensions of its media (WebDataset member names, data-engine detection).
    read:           (sample dict, field) -> the raw value of that field or None when absent (audio pairs the
                    wave with its `<field>_sr`).
    """

    name: str
    encoder_config: type[EncoderConfigBase]
    build_encoder: Callable[[Any], nn.Module]
    preprocess: Callable[[Sequence[Any], Any, Any], torch.Tensor]
    placeholder: Callable[[Any], Any]
    decode: Callable[[Any], Any] | None = None
    extensions: tuple[str, ...] = ()
    read: Callable[[Mapping[str, Any], str], Any] = read_field

    def config(self, **settings: Any) -> EncoderConfigBase:
        """This modality's encoder config from keyword settings (kind filled in), validated."""
        return self.encoder_config.model_validate({**settings, "kind": self.name})


__all__ = ["ENCODER_SIZES", "EncoderConfigBase", "MediaError", "ModalitySpec", "as_source", "read_field"]
