"""The embedded synthetic world: seeded scenes of coloured shapes as image, caption, audio, video and VQA.

Every sample carries its ground-truth scene, so every task is exactly measurable. A sample is a pure
function of (seed, split, index): no global RNG, byte-identical across calls and processes. Splits are
disjoint by scene content: a scene's stable hash decides the only split it may belong to.

Randomness: attempt `a` of sample (seed, split, index) draws its layout from
``np.random.default_rng([seed, split_id, index, a])``; the accepted attempt's SeedSequence then spawns one
child stream per modality (image noise, caption template, audio noise, video noise, VQA), so asking for
more modalities never changes the others.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
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
BACKGROUND = (12, 12, 16)
SIZE_FRACTION = {"small": 0.22, "large": 0.34}  # bounding-box side, as a fraction of the image side
GAP = 0.02  # minimum free space between objects and to the frame edge (fraction of the side)
GRID = 64  # positions are multiples of 1/GRID (so a scene record is exact and hashes stably)
VIDEO_TRAVEL = 0.35  # distance the mover covers over the clip (fraction of the side)
# audio: colour -> pitch (Hz, 4 semitones apart), size -> loudness (RMS = 0.5 * gain), shape -> waveform
PITCH = dict(zip(COLOURS, (220.0, 277.2, 349.2, 440.0, 554.4, 698.5, 880.0, 1108.7)))
LOUDNESS = {"small": 0.3, "large": 0.8}
WAVEFORMS = {
    "circle": "sine",
    "square": "square",
    "triangle": "triangle",
    "diamond": "sawtooth",
    "cross": "pulse",
}
NUMBER_WORDS = ("one", "two", "three")
SPLITS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}  # content_hash % 100 buckets
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
MODALITIES = ("image", "text", "audio", "video", "vqa")  # index + 1 = child stream of the modality
VQA_ANSWERS = tuple(
    sorted(set(COLOURS) | set(SHAPES) | set(SIZES) | set(NUMBER_WORDS) | {"yes", "no", "nothing"})
)


@dataclass(frozen=True)
class Obj:
    """One object: attributes and centre position (x, y in [0, 1], y downwards, multiples of 1/64)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    def words(self) -> str:
        """'small red circle'."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """1–3 objects in mention order (objects[0] is the one that moves in the video) and its motion direction."""

    objects: tuple[Obj, ...]
    motion: str = "right"

    def left_to_right(self) -> tuple[Obj, ...]:
        """The objects sorted by x."""
        return tuple(sorted(self.objects, key=lambda o: o.x))

    def key(self) -> tuple[tuple[str, str, str], ...]:
        """Caption-level identity: (size, colour, shape) of each object, left to right.

        Positions and motion are excluded: captions state only attributes and left/right relations, so
        scenes with equal keys are described by the same set of captions (use it for scene-matched retrieval).
        """
        return tuple((o.size, o.colour, o.shape) for o in self.left_to_right())

    def key_str(self) -> str:
        """'small red circle | large blue square' (the sample's "scene_key")."""
        return " | ".join(" ".join(k) for k in self.key())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record: {"objects": [{shape, colour, size, x, y}, ...], "motion"}."""
        return {
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size, "x": o.x, "y": o.y}
                for o in self.objects
            ],
            "motion": self.motion,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(
            tuple(
                Obj(o["shape"], o["colour"], o["size"], float(o["x"]), float(o["y"])) for o in d["objects"]
            ),
            d.get("motion", "right"),
        )

    def content_hash(self) -> int:
        """Stable 64-bit hash of the full record, positions quantised to 1/64 (hashlib, not Python's hash())."""
        rec = ";".join(
            f"{o.shape},{o.colour},{o.size},{round(o.x * GRID)},{round(o.y * GRID)}" for o in self.objects
        )
        return int.from_bytes(
            hashlib.blake2b(f"{rec}|{self.motion}".encode(), digest_size=8).digest(), "little"
        )


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    image_size: int = 32
    object_count_probs: tuple[float, float, float] = (0.5, 0.3, 0.2)
    audio_sample_rate: int = 16000
    audio_seconds: float = 0.5
    video_frames: int = 8
    noise: int = 8  # image noise: uniform integer in [-noise, noise] per pixel and channel (0-255 scale)
    audio_noise: float = 0.01  # std of the audio noise


# ---- captions ---------------------------------------------------------------------------------------------
# {0}, {1}, {2} are the objects left to right ("small red circle"); every template states all of them.
ONE = (
    "a {0}",
    "there is a {0}",
    "a {0} on a dark background",
    "an image of a {0}",
    "a picture showing a {0}",
    "a single {0}",
)
TWO = (
    "a {0} to the left of a {1}",
    "a {1} to the right of a {0}",
    "there is a {0} on the left and a {1} on the right",
    "a {1} on the right and a {0} on the left",
    "from left to right: a {0} and a {1}",
    "two shapes: a {0} and a {1}, left to right",
)
THREE = (
    "from left to right: a {0}, a {1} and a {2}",
    "a {0} on the left, a {1} in the middle and a {2} on the right",
    "three shapes: a {0}, a {1} and a {2}, left to right",
    "a {1} between a {0} on the left and a {2} on the right",
    "a {2} on the right, a {1} in the middle and a {0} on the left",
    "a {0} to the left of a {1}, which is to the left of a {2}",
)
TEMPLATES = {1: ONE, 2: TWO, 3: THREE}


def caption_for(scene: Scene, template: int) -> str:
    """The caption of `scene` with template number `template` (modulo the number of templates)."""
    words = [" ".join(k) for k in scene.key()]
    templates = TEMPLATES[len(words)]
    return templates[template % len(templates)].format(*words)


def describe_motion(scene: Scene) -> str:
    """Video caption of the mover (objects[0]): 'a small red circle moving left'."""
    return f"a {scene.objects[0].words()} moving {scene.motion}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---- rendering ---------------------------------------------------------------------------------------------
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
    """Deterministic generator of scenes and their renderings (see the module docstring)."""

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
    def _frame(
        self, scene: Scene, rng: np.random.Generator | None, mover_xy: tuple[float, float] | None
    ) -> np.ndarray:
        """Composite the cached 4x-supersampled sprites onto the background (equal to drawing the whole scene
        at 4x with ImageDraw and box-downsampling, as objects never overlap), then add noise."""
        side = self.config.image_size
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
        a = self.config.noise
        if rng is not None and a > 0:
            img += rng.integers(-a, a + 1, img.shape, dtype=np.int16)
            np.clip(img, 0, 255, out=img)
        return np.rint(img).astype(np.uint8)

    def render_image(self, scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
        """(H, W, 3) uint8: the objects on a dark background (+ seeded noise when `rng` is given)."""
        return self._frame(scene, rng, None)

    def trajectory(self, scene: Scene) -> np.ndarray:
        """(T, 2) mover centre (x, y) per video frame: a straight line of length VIDEO_TRAVEL through the still
        position along scene.motion, shifted (not clamped) to stay inside the frame."""
        obj = scene.objects[0]
        d = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}[scene.motion]
        h = SIZE_FRACTION[obj.size] / 2
        p = np.array([obj.x, obj.y])
        start, end = p - np.multiply(d, VIDEO_TRAVEL / 2), p + np.multiply(d, VIDEO_TRAVEL / 2)
        shift = np.maximum(0, h - np.minimum(start, end)) - np.maximum(0, np.maximum(start, end) - (1 - h))
        start, end = start + shift, end + shift
        frames = self.config.video_frames
        t = np.linspace(0, 1, frames)[:, None] if frames > 1 else np.array([[0.5]])
        return start + t * (end - start)

    def render_video(self, scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
        """(T, H, W, 3) uint8: objects[0] translates steadily along scene.motion; the others stay still."""
        return np.stack([self._frame(scene, rng, (float(x), float(y))) for x, y in self.trajectory(scene)])

    def render_audio(self, scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
        """(n,) float32 in [-1, 1] at audio_sample_rate: one tone per object, left to right, in equal slots.

        colour -> pitch (PITCH), shape -> waveform (WAVEFORMS), size -> loudness (RMS 0.5 * LOUDNESS).
        """
        sr = self.config.audio_sample_rate
        n = int(round(sr * self.config.audio_seconds))
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
        if rng is not None and self.config.audio_noise > 0:
            out += self.config.audio_noise * rng.standard_normal(n)
        return np.clip(out, -1, 1).astype(np.float32)

    def caption(self, scene: Scene, rng: np.random.Generator) -> str:
        """A caption from a random template; it states every object's size, colour, shape and the left-right order."""
        return caption_for(scene, int(rng.integers(len(TEMPLATES[len(scene.objects)]))))

    def vqa(self, scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
        """One (question, answer) pair per applicable family, in this order: count, colour of a unique shape,
        shape of a unique colour, existence (yes/no with probability 1/2 each), left-of and size of a unique
        (colour, shape). Answers are single words in VQA_ANSWERS."""
        objs = scene.left_to_right()
        shapes = [o.shape for o in objs]
        colours = [o.colour for o in objs]
        pairs = [(o.colour, o.shape) for o in objs]

        def pick(items: list) -> Any:
            return items[int(rng.integers(len(items)))]

        qa: list[tuple[str, str]] = [("how many objects are there?", NUMBER_WORDS[len(objs) - 1])]
        unique_shape = [o for o in objs if shapes.count(o.shape) == 1]
        if unique_shape:
            o = pick(unique_shape)
            qa.append((f"what colour is the {o.shape}?", o.colour))
        unique_colour = [o for o in objs if colours.count(o.colour) == 1]
        if unique_colour:
            o = pick(unique_colour)
            qa.append((f"what shape is the {o.colour} object?", o.shape))
        if rng.random() < 0.5:
            c, s = pick(pairs)
        else:  # a near miss: a present object with its colour or its shape changed
            c, s = pick(pairs)
            while (c, s) in pairs:
                if rng.random() < 0.5:
                    c = COLOURS[int(rng.integers(len(COLOURS)))]
                else:
                    s = SHAPES[int(rng.integers(len(SHAPES)))]
        qa.append((f"is there {_article(c)} {c} {s}?", "yes" if (c, s) in pairs else "no"))
        unique = [i for i, o in enumerate(objs) if pairs.count((o.colour, o.shape)) == 1]
        if unique:
            i = pick(unique)
            left = objs[i - 1].shape if i > 0 else "nothing"
            qa.append((f"what is left of the {objs[i].colour} {objs[i].shape}?", left))
            i = pick(unique)
            qa.append((f"what size is the {objs[i].colour} {objs[i].shape}?", objs[i].size))
        return qa

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


__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "SHAPES",
    "SIZES",
    "VQA_ANSWERS",
    "Obj",
    "Scene",
    "SyntheticWorld",
    "WorldConfig",
    "caption_for",
    "describe_motion",
    "make_split",
]
