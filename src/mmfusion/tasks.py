"""Multimodal tasks on the synthetic world that need more than one modality, and their collation to a Batch.

TASKS lists each task's modalities, head and number of classes. `make_task_data` builds samples (dicts with
the raw inputs and an int "label"); `collate` turns a list of them into a Batch whose data holds the
preprocessed modalities plus "label" (B,) int64 (targets have no mask).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from .batch import Batch
from .data.synthetic import COLOURS, SHAPES, SIZES, VQA_ANSWERS, Obj, Scene, SyntheticWorld, describe_motion
from .errors import ConfigError, DataError
from .modalities.audio import preprocess_audios
from .modalities.image import preprocess_images
from .modalities.text import TextTokenizer
from .modalities.video import preprocess_videos
from .models.multimodal import MultiModalModel

MODALITY_ORDER = ("image", "text", "audio", "video")


@dataclass(frozen=True)
class TaskSpec:
    """One task: the modalities it feeds, its head ("classify" | "match") and its number of classes."""

    name: str
    modalities: tuple[str, ...]
    head: Literal["classify", "match"]
    n_classes: int
    description: str


TASKS: dict[str, TaskSpec] = {
    "vqa": TaskSpec(
        "vqa",
        ("image", "text"),
        "classify",
        len(VQA_ANSWERS),
        "image + question -> one of VQA_ANSWERS (one question per scene, drawn from its VQA families)",
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
                "text": qa["question"],
                "answer": qa["answer"],
                "label": VQA_ANSWERS.index(qa["answer"]),
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


def _paired_colour(world: SyntheticWorld, split: str, n: int, seed: int) -> list[dict[str, Any]]:
    from .train.distill import paired_samples

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
    samples: Sequence[dict[str, Any]], vocab_size: int = 256, context_length: int = 32
) -> TextTokenizer:
    """A BPE TextTokenizer trained on the samples' texts (train on the training split only)."""
    texts = [s["text"] for s in samples if s.get("text") is not None]
    if not texts:
        raise DataError("no sample has a text to train a tokenizer on")
    return TextTokenizer.train(texts, vocab_size, context_length)


def collate(
    samples: Sequence[dict[str, Any]],
    tokenizer: TextTokenizer | None = None,
    image_size: int = 32,
    num_frames: int = 4,
    audio_seconds: float | None = None,
) -> Batch:
    """Samples -> Batch: data "image" (B, 3, S, S), "text" (B, L) ids, "audio" (B, 64, frames) log-mels,
    "video" (B, num_frames, 3, S, S), "label" (B,) int64; mask per modality (False where a sample lacks it or
    its value is None; those rows are placeholders). Meta: "id", "scene_key"."""
    if not samples:
        raise DataError("cannot collate an empty list of samples")
    data: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    for m in MODALITY_ORDER:
        if not any(s.get(m) is not None for s in samples):
            continue
        present = [s.get(m) is not None for s in samples]
        first = next(s for s in samples if s.get(m) is not None)
        rows = [s[m] if ok else first[m] for s, ok in zip(samples, present)]  # placeholders: a real row
        if m == "image":
            data[m] = preprocess_images(rows, image_size)
        elif m == "text":
            if tokenizer is None:
                raise DataError("the samples have text: collate needs a tokenizer")
            data[m] = tokenizer.encode(rows)
        elif m == "audio":
            rates = [
                s.get("audio_sr", first["audio_sr"]) if ok else first["audio_sr"]
                for s, ok in zip(samples, present)
            ]
            data[m] = preprocess_audios(rows, rates, seconds=audio_seconds)[0]
        else:
            data[m] = preprocess_videos(rows, num_frames, image_size)
        mask[m] = torch.tensor(present, dtype=torch.bool)
    if any("label" not in s for s in samples):
        raise DataError("every task sample needs a 'label'")
    data["label"] = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    meta = {k: [s.get(k) for s in samples] for k in ("id", "scene_key")}
    return Batch(data, mask, meta)


def build_task_model(
    task: str,
    size: str = "tiny",
    tokenizer: TextTokenizer | None = None,
    modalities: Sequence[str] | None = None,
    **kwargs: Any,
) -> MultiModalModel:
    """A MultiModalModel with `size` encoders for the task's modalities (or the subset `modalities`, e.g. a
    single-modality baseline) and its head; kwargs (fusion, dim, modality_dropout, fusion_kwargs ...) go to the
    constructor."""
    spec = _spec(task)
    modalities = list(spec.modalities if modalities is None else modalities)
    extra = [m for m in modalities if m not in spec.modalities]
    if extra or not modalities:
        raise ConfigError(
            f"modalities {modalities}: task {task!r} has {list(spec.modalities)}; pick a non-empty subset"
        )
    return MultiModalModel(
        encoders={m: size for m in modalities},
        head=spec.head,
        n_classes=spec.n_classes,
        tokenizer=tokenizer,
        **kwargs,
    )


__all__ = ["TASKS", "TaskSpec", "build_task_model", "collate", "make_task_data", "task_tokenizer"]
