"""The synthetic world's renderers: a scene as an image, a video clip (the mover on its trajectory) and a
sound (one tone per object). Pure functions of the scene, the settings and an optional noise stream."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from .scene import BACKGROUND, LOUDNESS, PITCH, RGB, SIZE_FRACTION, VIDEO_TRAVEL, WAVEFORMS, Scene


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Outline of `shape` inside the box of half-side r around (cx, cy); None for the circle."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.85, cy), (cx, cy + r), (cx - r * 0.85, cy)]
    if shape == "cross":
        a, b = r, r * 0.34
        return [
            (cx - b, cy - a),
            (cx + b, cy - a),
            (cx + b, cy - b),
            (cx + a, cy - b),
            (cx + a, cy + b),
            (cx + b, cy + b),
            (cx + b, cy + a),
            (cx - b, cy + a),
            (cx - b, cy + b),
            (cx - a, cy + b),
            (cx - a, cy - b),
            (cx - b, cy - b),
        ]
    return None


def _wave(shape: str, phase: np.ndarray) -> np.ndarray:
    """Zero-mean waveform of `shape` with unit RMS; `phase` in cycles."""
    frac = phase % 1.0
    kind = WAVEFORMS[shape]
    if kind == "sine":
        return np.sqrt(2) * np.sin(2 * np.pi * phase)
    if kind == "square":
        return np.where(frac < 0.5, 1.0, -1.0)
    if kind == "triangle":
        return np.sqrt(3) * (4 * np.abs(frac - 0.5) - 1)
    if kind == "sawtooth":
        return np.sqrt(3) * (2 * frac - 1)
    d = 0.25  # pulse train with duty d, zero mean
    return (np.where(frac < d, 1 - d, -d)) / np.sqrt(d * (1 - d))


_COLOUR_F32 = {c: np.array(v, dtype=np.float32) for c, v in RGB.items()}


@functools.lru_cache(maxsize=4096)
def _sprite(shape: str, size: str, side: int, fx: int, fy: int) -> tuple[np.ndarray, int]:
    """(k, k, 1) float32 coverage of one object drawn with ImageDraw at 4x and box-averaged, and k // 2.

    The object's centre lies at 4x-pixel (2k + fx, 2k + fy) of the sprite (fx, fy: sub-pixel phase in 0..3).
    """
    r = SIZE_FRACTION[size] * side * 2  # radius in 4x pixels
    half = int(np.ceil(r / 4)) + 1
    k = 2 * half
    mask = Image.new("L", (4 * k, 4 * k), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = 4 * half + fx, 4 * half + fy
    poly = _polygon(shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(poly, fill=255)
    alpha = np.asarray(mask, dtype=np.float32).reshape(k, 4, k, 4).mean(axis=(1, 3))[..., None] / 255
    alpha.setflags(write=False)
    return alpha, half


def render_frame(
    scene: Scene,
    side: int,
    noise: int,
    rng: np.random.Generator | None,
    mover_xy: tuple[float, float] | None = None,
) -> np.ndarray:
    """(side, side, 3) uint8: the objects on the background, objects[0] at `mover_xy` when given, plus uniform
    integer noise in [-noise, noise] per pixel and channel when `rng` is given.

    Composites the cached 4x-supersampled sprites onto the background (equal to drawing the whole scene at 4x
    with ImageDraw and box-downsampling, as objects never overlap)."""
    img = np.empty((side, side, 3), dtype=np.float32)
    img[:] = BACKGROUND
    for i in [*range(1, len(scene.objects)), 0]:  # the mover (objects[0]) is drawn last, on top
        obj = scene.objects[i]
        x, y = mover_xy if (i == 0 and mover_xy is not None) else (obj.x, obj.y)
        cx4, cy4 = round(x * side * 4), round(y * side * 4)  # centre on the 4x grid
        alpha, half = _sprite(obj.shape, obj.size, side, cx4 % 4, cy4 % 4)
        x0, y0 = cx4 // 4 - half, cy4 // 4 - half
        k = alpha.shape[0]
        sx0, sy0 = max(0, -x0), max(0, -y0)
        sx1, sy1 = min(k, side - x0), min(k, side - y0)
        if sx1 <= sx0 or sy1 <= sy0:
            continue
        region = img[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1]
        region += alpha[sy0:sy1, sx0:sx1] * (_COLOUR_F32[obj.colour] - region)
    if rng is not None and noise > 0:
        img += rng.integers(-noise, noise + 1, img.shape, dtype=np.int16)
        np.clip(img, 0, 255, out=img)
    return np.rint(img).astype(np.uint8)


def trajectory(scene: Scene, frames: int) -> np.ndarray:
    """(frames, 2) mover centre (x, y) per video frame: a straight line of length VIDEO_TRAVEL through the
    still position along scene.motion, shifted (not clamped) to stay inside the frame."""
    obj = scene.objects[0]
    d = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}[scene.motion]
    h = SIZE_FRACTION[obj.size] / 2
    p = np.array([obj.x, obj.y])
    start, end = p - np.multiply(d, VIDEO_TRAVEL / 2), p + np.multiply(d, VIDEO_TRAVEL / 2)
    shift = np.maximum(0, h - np.minimum(start, end)) - np.maximum(0, np.maximum(start, end) - (1 - h))
    start, end = start + shift, end + shift
    t = np.linspace(0, 1, frames)[:, None] if frames > 1 else np.array([[0.5]])
    return start + t * (end - start)


def render_audio(
    scene: Scene, sample_rate: int, seconds: float, noise: float, rng: np.random.Generator | None
) -> np.ndarray:
    """(n,) float32 in [-1, 1], n = round(sample_rate * seconds): one tone per object, left to right, in
    equal slots, plus Gaussian noise of std `noise` when `rng` is given.

    colour -> pitch (PITCH), shape -> waveform (WAVEFORMS), size -> loudness (RMS 0.5 * LOUDNESS).
    """
    sr = sample_rate
    n = int(round(sr * seconds))
    out = np.zeros(n, dtype=np.float64)
    objs = scene.left_to_right()
    slot = n // len(objs)
    fade = max(1, min(int(0.005 * sr), slot // 4))
    env = np.ones(slot)
    env[:fade] = np.linspace(0, 1, fade)
    env[-fade:] = np.linspace(1, 0, fade)
    t = np.arange(slot) / sr
    for i, obj in enumerate(objs):
        tone = _wave(obj.shape, PITCH[obj.colour] * t)
        out[i * slot : (i + 1) * slot] = 0.5 * LOUDNESS[obj.size] * env * tone
    if rng is not None and noise > 0:
        out += noise * rng.standard_normal(n)
    return np.clip(out, -1, 1).astype(np.float32)


__all__ = ["render_audio", "render_frame", "trajectory"]
