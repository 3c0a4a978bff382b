"""An invisible keyed watermark for generated images, detected by correlation (Z4).

Embedding adds delta * P to every channel, P a {-1, +1} pattern of the image's size drawn from the key
(SHA-256 of key and size seeds the generator): at delta = 3 of 255 the change is invisible. Detection
high-passes the image (pixel minus the mean of its 3x3 neighbourhood, which removes most of the picture and
keeps the pattern), correlates it with the high-passed pattern and reports z = correlation * sqrt(pixels):
about N(0, 1) on an image without this key's mark, large with it; `detect` says present at z >= threshold.

What it survives and what destroys it is measured (benchmarks/scd.py, docs/safety.md): it is a fragile,
spatially aligned mark: resizing, cropping or shifting misaligns it and strong JPEG compression erases its
high frequencies. It marks images this server made; it is not a defence against someone removing it.
"""

from __future__ import annotations

import hashlib

import numpy as np

DEFAULT_DELTA = 3.0
DEFAULT_THRESHOLD = 4.0


def pattern(key: bytes, height: int, width: int) -> np.ndarray:
    """The key's (H, W) {-1, +1} float32 pattern."""
    seed = hashlib.sha256(key + f"|{height}x{width}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
    return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(height, width))


def _highpass(x: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> x minus its 3x3 box mean (edges replicated)."""
    p = np.pad(x, [(1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 2), mode="edge")
    h, w = x.shape[:2]
    box = sum(p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0
    return x - box


def embed(image: np.ndarray, key: bytes, delta: float = DEFAULT_DELTA) -> np.ndarray:
    """(H, W, 3) uint8 -> the watermarked (H, W, 3) uint8 image."""
    img = np.asarray(image)
    if img.ndim != 3 or img.dtype != np.uint8:
        raise ValueError(f"watermark.embed: expected an (H, W, C) uint8 image, got {img.dtype} {img.shape}")
    p = pattern(key, img.shape[0], img.shape[1])[..., None]
    return np.clip(np.rint(img.astype(np.float32) + delta * p), 0, 255).astype(np.uint8)


def score(image: np.ndarray, key: bytes) -> float:
    """z-score of the key's mark in an (H, W, C) image: about N(0, 1) without it."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 2:
        x = x[..., None]
    hx = _highpass(x).mean(axis=2)  # (H, W): the channels carry the same pattern
    hp = _highpass(pattern(key, x.shape[0], x.shape[1]))
    hx, hp = hx - hx.mean(), hp - hp.mean()
    denom = float(np.linalg.norm(hx) * np.linalg.norm(hp))
    if denom == 0.0:
        return 0.0
    return float((hx * hp).sum() / denom * np.sqrt(hx.size))


def detect(image: np.ndarray, key: bytes, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """True when the key's mark is present (z-score at or above `threshold`)."""
    return score(image, key) >= threshold
