"""Modalities: one file per modality (text.py, image.py, audio.py, video.py), each exporting a ModalitySpec as
SPEC, and MODALITIES, the table of them. `register_modality(spec)` adds one (docs/modalities.md)."""

from __future__ import annotations

from typing import Any

from .audio import SPEC as AUDIO
from .base import ENCODER_SIZES, EncoderConfigBase, MediaError, ModalitySpec
from .image import SPEC as IMAGE
from .text import SPEC as TEXT
from .video import SPEC as VIDEO

MODALITIES: dict[str, ModalitySpec] = {s.name: s for s in (TEXT, IMAGE, AUDIO, VIDEO)}


def register_modality(spec: ModalitySpec) -> ModalitySpec:
    """Add `spec` to MODALITIES (an explicit call, never an import side effect); its name must be new."""
    if spec.name in MODALITIES and MODALITIES[spec.name] is not spec:
        raise ValueError(f"modality {spec.name!r} is already registered")
    MODALITIES[spec.name] = spec
    return spec


def encoder_config(key: str, spec: Any) -> EncoderConfigBase:
    """One encoder's config from a built-in size ("tiny" | "small" | "base"), a dict (its `kind` defaults to
    the batch key) or a config, validated by its modality's config class (mmfusion.modalities)."""
    if isinstance(spec, EncoderConfigBase):
        return spec
    if isinstance(spec, str):
        if spec not in ENCODER_SIZES:
            raise ValueError(
                f"encoder {key!r}: unknown size {spec!r}; allowed: {', '.join(ENCODER_SIZES)} "
                "(or pass an encoder config or an nn.Module)"
            )
        spec = {"size": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"encoder {key!r}: expected a size, a config or a dict, got {type(spec).__name__}")
    kind = spec.get("kind", key)
    if kind not in MODALITIES:
        raise ValueError(f"encoder {key!r}: give its kind ({', '.join(MODALITIES)}); {kind!r} is not one")
    return MODALITIES[kind].config(**{k: v for k, v in spec.items() if k != "kind"})


def modality(kind: str) -> ModalitySpec:
    """The spec of modality `kind`; ValueError naming the known ones."""
    if kind not in MODALITIES:
        raise ValueError(f"unknown modality {kind!r}; known: {', '.join(MODALITIES)}")
    return MODALITIES[kind]


__all__ = [
    "ENCODER_SIZES",
    "MODALITIES",
    "EncoderConfigBase",
    "MediaError",
    "ModalitySpec",
    "modality",
    "register_modality",
]
