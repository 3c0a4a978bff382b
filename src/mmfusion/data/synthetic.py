"""The embedded synthetic world: seeded scenes of coloured shapes as image, caption, audio, video and VQA.

Every sample carries its ground-truth scene, so every task is exactly measurable. A sample is a pure
function of (seed, split, index): no global RNG, byte-identical across calls and processes. Splits are
disjoint by scene content: a scene's stable hash decides the only split it may belong to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
SIZES = ("small", "large")
DIRECTIONS = ("left", "right", "up", "down")
RGB = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 255),
    "yellow": (240, 230, 30),
    "purple": (160, 40, 220),
    "orange": (255, 140, 0),
    "white": (245, 245, 245),
    "cyan": (0, 220, 230),
}
SIZE_FRACTION = {"small": 0.22, "large": 0.34}  # of the image side
# audio: colour -> pitch (Hz), size -> loudness; shape -> waveform (see _wave)
PITCH = dict(zip(COLOURS, (220.0, 277.2, 349.2, 440.0, 554.4, 698.5, 880.0, 1108.7)))
LOUDNESS = {"small": 0.3, "large": 0.8}
NUMBER_WORDS = ("one", "two", "three")
SPLITS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}  # hash % 100 buckets
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
VQA_ANSWERS = tuple(
    sorted(set(COLOURS) | set(SHAPES) | set(SIZES) | set(NUMBER_WORDS) | {"yes", "no", "nothing"})
)


@dataclass(frozen=True)
class Obj:
    """One object: attributes and centre position (x, y in [0, 1], y downwards)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    def words(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """1–3 objects (listed left to right) and the motion direction of the first-mentioned (moving) object."""

    objects: tuple[Obj, ...]
    motion: str = "right"
    mover: int = 0  # index into objects of the object that moves in the video

    def key(self) -> tuple[tuple[str, str, str], ...]:
        """Caption-level identity: (size, colour, shape) of each object, left to right.

        Positions and motion are excluded: captions state attributes and left/right relations only, so two
        scenes with the same key are described by the same set of captions.
        """
        return tuple((o.size, o.colour, o.shape) for o in sorted(self.objects, key=lambda o: o.x))

    def key_str(self) -> str:
        return " | ".join(" ".join(k) for k in self.key())

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [asdict(o) for o in self.objects], "motion": self.motion, "mover": self.mover}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(tuple(Obj(**o) for o in d["objects"]), d.get("motion", "right"), d.get("mover", 0))

    def content_hash(self) -> int:
        """Stable hash of the full record, positions quantised to 1/64 (hashlib, not Python's hash())."""
        rec = [(o.shape, o.colour, o.size, round(o.x * 64), round(o.y * 64)) for o in self.objects]
        digest = hashlib.sha256(json.dumps([rec, self.motion, self.mover]).encode()).digest()
        return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    image_size: int = 32
    object_count_probs: tuple[float, float, float] = (0.5, 0.3, 0.2)
    audio_sample_rate: int = 16000
    audio_seconds: float = 0.5
    video_frames: int = 8
    noise: float = 6.0  # background noise std (0-255 scale)


# ---- captions ---------------------------------------------------------------------------------------------
ONE = (
    "a {0}",
    "there is a {0}",
    "a {0} on a dark background",
    "an image of a {0}",
    "a picture showing a {0}",
    "one {0}",
)
TWO = (
    "a {0} to the left of a {1}",
    "a {1} to the right of a {0}",
    "a {0} on the left and a {1} on the right",
    "there is a {0} left of a {1}",
    "a {1} right of a {0}",
    "two shapes: a {0} and a {1}, from left to right",
)
THREE = (
    "from left to right: a {0}, a {1} and a {2}",
    "a {0} on the left, a {1} in the middle and a {2} on the right",
    "three shapes: a {0}, a {1} and a {2}, left to right",
    "a {1} between a {0} on the left and a {2} on the right",
    "a {2} on the right, a {1} in the middle and a {0} on the left",
    "left to right there are a {0}, a {1} and a {2}",
)
TEMPLATES = {1: ONE, 2: TWO, 3: THREE}


def caption_for(scene: Scene, template: int) -> str:
    """The caption of `scene` with template number `template` (objects named left to right)."""
    words = [" ".join(k) for k in scene.key()]
    return TEMPLATES[len(words)][template % len(TEMPLATES[len(words)])].format(*words)


def describe_motion(scene: Scene) -> str:
    """Video caption: 'a small red circle moving left'."""
    return f"a {scene.objects[scene.mover].words()} moving {scene.motion}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---- rendering ---------------------------------------------------------------------------------------------
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "cross":
        a, b = r, r * 0.34
        return [
            (cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
            (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b),
        ]
    return None


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, side: int, x: float, y: float) -> None:
    r = SIZE_FRACTION[obj.size] * side / 2
    cx, cy = x * side, y * side
    poly = _polygon(obj.shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=RGB[obj.colour])
    else:
        draw.polygon(poly, fill=RGB[obj.colour])


def _wave(shape: str, phase: np.ndarray) -> np.ndarray:
    """Timbre per shape; `phase` in cycles."""
    frac = phase % 1.0
    if shape == "circle":
        return np.sin(2 * np.pi * phase)
    if shape == "square":
        return np.where(frac < 0.5, 1.0, -1.0) * 0.7
    if shape == "triangle":
        return 4 * np.abs(frac - 0.5) - 1
    if shape == "diamond":
        return 2 * frac - 1  # sawtooth
    return np.where(frac < 0.15, 1.0, -0.18)  # cross: pulse train


class SyntheticWorld:
    """Deterministic generator of scenes and their renderings (see module docstring)."""

    def __init__(self, config: WorldConfig = WorldConfig()):
        self.config = config
        p = np.asarray(config.object_count_probs, dtype=float)
        if p.shape != (3,) or (p < 0).any() or abs(p.sum() - 1) > 1e-6:
            raise ValueError(f"object_count_probs must be 3 non-negative numbers summing to 1, got {list(p)}")

    # ---- scenes -------------------------------------------------------------------------------------------
    def _rng(self, split: str, index: int, attempt: int, stream: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, SPLIT_IDS[split], index, attempt, stream])

    def _draw_scene(self, rng: np.random.Generator) -> Scene:
        n = int(rng.choice(3, p=self.config.object_count_probs)) + 1
        columns = np.sort(rng.choice(3, size=n, replace=False)) if n < 3 else np.arange(3)
        attrs: list[tuple[str, str, str]] = []
        while len(attrs) < n:  # no two identical objects in one scene
            a = (SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))], SIZES[rng.integers(2)])
            if a not in attrs:
                attrs.append(a)
        half = [SIZE_FRACTION[a[2]] / 2 for a in attrs]
        for _ in range(1000):
            # one object per column (columns 1/3 wide, centres jittered, so the left-right order is fixed);
            # a layout whose bounding boxes touch is redrawn
            xs = [(c + 0.5) / 3 + rng.uniform(-0.04, 0.04) for c in columns] if n > 1 else [rng.uniform(0.3, 0.7)]
            ys = [rng.uniform(0.25, 0.75) for _ in range(n)]
            if all(
                abs(xs[i] - xs[j]) > half[i] + half[j] + 0.02 or abs(ys[i] - ys[j]) > half[i] + half[j] + 0.02
                for i in range(n) for j in range(i + 1, n)
            ):
                break
        objects = [Obj(a[0], a[1], a[2], round(float(x), 4), round(float(y), 4)) for a, x, y in zip(attrs, xs, ys)]
        return Scene(tuple(objects), DIRECTIONS[rng.integers(4)], int(rng.integers(n)))

    def scene(self, split: str, index: int) -> Scene:
        """The scene of sample `index` of `split`; only scenes whose hash falls in the split's bucket are kept."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        lo, hi = SPLITS[split]
        for attempt in range(10_000):
            scene = self._draw_scene(self._rng(split, index, attempt))
            if lo <= scene.content_hash() % 100 < hi:
                return scene
        raise RuntimeError("no scene found for the split (unreachable)")

    # ---- modalities -----------------------------------------------------------------------------------------
    def render_image(self, scene: Scene, rng: np.random.Generator | None = None, t: float | None = None) -> np.ndarray:
        """(H, W, 3) uint8: objects on a dark noisy background, drawn at 4x and downsampled (antialiased).

        `t` in [0, 1] moves the mover along its motion direction (video frames); None = the still image.
        """
        side = self.config.image_size
        big = side * 4
        canvas = Image.new("RGB", (big, big), (12, 12, 16))
        draw = ImageDraw.Draw(canvas)
        for i, obj in enumerate(scene.objects):
            x, y = obj.x, obj.y
            if t is not None and i == scene.mover:
                x, y = self._moved(obj, scene.motion, t)
            _draw(draw, obj, big, x, y)
        img = np.asarray(canvas.resize((side, side), Image.BOX), dtype=np.float32)
        if rng is not None and self.config.noise > 0:
            img = img + rng.normal(0, self.config.noise, img.shape)
        return np.clip(img, 0, 255).round().astype(np.uint8)

    @staticmethod
    def _moved(obj: Obj, direction: str, t: float) -> tuple[float, float]:
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
        travel = 0.3 * (t - 0.5)  # centred on the still position: ±0.15 of the side
        margin = SIZE_FRACTION[obj.size] / 2
        return (
            float(np.clip(obj.x + dx * travel, margin, 1 - margin)),
            float(np.clip(obj.y + dy * travel, margin, 1 - margin)),
        )

    def render_video(self, scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
        """(T, H, W, 3) uint8: the mover translates steadily in its motion direction; others stay still."""
        frames = self.config.video_frames
        return np.stack([self.render_image(scene, rng, t=k / max(1, frames - 1)) for k in range(frames)])

    def render_audio(self, scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
        """(n,) float32 in [-1, 1] at `audio_sample_rate`: one tone per object, left to right, in equal slots.

        colour -> pitch, shape -> waveform, size -> loudness.
        """
        sr, n = self.config.audio_sample_rate, int(self.config.audio_sample_rate * self.config.audio_seconds)
        out = np.zeros(n, dtype=np.float64)
        objs = sorted(scene.objects, key=lambda o: o.x)
        slot = n // len(objs)
        fade = max(1, int(0.005 * sr))
        env = np.ones(slot)
        env[:fade] = np.linspace(0, 1, fade)
        env[-fade:] = np.linspace(1, 0, fade)
        t = np.arange(slot) / sr
        for i, obj in enumerate(objs):
            out[i * slot : (i + 1) * slot] = LOUDNESS[obj.size] * env * _wave(obj.shape, PITCH[obj.colour] * t)
        if rng is not None:
            out += rng.normal(0, 0.01, n)
        return np.clip(out, -1, 1).astype(np.float32)

    def caption(self, scene: Scene, rng: np.random.Generator) -> str:
        """A caption from a random template; it states every object's size, colour, shape and left/right order."""
        return caption_for(scene, int(rng.integers(len(TEMPLATES[len(scene.objects)]))))

    def vqa(self, scene: Scene, rng: np.random.Generator, n: int = 3) -> list[tuple[str, str]]:
        """Up to `n` (question, answer) pairs from several question families; answers are in VQA_ANSWERS."""
        objs = sorted(scene.objects, key=lambda o: o.x)
        qa: list[tuple[str, str]] = [("how many objects are there?", NUMBER_WORDS[len(objs) - 1])]
        shapes = [o.shape for o in objs]
        colours = [o.colour for o in objs]
        for i, o in enumerate(objs):
            if shapes.count(o.shape) == 1:
                qa.append((f"what colour is the {o.shape}?", o.colour))
            if colours.count(o.colour) == 1:
                qa.append((f"what shape is the {o.colour} object?", o.shape))
            qa.append((f"what size is the {o.colour} {o.shape}?", o.size))
            qa.append((f"what is left of the {o.colour} {o.shape}?", objs[i - 1].shape if i > 0 else "nothing"))
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            pick = objs[rng.integers(len(objs))]
            c, s = pick.colour, pick.shape
        else:
            while True:
                c, s = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
                if (c, s) not in present:
                    break
        yes_no = (f"is there {_article(c)} {c} {s}?", "yes" if (c, s) in present else "no")
        order = rng.permutation(len(qa))
        chosen = [qa[i] for i in order[: max(0, n - 1)]]
        return [*chosen, yes_no]

    def sample(self, split: str, index: int, modalities: tuple[str, ...] = ("image", "text")) -> dict[str, Any]:
        """One sample dict with "id", "scene", "scene_key" and the requested modalities only.

        Each modality draws from its own child stream, so asking for more modalities never changes the others.
        """
        scene = self.scene(split, index)
        out: dict[str, Any] = {"id": f"{split}-{index:07d}", "scene": scene.to_dict(), "scene_key": scene.key_str()}
        seeds = {m: self._rng(split, index, 0, s) for s, m in enumerate(("image", "text", "audio", "video", "vqa"), 1)}
        unknown = set(modalities) - set(seeds)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; expected a subset of {sorted(seeds)}")
        if "image" in modalities:
            out["image"] = self.render_image(scene, seeds["image"])
        if "text" in modalities:
            out["text"] = self.caption(scene, seeds["text"])
        if "audio" in modalities:
            out["audio"] = self.render_audio(scene, seeds["audio"])
            out["audio_sr"] = self.config.audio_sample_rate
        if "video" in modalities:
            out["video"] = self.render_video(scene, seeds["video"])
            out["video_text"] = describe_motion(scene)
        if "vqa" in modalities:
            out["vqa"] = [{"question": q, "answer": a} for q, a in self.vqa(scene, seeds["vqa"])]
        return out


def make_split(
    world: SyntheticWorld, split: str, n: int, modalities: tuple[str, ...] = ("image", "text"), progress: bool = False
) -> list[dict[str, Any]]:
    """Samples 0..n-1 of `split` (a progress bar when `progress`)."""
    indices: Any = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"render {split}", unit="sample", leave=False)
    return [world.sample(split, i, modalities) for i in indices]


__all__ = [
    "COLOURS", "DIRECTIONS", "SHAPES", "SIZES", "VQA_ANSWERS", "Obj", "Scene", "SyntheticWorld", "WorldConfig",
    "caption_for", "describe_motion", "make_split",
]
