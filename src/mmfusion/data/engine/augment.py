"""Training-time augmentation of sample dicts (D7, seed 004): image crop / flip / rotation / occlusion, audio
gain / noise / time shift, text synonym replacement. Every transform is off by default, seeded by the caller's
generator, and never applied to evaluation data (`Augmenter(..., train=False)` returns samples unchanged).

Label safety: synonym replacement only touches the words of ``SYNONYMS`` (filler words of the synthetic
captions); colours, shapes, sizes, counts and spatial words (``PROTECTED``) are never replaced. A horizontal
flip mirrors the scene, so the caption's left/right relations change: with ``hflip_captions="swap"`` the
words left <-> right are swapped in the caption (and the ``scene`` record / ``scene_key`` are mirrored);
with ``"skip"`` a sample whose caption says left or right is not flipped. A sample with audio, video or VQA
is never flipped (its tone order, motion and "what is left of" answers are left-to-right facts that a flip
would contradict).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from ...errors import ConfigError
from ...schema import Section
from ..synthetic import COLOURS, NUMBER_WORDS, SHAPES, SIZES, Scene

# filler word -> replacements; none of them is a label word of the synthetic world (checked below)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "image": ("picture", "photo"),
    "picture": ("image", "photo"),
    "showing": ("depicting", "with"),
    "shapes": ("objects", "figures"),
    "single": ("lone", "solitary"),
    "background": ("backdrop", "canvas"),
    "dark": ("dim", "plain"),
    "there": ("here",),
}
PROTECTED = frozenset(
    {*COLOURS, *SHAPES, *SIZES, *NUMBER_WORDS, "left", "right", "middle", "between", "up", "down", "to", "of"}
)
_WORD = re.compile(r"[A-Za-z]+")
_SPATIAL = re.compile(r"\b(left|right)\b", re.IGNORECASE)


class ImageAugment(Section):
    """Image transforms (each applied with its own probability; sizes as fractions of the image side)."""

    crop_p: float = Field(0.0, ge=0, le=1)  # random crop of crop_scale of the area, resized back
    crop_scale: tuple[float, float] = (0.7, 1.0)
    hflip_p: float = Field(0.0, ge=0, le=1)
    hflip_captions: Literal["swap", "skip"] = "swap"
    rotate_p: float = Field(0.0, ge=0, le=1)
    max_degrees: float = Field(10.0, ge=0, le=180)
    occlude_p: float = Field(0.0, ge=0, le=1)  # one grey rectangle of occlude_size of the side
    occlude_size: float = Field(0.25, gt=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> ImageAugment:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        return self


class AudioAugment(Section):
    """Audio transforms: gain (uniform in +-gain_db), additive Gaussian noise, zero-padded time shift."""

    gain_p: float = Field(0.0, ge=0, le=1)
    gain_db: float = Field(6.0, ge=0)
    noise_p: float = Field(0.0, ge=0, le=1)
    noise_std: float = Field(0.01, ge=0)
    shift_p: float = Field(0.0, ge=0, le=1)
    max_shift_s: float = Field(0.05, ge=0)


class TextAugment(Section):
    """Synonym replacement: each word that is a key of SYNONYMS is replaced with probability synonym_p."""

    synonym_p: float = Field(0.0, ge=0, le=1)


class AugmentConfig(Section):
    """Per-modality augmentation; everything off by default. YAML: ``augment: {image: {hflip_p: 0.5}}``."""

    image: ImageAugment = ImageAugment()
    audio: AudioAugment = AudioAugment()
    text: TextAugment = TextAugment()

    def enabled(self) -> bool:
        """Whether any transform has a non-zero probability."""
        return any(v > 0 for part in (self.image, self.audio, self.text) for k, v in part if k.endswith("_p"))


def swap_left_right(text: str) -> str:
    """'a red circle to the left of a blue square' -> '... to the right of ...' (case kept)."""

    def sub(m: re.Match) -> str:
        w = m.group(0)
        out = "right" if w.lower() == "left" else "left"
        return out.capitalize() if w[0].isupper() else out

    return _SPATIAL.sub(sub, text)


def mirror_scene(scene: dict[str, Any]) -> dict[str, Any]:
    """The scene record of the horizontally mirrored image (x -> 1 - x, motion left <-> right)."""
    motion = {"left": "right", "right": "left"}.get(scene.get("motion", "right"), scene.get("motion"))
    objects = [{**o, "x": 1.0 - float(o["x"])} for o in scene["objects"]]
    return {**scene, "objects": objects, "motion": motion}


def replace_synonyms(text: str, p: float, rng: np.random.Generator) -> str:
    """Replace each SYNONYMS word with probability p by one of its synonyms (PROTECTED words never change)."""
    if p <= 0:
        return text

    def sub(m: re.Match) -> str:
        w = m.group(0)
        options = SYNONYMS.get(w.lower())
        if not options or rng.random() >= p:
            return w
        return options[int(rng.integers(len(options)))]

    return _WORD.sub(sub, text)


def _crop(img: np.ndarray, scale: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    area = rng.uniform(*scale)
    ch, cw = max(1, round(h * area**0.5)), max(1, round(w * area**0.5))
    y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    crop = Image.fromarray(img[y0 : y0 + ch, x0 : x0 + cw])
    return np.asarray(crop.resize((w, h), Image.BILINEAR))


def _rotate(img: np.ndarray, max_degrees: float, rng: np.random.Generator) -> np.ndarray:
    angle = float(rng.uniform(-max_degrees, max_degrees))
    fill = tuple(int(c) for c in np.median(img.reshape(-1, 3), axis=0))  # the background colour, not black
    return np.asarray(Image.fromarray(img).rotate(angle, resample=Image.BILINEAR, fillcolor=fill))


def _occlude(img: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    oh, ow = max(1, round(h * size)), max(1, round(w * size))
    y0, x0 = int(rng.integers(h - oh + 1)), int(rng.integers(w - ow + 1))
    out = img.copy()
    out[y0 : y0 + oh, x0 : x0 + ow] = 128
    return out


class Augmenter:
    """Applies an AugmentConfig to sample dicts: ``augmenter(sample, rng)`` -> a new dict (input untouched).

    With ``train=False`` (evaluation) it returns the sample itself, whatever the config says."""

    def __init__(self, config: AugmentConfig | dict | None = None, train: bool = True):
        if config is None:
            config = AugmentConfig()
        elif isinstance(config, dict):
            try:
                config = AugmentConfig.model_validate(config)
            except ValueError as e:
                raise ConfigError(f"augment config: {e}") from None
        self.config, self.train = config, train
        self.active = train and config.enabled()  # whether __call__ can change anything

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if not self.active:
            return sample
        out = dict(sample)
        if out.get("image") is not None:
            self._image(out, rng)
        if out.get("audio") is not None:
            self._audio(out, rng)
        if isinstance(out.get("text"), str):
            out["text"] = replace_synonyms(out["text"], self.config.text.synonym_p, rng)
        return out

    def _image(self, s: dict[str, Any], rng: np.random.Generator) -> None:
        c = self.config.image
        img = np.asarray(s["image"], dtype=np.uint8)
        # one draw per transform whatever happens, so enabling one never changes the others' randomness
        draws = rng.random(4)
        if draws[0] < c.crop_p:
            img = _crop(img, c.crop_scale, rng)
        if draws[1] < c.hflip_p and self._can_flip(s):
            img = img[:, ::-1]
            if isinstance(s.get("text"), str):
                s["text"] = swap_left_right(s["text"])
            if isinstance(s.get("scene"), dict):
                s["scene"] = mirror_scene(s["scene"])
                s["scene_key"] = Scene.from_dict(s["scene"]).key_str()
        if draws[2] < c.rotate_p:
            img = _rotate(img, c.max_degrees, rng)
        if draws[3] < c.occlude_p:
            img = _occlude(img, c.occlude_size, rng)
        s["image"] = np.ascontiguousarray(img)

    def _can_flip(self, s: dict[str, Any]) -> bool:
        if any(s.get(m) is not None for m in ("audio", "video", "vqa")):
            return False
        spatial = isinstance(s.get("text"), str) and _SPATIAL.search(s["text"]) is not None
        return not (spatial and self.config.image.hflip_captions == "skip")

    def _audio(self, s: dict[str, Any], rng: np.random.Generator) -> None:
        c = self.config.audio
        a = np.asarray(s["audio"], dtype=np.float32)
        draws = rng.random(3)
        if draws[0] < c.gain_p:
            a = a * np.float32(10 ** (rng.uniform(-c.gain_db, c.gain_db) / 20))
        if draws[1] < c.noise_p:
            a = a + rng.normal(0, c.noise_std, a.shape).astype(np.float32)
        if draws[2] < c.shift_p and s.get("audio_sr"):
            k = int(
                rng.integers(-round(c.max_shift_s * s["audio_sr"]), round(c.max_shift_s * s["audio_sr"]) + 1)
            )
            shifted = np.zeros_like(a)
            if k >= 0:
                shifted[k:] = a[: len(a) - k]
            else:
                shifted[:k] = a[-k:]
            a = shifted
        s["audio"] = np.clip(a, -1.0, 1.0).astype(np.float32)


__all__ = [
    "PROTECTED",
    "SYNONYMS",
    "AudioAugment",
    "AugmentConfig",
    "Augmenter",
    "ImageAugment",
    "TextAugment",
    "mirror_scene",
    "replace_synonyms",
    "swap_left_right",
]
