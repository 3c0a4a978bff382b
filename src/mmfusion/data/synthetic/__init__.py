"""The embedded synthetic world: seeded scenes of coloured shapes as image, caption, audio, video and VQA.

Every sample carries its ground-truth scene, so every task is exactly measurable. A sample is a pure
function of (seed, split, index): no global RNG, byte-identical across calls and processes. Splits are
disjoint by scene content: a scene's stable hash decides the only split it may belong to.

Randomness: attempt `a` of sample (seed, split, index) draws its layout from
``np.random.default_rng([seed, split_id, index, a])``; the accepted attempt's SeedSequence then spawns one
child stream per modality (image noise, caption template, audio noise, video noise, VQA), so asking for
more modalities never changes the others.

The parts: `scene.py` (vocabulary, `Obj`, `Scene`, captions, VQA questions), `render.py` (image, video and
audio renderers), `world.py` (`WorldConfig`, `SyntheticWorld`, `make_split`). Their public names are
importable from here.
"""

from __future__ import annotations

from .render import render_audio, render_frame, trajectory
from .scene import (
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    GAP,
    GRID,
    LOUDNESS,
    NUMBER_WORDS,
    PITCH,
    RGB,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    TEMPLATES,
    VIDEO_TRAVEL,
    VQA_ANSWERS,
    WAVEFORMS,
    Obj,
    Scene,
    caption_for,
    describe_motion,
    random_caption,
    vqa_pairs,
)
from .world import MODALITIES, SPLIT_IDS, SPLITS, SyntheticWorld, WorldConfig, make_split

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "DIRECTIONS",
    "GAP",
    "GRID",
    "LOUDNESS",
    "MODALITIES",
    "NUMBER_WORDS",
    "PITCH",
    "RGB",
    "SHAPES",
    "SIZES",
    "SIZE_FRACTION",
    "SPLITS",
    "SPLIT_IDS",
    "TEMPLATES",
    "VIDEO_TRAVEL",
    "VQA_ANSWERS",
    "WAVEFORMS",
    "Obj",
    "Scene",
    "SyntheticWorld",
    "WorldConfig",
    "caption_for",
    "describe_motion",
    "make_split",
    "random_caption",
    "render_audio",
    "render_frame",
    "trajectory",
    "vqa_pairs",
]
