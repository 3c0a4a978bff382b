"""Multimodal tasks on the synthetic world, as a data source: samples in the manifest format a user's JSONL has.

TASKS lists each task's modalities, head and classes, the sample field each model input reads (`inputs`, e.g.
VQA's text input is the "question" field) and the target field. `make_task_data` builds samples:

    vqa            {"id", "scene_key", "image", "question", "answer"}            target: answer (VQA_ANSWERS)
    audio_image    {"id", "scene_key", "image", "audio", "audio_sr", "label"}    target: label (0/1 match)
    video_text     {"id", "scene_key", "video", "text", "label"}                 target: label (0/1 match)
    audio_visual   {"id", "scene_key", "image", "audio", "audio_sr", "label"}    target: label (0/1 match)
    paired_colour  {"id", "scene_key", "image", "audio", "audio_sr", "label"}    target: label (colour index)

`mmfusion data synth --task NAME` writes them as JSONL / WebDataset, and a run with `data.synthetic.task: NAME`
reads them in memory: the same fields either way, collated by the one Collate (mmfusion.data.collate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..batch import Batch
from ..errors import ConfigError, DataError
from ..modalities import MODALITIES, encoder_config
from ..modalities.text import TextTokenizer
from .collate import Collate, Input, Target
from .synthetic import COLOURS, SHAPES, SIZES, VQA_ANSWERS, Obj, Scene, SyntheticWorld, describe_motion

MODALITY_ORDER = ("image", "text", "audio", "video")


@dataclass(frozen=True)
class TaskSpec:
    """One task: the modalities it feeds, its head ("classify" | "match"), its classes, the sample field of each
    input whose field is not the modality's own name, and its target field (class names or indices)."""

    name: str
    modalities: tuple[str, ...]
    head: Literal["classify", "match"]
    n_classes: int
    description: str
    inputs: dict[str, str] = field(default_factory=dict)
    target_field: str = "label"
    classes: tuple[str, ...] | None = None

    @property
    def target(self) -> Target:
        return Target(self.target_field, self.classes, None if self.classes else self.n_classes)

    def target_config(self) -> dict[str, Any]:
        """The `data.target` section of a run on this task."""
        return {"field": self.target_field, **({"classes": list(self.classes)} if self.classes else {})}

    def default_encoders(self) -> dict[str, Any]:
        """Tiny encoders for the task's modalities."""
        return dict.fromkeys(self.modalities, "tiny")


TASKS: dict[str, TaskSpec] = {
    "vqa": TaskSpec(
        "vqa",
        ("image", "text"),
        "classify",
        len(VQA_ANSWERS),
        "image + question -> one of VQA_ANSWERS (one question per scene, drawn from its VQA families)",
        inputs={"text": "question"},
        target_field="answer",
        classes=tuple(VQA_ANSWERS),
    ),
    "audio_image": TaskSpec(
        "audio_image",
        ("audio", "image"),
        "match",
        2,
        "does this sound describe this scene? negatives: the audio of another scene (different scene key)",
    ),
    "video_text": TaskSpec(
        "video_text",
        ("text", "video"),
        "match",
        2,
        "does the caption state the mover's direction? negatives: the same caption with a wrong direction",
    ),
    "audio_visual": TaskSpec(
        "audio_visual",
        ("audio", "image"),
        "match",
        2,
        "does the sound's colour (its pitch) appear in the image? every image and every sound occurs once "
        "with label 1 and once with label 0, so either modality alone is exactly at chance",
    ),
    "paired_colour": TaskSpec(
        "paired_colour",
        ("audio", "image"),
        "classify",
        len(COLOURS),
        "a scene's image and its audio -> the leftmost object's colour; each modality alone carries it (the "
        "object; the first tone's pitch): the paired data of cross-modal distillation (T5)",
    ),
}


def _spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    return TASKS[task]


# ---- sample builders --------------------------------------------------------------------------------------
def _vqa(world: SyntheticWorld, split: str, n: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        s = world.sample(split, i, ("image", "vqa"))
        qa = s["vqa"][int(np.random.default_rng([seed, i]).integers(len(s["vqa"])))]
        out.append(
            {
                "id": s["id"],
                "scene_key": s["scene_key"],
                "image": s["image"],
                "question": qa["question"],
                "answer": qa["answer"],
            }
        )
    return out


def _audio_image(world: SyntheticWorld, split: str, n: int, seed: int) -> list[dict[str, Any]]:
    base = [world.sample(split, i, ("image", "audio")) for i in range(n)]
    out = []
    for i, s in enumerate(base):
        rng = np.random.default_rng([seed, i])
        label = int(rng.random() < 0.5)
        source = s
        if not label:
            others = [o for o in base if o["scene_key"] != s["scene_key"]]
            if not others:
                raise DataError("audio_image needs at least two different scenes; raise n")
            source = others[int(rng.integers(len(others)))]
        out.append(
            {
                "id": s["id"],
                "scene_key": s["scene_key"],
                "image": s["image"],
                "audio": source["audio"],
                "audio_sr": source["audio_sr"],
                "label": label,
            }
        )
    return out


def _video_text(world: SyntheticWorld, split: str, n: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        s = world.sample(split, i, ("video",))
        scene = Scene.from_dict(s["scene"])
        rng = np.random.default_rng([seed, i])
        label = int(rng.random() < 0.5)
        motion = scene.motion
        if not label:
            wrong = [d for d in ("left", "right", "up", "down") if d != scene.motion]
            motion = wrong[int(rng.integers(len(wrong)))]
        out.append(
            {
                "id": s["id"],
                "scene_key": s["scene_key"],
                "video": s["video"],
                "text": describe_motion(dataclasses.replace(scene, motion=motion)),
                "label": label,
            }
        )
    return out


def _colour_sound(world: SyntheticWorld, colour: str, rng: np.random.Generator) -> np.ndarray:
    """A one-object sound of `colour` (its pitch) with a random shape (timbre) and size (loudness)."""
    obj = Obj(SHAPES[int(rng.integers(len(SHAPES)))], colour, SIZES[int(rng.integers(len(SIZES)))], 0.5, 0.5)
    return world.render_audio(Scene((obj,)), rng)


def _audio_visual(world: SyntheticWorld, split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Quadruples from two images I1, I2 with colour sets C1, C2 and two sounds A1 (colour in C1 - C2),
    A2 (colour in C2 - C1): (I1, A1, 1), (I1, A2, 0), (I2, A2, 1), (I2, A1, 0). Each image and each sound
    is used once with each label, so no function of one modality alone beats chance."""
    out: list[dict[str, Any]] = []
    index = 0
    while len(out) < n:
        s1, s2 = world.sample(split, index, ("image",)), world.sample(split, index + 1, ("image",))
        index += 2
        c1 = {o["colour"] for o in s1["scene"]["objects"]}
        c2 = {o["colour"] for o in s2["scene"]["objects"]}
        only1, only2 = sorted(c1 - c2), sorted(c2 - c1)
        if not only1 or not only2:
            continue
        rng = np.random.default_rng([seed, index])
        a1 = _colour_sound(world, only1[int(rng.integers(len(only1)))], rng)
        a2 = _colour_sound(world, only2[int(rng.integers(len(only2)))], rng)
        sr = world.config.audio_sample_rate
        for s, a, label in ((s1, a1, 1), (s1, a2, 0), (s2, a2, 1), (s2, a1, 0)):
            out.append(
                {
                    "id": f"{s['id']}-{len(out) % 4}",
                    "scene_key": s["scene_key"],
                    "image": s["image"],
                    "audio": a,
                    "audio_sr": sr,
                    "label": label,
                }
            )
    return out[: n - n % 4] if n >= 4 else out[:4]


PAIRED_LABELS = ("colour", "shape", "size")  # paired_samples: an attribute of the leftmost object


def paired_samples(
    world: SyntheticWorld,
    split: str,
    n: int,
    label: str = "colour",
    modalities: tuple[str, ...] = ("image", "audio"),
) -> list[dict[str, Any]]:
    """n paired scenes of `split`: the scene's `modalities` ("image", "audio", "text" caption) and "label" =
    an attribute of the leftmost object (colour: 8 classes, shape: 5, size: 2).

    Every modality carries the label: the image shows the object, the caption names it, and the audio plays
    the leftmost object first (colour -> pitch, shape -> waveform, size -> loudness)."""
    classes = label_classes(label)
    if n < 1:
        raise DataError(f"paired_samples needs n >= 1, got {n}")
    out = []
    for i in range(n):
        s = world.sample(split, i, modalities)
        first = Scene.from_dict(s["scene"]).left_to_right()[0]
        s["label"] = classes.index(getattr(first, label))
        del s["scene"]
        out.append(s)
    return out


def label_classes(label: str) -> tuple[str, ...]:
    """The class names of a paired_samples label, in label order."""
    classes = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}
    if label not in classes:
        raise ConfigError(f"paired label {label!r}: allowed: {', '.join(PAIRED_LABELS)}")
    return classes[label]


def _paired_colour(world: SyntheticWorld, split: str, n: int, seed: int) -> list[dict[str, Any]]:
    return paired_samples(world, split, n, "colour")


_BUILDERS = {
    "paired_colour": _paired_colour,
    "vqa": _vqa,
    "audio_image": _audio_image,
    "video_text": _video_text,
    "audio_visual": _audio_visual,
}


def make_task_data(
    task: str, world: SyntheticWorld, split: str, n: int, seed: int = 0
) -> list[dict[str, Any]]:
    """n samples of `task` from `split` of `world`: dicts with the task's raw inputs ("image" (H, W, 3) uint8,
    "text" str, "audio" (n,) float32 + "audio_sr", "video" (T, H, W, 3) uint8) and "label" int.

    Deterministic in (world seed, split, n, seed). audio_visual returns a multiple of 4 samples (whole
    quadruples; at least 4).
    """
    _spec(task)
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    return _BUILDERS[task](world, split, n, seed)


def task_tokenizer(
    samples: Sequence[dict[str, Any]],
    vocab_size: int = 256,
    context_length: int = 32,
    field: str | None = None,
) -> TextTokenizer:
    """A BPE TextTokenizer trained on the samples' texts (train on the training split only); `field`: where
    the text is (default: the text input's field of the samples' task, e.g. VQA's "question")."""
    if field is None:
        field = TASKS[_task_of(samples[0])].inputs.get("text", "text") if samples else "text"
    texts = [s[field] for s in samples if s.get(field) is not None]
    if not texts:
        raise DataError("no sample has a text to train a tokenizer on")
    return TextTokenizer.train(texts, vocab_size, context_length)


def task_collate(
    task: str,
    tokenizer: TextTokenizer | None = None,
    encoders: dict[str, Any] | None = None,
    keys: Sequence[str] | None = None,
) -> Collate:
    """The Collate of `task`'s samples for a model with `encoders` (batch key -> encoder config; default the
    task's tiny encoders), restricted to `keys` (default: every encoder)."""
    spec = _spec(task)
    encoders = encoders or spec.default_encoders()
    cfgs = {k: encoder_config(k, v) for k, v in encoders.items() if keys is None or k in keys}
    inputs = {k: Input(MODALITIES[c.kind], c, spec.inputs.get(k)) for k, c in sorted(cfgs.items())}
    return Collate(inputs, tokenizer, spec.target)


def collate(
    samples: Sequence[dict[str, Any]], tokenizer: TextTokenizer | None = None, task: str | None = None
) -> Batch:
    """Task samples -> Batch with the task's tiny-encoder preprocessing (the task is told by the samples' fields
    when not given): data "image" (B, 3, 32, 32), "text" (B, L), "audio" (B, 64, frames), "video" (B, 4, 3, 32,
    32), "label" (B,) int64; a mask per modality. Convenience for tests and benchmarks: runs use the Collate of
    their model (mmfusion.run)."""
    if not samples:
        raise DataError("cannot collate an empty list of samples")
    collate = task_collate(task or _task_of(samples[0]), tokenizer)
    if task is None:  # the fields tell the inputs, not the classes (paired_colour looks like audio_image)
        collate.target = Target(collate.target.field, collate.target.classes)
    batch = collate(samples)
    if batch.meta["skipped"]:
        raise DataError(f"samples that do not fit task {task!r}: {batch.meta['skipped'][:3]}")
    return batch


def _task_of(sample: dict[str, Any]) -> str:
    if "question" in sample:
        return "vqa"
    if "video" in sample:
        return "video_text"
    if "audio" in sample and "image" in sample:
        return "audio_image"  # audio_visual and paired_colour collate the same way
    raise DataError(f"cannot tell the task of a sample with fields {sorted(sample)}; pass task=")


__all__ = [
    "PAIRED_LABELS",
    "TASKS",
    "TaskSpec",
    "collate",
    "label_classes",
    "make_task_data",
    "paired_samples",
    "task_collate",
    "task_tokenizer",
]
