"""The synthetic world's scenes and their language: the vocabulary (shapes, colours, sizes, motions and how
each renders), `Obj` and `Scene`, the caption templates and the VQA question families."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

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


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption from a random template; it states every object's size, colour, shape and the left-right order."""
    return caption_for(scene, int(rng.integers(len(TEMPLATES[len(scene.objects)]))))


def describe_motion(scene: Scene) -> str:
    """Video caption of the mover (objects[0]): 'a small red circle moving left'."""
    return f"a {scene.objects[0].words()} moving {scene.motion}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---- visual question answering ----------------------------------------------------------------------------
def vqa_pairs(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
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


__all__ = [
    "BACKGROUND",
    "COLOURS",
    "DIRECTIONS",
    "GAP",
    "GRID",
    "LOUDNESS",
    "NUMBER_WORDS",
    "PITCH",
    "RGB",
    "SHAPES",
    "SIZES",
    "SIZE_FRACTION",
    "TEMPLATES",
    "VIDEO_TRAVEL",
    "VQA_ANSWERS",
    "WAVEFORMS",
    "Obj",
    "Scene",
    "caption_for",
    "describe_motion",
    "random_caption",
    "vqa_pairs",
]
