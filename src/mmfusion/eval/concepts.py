"""Concept filters on the synthetic world, where "harm" is a defined attribute so every figure is exact (Z4).

A concept is a word of the world's vocabulary (a colour, shape or size: "red", "cross", "large"); a scene
shows it when one of its objects has that attribute. Its prompts are the single-object captions that name it
("a small red circle", ... for "red"), its negative prompts those of the attribute's other values (every other
colour); the concept's vector is the difference of their mean text embeddings (mmfusion.safety.filters). `calibrate_filters` sets per-concept image and caption thresholds on one split,
`filter_report` gives precision / recall on another.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data.synthetic import COLOURS, SHAPES, SIZES, Scene, SyntheticWorld, WorldConfig
from ..errors import ConfigError
from ..safety.filters import Concept, ConceptFilters, concept_vector

VOCABULARY = {**{c: "colour" for c in COLOURS}, **{s: "shape" for s in SHAPES}, **{z: "size" for z in SIZES}}


def negative_prompts(concept: str) -> list[str]:
    """The prompts of the concept's alternatives: the other values of its attribute (other colours for a colour)."""
    field = VOCABULARY[concept]
    return [p for w, f in VOCABULARY.items() if f == field and w != concept for p in concept_prompts(w)]


def concept_prompts(concept: str) -> list[str]:
    """The captions "a {size} {colour} {shape}" that name `concept`."""
    if concept not in VOCABULARY:
        raise ConfigError(f"concept {concept!r}: the synthetic world's concepts are {sorted(VOCABULARY)}")
    return [f"a {z} {c} {s}" for z in SIZES for c in COLOURS for s in SHAPES if concept in (z, c, s)]


def shows(scene: Scene, concept: str) -> bool:
    """Whether one of the scene's objects has the attribute `concept`."""
    field = VOCABULARY[concept]
    return any(getattr(o, field) == concept for o in scene.objects)


def synthetic_data(seed: int, split: str, n: int, concepts: list[str]) -> dict[str, Any]:
    """n samples of `split`: images (uint8), captions and (n, C) labels (scene shows concept c)."""
    world = SyntheticWorld(WorldConfig(seed=seed))
    samples = [world.sample(split, i) for i in range(n)]
    labels = np.array(
        [[shows(Scene.from_dict(s["scene"]), c) for c in concepts] for s in samples], dtype=bool
    )
    return {"images": [s["image"] for s in samples], "texts": [s["text"] for s in samples], "labels": labels}


def build_filters(
    model,
    concepts: list[str],
    recall: dict[str, float],
    model_id: str = "",
    precision: dict[str, float] | None = None,
) -> ConceptFilters:
    """Uncalibrated filters: each concept's vector from its prompts' text embeddings; the levels' targets."""
    for c in concepts:
        concept_prompts(c)  # names the allowed concepts on a typo
    out = []
    for c in concepts:
        prompts, negatives = concept_prompts(c), negative_prompts(c)
        vec = concept_vector(model.encode_text(prompts).numpy(), model.encode_text(negatives).numpy())
        out.append(Concept(c, prompts, vec.tolist(), negatives=negatives))
    return ConceptFilters(out, model_id, dict(recall), dict(precision or {}))


def embeddings(model, data: dict[str, Any]) -> dict[str, np.ndarray]:
    """modality -> (n, D) embeddings of the data's images and captions."""
    return {
        "image": model.encode_image(data["images"]).numpy(),
        "text": model.encode_text(data["texts"]).numpy(),
    }


def calibrate_filters(
    model,
    concepts: list[str],
    seed: int,
    split: str,
    n: int,
    recall: dict[str, float],
    model_id: str = "",
    precision: dict[str, float] | None = None,
) -> ConceptFilters:
    """Filters for `concepts` with image and text thresholds calibrated on n samples of `split` (per level
    for its precision target if `precision` names it, else its recall target)."""
    filters = build_filters(model, concepts, recall, model_id, precision)
    data = synthetic_data(seed, split, n, concepts)
    for modality, emb in embeddings(model, data).items():
        filters.calibrate(modality, emb, data["labels"])
    return filters


def filter_report(model, filters: ConceptFilters, seed: int, split: str, n: int) -> dict[str, Any]:
    """modality -> concept -> level -> precision / recall on n samples of `split`."""
    data = synthetic_data(seed, split, n, [c.name for c in filters.concepts])
    return {m: filters.report(m, emb, data["labels"]) for m, emb in embeddings(model, data).items()}
