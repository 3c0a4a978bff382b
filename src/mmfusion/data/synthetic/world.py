"""The synthetic world's generator: `SyntheticWorld` draws the scene of sample (seed, split, index), keeps the
splits disjoint and renders the requested modalities; `make_split` lists a split's samples. (The package
docstring, mmfusion.data.synthetic, describes the randomness.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .render import render_audio, render_frame, trajectory
from .scene import (
    COLOURS,
    DIRECTIONS,
    GAP,
    GRID,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    Obj,
    Scene,
    describe_motion,
    random_caption,
    vqa_pairs,
)

SPLITS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}  # content_hash % 100 buckets
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
MODALITIES = ("image", "text", "audio", "video", "vqa")  # index + 1 = child stream of the modality


@dataclass(frozen=True)
class WorldConfig:
    """The world's settings: seed, image side, how many objects a scene holds (probabilities of 1, 2, 3),
    audio rate and length, video frames, and the image / audio noise levels."""

    seed: int = 0
    image_size: int = 32
    object_count_probs: tuple[float, float, float] = (0.5, 0.3, 0.2)
    audio_sample_rate: int = 16000
    audio_seconds: float = 0.5
    video_frames: int = 8
    noise: int = 8  # image noise: uniform integer in [-noise, noise] per pixel and channel (0-255 scale)
    audio_noise: float = 0.01  # std of the audio noise


class _Uniform:
    """Plain-float uniforms in [0, 1) from `rng`, drawn in blocks (numpy calls on scalars are slow)."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.buf = rng, []

    def __call__(self) -> float:
        if not self.buf:
            self.buf = self.rng.random(32).tolist()[::-1]
        return self.buf.pop()

    def index(self, k: int) -> int:
        return min(k - 1, int(self() * k))


def _separate(xs: list[float], ys: list[float], half: list[float]) -> bool:
    """True when no two bounding boxes (with GAP) overlap."""
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            need = half[i] + half[j] + GAP
            if abs(xs[i] - xs[j]) < need and abs(ys[i] - ys[j]) < need:
                return False
    return True


class SyntheticWorld:
    """Deterministic generator of scenes and their renderings (see the package docstring, mmfusion.data.synthetic)."""

    def __init__(self, config: WorldConfig = WorldConfig()):
        self.config = config
        p = np.asarray(config.object_count_probs, dtype=float)
        if p.shape != (3,) or (p < 0).any() or abs(p.sum() - 1) > 1e-6:
            raise ValueError(f"object_count_probs must be 3 non-negative numbers summing to 1, got {list(p)}")
        if config.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {config.image_size}")
        if config.video_frames < 1 or config.audio_sample_rate < 1000 or config.audio_seconds <= 0:
            raise ValueError("video_frames must be >= 1, audio_sample_rate >= 1000 and audio_seconds > 0")
        self._cum = [float(c) for c in np.cumsum(p)]

    # ---- scenes -------------------------------------------------------------------------------------------
    def _entropy(self, split: str, index: int, attempt: int) -> list[int]:
        return [self.config.seed, SPLIT_IDS[split], index, attempt]

    def _draw_scene(self, rng: np.random.Generator) -> Scene:
        """One candidate scene: 1-3 distinct objects in distinct columns, inside the frame, never overlapping."""
        u = _Uniform(rng)  # plain-Python draws: this runs once per candidate, so it must be cheap
        v = u() * self._cum[2]
        n = 1 + (v >= self._cum[0]) + (v >= self._cum[1])
        attrs: list[tuple[str, str, str]] = []
        while len(attrs) < n:  # no two identical objects in one scene
            a = (SHAPES[u.index(len(SHAPES))], COLOURS[u.index(len(COLOURS))], SIZES[u.index(len(SIZES))])
            if a not in attrs:
                attrs.append(a)
        half = [SIZE_FRACTION[a[2]] / 2 for a in attrs]
        lo = [h + GAP for h in half]  # centre range that keeps each object inside the frame
        hi = [1 - h - GAP for h in half]
        # objects[0] (the mover) gets a random column; one object per column of three, so the x-order is clear
        columns = [0, 1, 2]
        for i in (2, 1):  # Fisher-Yates
            j = u.index(i + 1)
            columns[i], columns[j] = columns[j], columns[i]
        columns = columns[:n]
        q = lambda v: round(v * GRID) / GRID  # noqa: E731
        xs = ys = None
        for _ in range(200):
            if n == 1:
                cx = [q(lo[0] + u() * (hi[0] - lo[0]))]
            else:
                cx = [
                    q(min(hi[i], max(lo[i], (c + 0.5) / 3 + 0.1 * u() - 0.05))) for i, c in enumerate(columns)
                ]
            cy = [q(lo[i] + u() * (hi[i] - lo[i])) for i in range(n)]
            if _separate(cx, cy, half):
                xs, ys = cx, cy
                break
        if xs is None or ys is None:  # fallback: column centres, rows staggered top/bottom (always separate)
            xs = [q(min(hi[i], max(lo[i], (c + 0.5) / 3))) for i, c in enumerate(columns)]
            ys = [q(lo[i] if c % 2 == 0 else hi[i]) for i, c in enumerate(columns)]
        objects = tuple(Obj(a[0], a[1], a[2], x, y) for a, x, y in zip(attrs, xs, ys))
        return Scene(objects, DIRECTIONS[u.index(len(DIRECTIONS))])

    def _accepted(self, split: str, index: int) -> tuple[Scene, list[int]]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if index < 0:
            raise ValueError(f"sample index must be >= 0, got {index}")
        lo, hi = SPLITS[split]
        for attempt in range(100_000):
            entropy = self._entropy(split, index, attempt)
            scene = self._draw_scene(np.random.default_rng(entropy))
            if lo <= scene.content_hash() % 100 < hi:
                return scene, entropy
        raise RuntimeError(f"no scene found for split {split!r} index {index} (unreachable)")

    def scene(self, split: str, index: int) -> Scene:
        """The scene of sample `index` of `split` ("train" | "val" | "test"); its hash bucket is the split's."""
        return self._accepted(split, index)[0]

    # ---- modalities -----------------------------------------------------------------------------------------
    def render_image(self, scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
        """(H, W, 3) uint8: the objects on a dark background (+ seeded noise when `rng` is given)."""
        return render_frame(scene, self.config.image_size, self.config.noise, rng)

    def trajectory(self, scene: Scene) -> np.ndarray:
        """(T, 2) mover centre (x, y) per video frame (render.trajectory over config.video_frames)."""
        return trajectory(scene, self.config.video_frames)

    def render_video(self, scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
        """(T, H, W, 3) uint8: objects[0] translates steadily along scene.motion; the others stay still."""
        side, noise = self.config.image_size, self.config.noise
        return np.stack(
            [render_frame(scene, side, noise, rng, (float(x), float(y))) for x, y in self.trajectory(scene)]
        )

    def render_audio(self, scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
        """(n,) float32 in [-1, 1] at audio_sample_rate: one tone per object, left to right, in equal slots.

        colour -> pitch (PITCH), shape -> waveform (WAVEFORMS), size -> loudness (RMS 0.5 * LOUDNESS).
        """
        c = self.config
        return render_audio(scene, c.audio_sample_rate, c.audio_seconds, c.audio_noise, rng)

    def caption(self, scene: Scene, rng: np.random.Generator) -> str:
        """A caption from a random template; it states every object's size, colour, shape and the left-right order."""
        return random_caption(scene, rng)

    def vqa(self, scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
        """One (question, answer) pair per applicable family (scene.vqa_pairs)."""
        return vqa_pairs(scene, rng)

    def sample(
        self, split: str, index: int, modalities: tuple[str, ...] = ("image", "text")
    ) -> dict[str, Any]:
        """{"id", "scene", "scene_key"} plus only the requested modalities: "image", "text", "audio" (+"audio_sr"),
        "video" (+"video_text"), "vqa" (list of {"question", "answer"})."""
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; expected a subset of {list(MODALITIES)}")
        scene, entropy = self._accepted(split, index)
        out: dict[str, Any] = {
            "id": f"{split}-{index:07d}",
            "scene": scene.to_dict(),
            "scene_key": scene.key_str(),
        }

        def stream(m: str) -> np.random.Generator:  # child k of the accepted attempt's SeedSequence
            return np.random.default_rng(
                np.random.SeedSequence(entropy, spawn_key=(MODALITIES.index(m) + 1,))
            )

        if "image" in modalities:
            out["image"] = self.render_image(scene, stream("image"))
        if "text" in modalities:
            out["text"] = self.caption(scene, stream("text"))
        if "audio" in modalities:
            out["audio"] = self.render_audio(scene, stream("audio"))
            out["audio_sr"] = self.config.audio_sample_rate
        if "video" in modalities:
            out["video"] = self.render_video(scene, stream("video"))
            out["video_text"] = describe_motion(scene)
        if "vqa" in modalities:
            out["vqa"] = [{"question": q, "answer": a} for q, a in self.vqa(scene, stream("vqa"))]
        return out


def make_split(
    world: SyntheticWorld,
    split: str,
    n: int,
    modalities: tuple[str, ...] = ("image", "text"),
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Samples 0..n-1 of `split` (with a tqdm progress bar when `progress`)."""
    indices: Any = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"render {split}", unit="sample", leave=False)
    return [world.sample(split, i, modalities) for i in indices]


__all__ = ["MODALITIES", "SPLITS", "SPLIT_IDS", "SyntheticWorld", "WorldConfig", "make_split"]
