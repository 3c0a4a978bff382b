"""Paraphrased captions of the synthetic world: the same scenes described with words its training captions
never use ("crimson" / "scarlet" for red, "sphere" / "ball" for circle, "tiny" / "huge", "leftmost",
"followed by", clauses in another order). A model that learned the world's words only from its captions has
never seen these; a pretrained text tower knows them from its pretraining (docs/pretrained.md).

Every paraphrase states every object's size, colour and shape and the left-to-right order, like the training
captions; none of the world's attribute or position words (`TRAINING_WORDS` below holds every word of its
caption templates and attribute vocabulary) appears in one except the article "a".
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .scene import COLOURS, SHAPES, SIZES, TEMPLATES, Scene

SYNONYMS: dict[str, tuple[str, ...]] = {
    # sizes
    "small": ("tiny", "little", "miniature"),
    "large": ("huge", "big", "giant"),
    # colours
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "lime"),
    "blue": ("navy", "azure"),
    "yellow": ("golden", "lemon"),
    "purple": ("violet", "lilac"),
    "orange": ("amber", "tangerine"),
    "white": ("ivory", "snowy"),
    "cyan": ("turquoise", "teal"),
    # shapes
    "circle": ("sphere", "ball", "disc"),
    "square": ("box", "block"),
    "triangle": ("pyramid", "wedge"),
    "diamond": ("rhombus", "lozenge"),
    "cross": ("plus sign", "plus"),
}

# {0}, {1}, {2}: the objects left to right, as in the training templates; other words are new too.
PARAPHRASE_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: ("a {0}", "just one {0}", "one {0} alone", "a photo with one {0}"),
    2: (
        "a {0} followed by a {1}",
        "leftmost a {0}, rightmost a {1}",
        "a {1}, with a {0} further west",
        "a {0} west, a {1} east",
    ),
    3: (
        "a {0}, then a {1}, then a {2}",
        "leftmost a {0}, rightmost a {2}, centre a {1}",
        "a {2} east, a {1} centre, a {0} west",
        "a {0} followed by a {1} followed by a {2}",
    ),
}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


# every word the training captions can contain: the templates' words and the attribute vocabulary
TRAINING_WORDS: frozenset[str] = frozenset(
    set().union(
        *(
            _words(t.replace("{0}", "").replace("{1}", "").replace("{2}", ""))
            for ts in TEMPLATES.values()
            for t in ts
        )
    )
    | set(SIZES)
    | set(COLOURS)
    | set(SHAPES)
)


def paraphrase_object(size: str, colour: str, shape: str, rng: np.random.Generator | None = None) -> str:
    """'small red circle' -> 'tiny crimson sphere' (the first synonyms without `rng`, random ones with it)."""

    def pick(word: str) -> str:
        options = SYNONYMS[word]
        return options[0] if rng is None else options[int(rng.integers(len(options)))]

    return f"{pick(size)} {pick(colour)} {pick(shape)}"


def paraphrase_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A paraphrased caption of `scene` (a random template and random synonyms)."""
    words = [paraphrase_object(*k, rng=rng) for k in scene.key()]
    templates = PARAPHRASE_TEMPLATES[len(words)]
    return templates[int(rng.integers(len(templates)))].format(*words)


def paraphrase_split(samples: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Copies of `samples` (synthetic samples with a "scene") whose "text" is a paraphrase; the scene, its key
    and the image are the same objects. Seeded per sample index: the same input gives the same captions."""
    out = []
    for i, s in enumerate(samples):
        rng = np.random.default_rng([seed, i])
        out.append({**s, "text": paraphrase_caption(Scene.from_dict(s["scene"]), rng)})
    return out


def paraphrase_prompts() -> tuple[list[str], list[dict[str, str]]]:
    """The zero-shot prompts paraphrased: 'a {size} {colour} {shape}' with the first synonym of each word,
    for every attribute combination (the same order as mmfusion.eval.retrieval.zero_shot_prompts)."""
    attrs = [{"size": z, "colour": c, "shape": s} for z in SIZES for c in COLOURS for s in SHAPES]
    return [f"a {paraphrase_object(a['size'], a['colour'], a['shape'])}" for a in attrs], attrs


__all__ = [
    "PARAPHRASE_TEMPLATES",
    "SYNONYMS",
    "TRAINING_WORDS",
    "paraphrase_caption",
    "paraphrase_object",
    "paraphrase_prompts",
    "paraphrase_split",
]
