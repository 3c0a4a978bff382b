"""The one collate: samples -> Batch (ARCHITECTURE.md: source -> modality spec -> collate -> Batch).

Every training and evaluation path builds its batches here, for every model kind:

    collate = Collate({"image": Input(IMAGE, image_cfg), "text": Input(TEXT, text_cfg, field="question")},
                      tokenizer=tok, target=Target("answer", classes=VQA_ANSWERS))
    batch = collate(samples)   # data: "image" (B, 3, S, S), "text" (B, L), "label" (B,); mask per input

One meaning of "missing": a sample without a value for an input (absent field, None, or a modality its
source left out) gets `mask[key] = False` and a placeholder row (the modality's SPEC.placeholder) that models
never look at. Every input is in every batch, all-False when no sample of the batch has it. Samples the collate cannot use are left out of the batch and listed in
`batch.meta["skipped"]` as (id, reason), which the Trainer counts (data_errors.json):

    unreadable            the source's SkippedSample reason (corrupt_image, missing_file, bad_json ...)
    missing_modality      none of the inputs present, or a `required` one absent
    missing_label         the target field is absent
    unknown_label         the target is not one of `target.classes` (or not an index below n_classes)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..batch import Batch
from ..errors import DataError
from ..modalities.base import ModalitySpec, read_field
from .sources import SkippedSample


@dataclass(frozen=True)
class Input:
    """One model input: its modality, the encoder config its preprocessing reads (image_size, num_frames,
    n_mels / max_frames ...), and the sample field it comes from (default: the modality's name)."""

    spec: ModalitySpec
    config: Any
    field: str | None = None

    @property
    def source_field(self) -> str:
        return self.field or self.spec.name


@dataclass(frozen=True)
class Target:
    """How a sample's target becomes batch.data["label"] (B,) int64.

    field:    the sample / manifest field ("label", "answer" ...).
    classes:  class names: a value is its index in this list. None: the value is already a class index.
    n_classes: with classes None, indices must lie in [0, n_classes) (None: any index >= 0).
    extract:  applied to the field's value first (e.g. a scene's left-most object's shape); a picklable
              function (DataLoader workers), not a lambda.
    unlabelled: a value that stands for "no label" and passes through as itself (distillation's UNLABELLED
              rows, taught by the teacher alone); None: no such value.
    """

    field: str = "label"
    classes: tuple[str, ...] | None = None
    n_classes: int | None = None
    extract: Callable[[Any], Any] | None = None
    unlabelled: int | None = None

    def index(self, value: Any) -> int | None:
        """The class index of a field value, None when it is not a valid class."""
        if self.unlabelled is not None and value == self.unlabelled:
            return self.unlabelled
        if self.extract is not None:
            value = self.extract(value)
        if self.classes is not None:
            key = str(value) if not isinstance(value, str) else value
            return self.classes.index(key) if key in self.classes else None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            else:
                return None
        if value < 0 or (self.n_classes is not None and value >= self.n_classes):
            return None
        return value


@dataclass
class Collate:
    """Samples (dicts or SkippedSample) -> Batch; see the module docstring.

    inputs:   batch key -> Input (order = the order of batch.data).
    tokenizer: for text inputs.
    target:   adds data["label"]; None = no target (contrastive pre-training).
    required: keys every sample must have (the two-tower model needs both image and text); the others may
              be missing (masked).
    meta:     sample fields copied into batch.meta (lists, one value per kept sample; None where absent).
    """

    inputs: Mapping[str, Input]
    tokenizer: Any = None
    target: Target | None = None
    required: Sequence[str] = ()
    meta: Sequence[str] = ("id", "scene_key")

    def __post_init__(self) -> None:
        if not self.inputs:
            raise DataError("a collate needs at least one input")
        missing = [k for k in self.required if k not in self.inputs]
        if missing:
            raise DataError(f"required inputs {missing} are not among the inputs {list(self.inputs)}")

    def __call__(self, samples: Sequence[Mapping[str, Any] | SkippedSample]) -> Batch:
        kept: list[tuple[Mapping[str, Any], dict[str, Any], int | None]] = []
        skipped: list[tuple[str, str]] = []
        for s in samples:
            if isinstance(s, SkippedSample):
                skipped.append((s.id, s.reason))
                continue
            raws = {k: inp.spec.read(s, inp.source_field) for k, inp in self.inputs.items()}
            sid = str(s.get("id", "?"))
            if all(v is None for v in raws.values()) or any(raws[k] is None for k in self.required):
                skipped.append((sid, "missing_modality"))
                continue
            label = None
            if self.target is not None:
                value = read_field(s, self.target.field)
                if value is None:
                    skipped.append((sid, "missing_label"))
                    continue
                label = self.target.index(value)
                if label is None:
                    skipped.append((sid, "unknown_label"))
                    continue
            kept.append((s, raws, label))
        if not kept:
            return Batch({}, {}, {"skipped": skipped})
        data: dict[str, torch.Tensor] = {}
        mask: dict[str, torch.Tensor] = {}
        for key, inp in self.inputs.items():
            present = [raws[key] is not None for _, raws, _ in kept]
            fill = inp.spec.placeholder(inp.config)
            rows = [raws[key] if ok else fill for (_, raws, _), ok in zip(kept, present)]
            data[key] = inp.spec.preprocess(rows, inp.config, self.tokenizer)
            mask[key] = torch.tensor(present, dtype=torch.bool)
        if self.target is not None:
            data["label"] = torch.tensor([label for _, _, label in kept], dtype=torch.long)
        meta: dict[str, list[Any]] = {k: [read_field(s, k) for s, _, _ in kept] for k in self.meta}
        meta["skipped"] = skipped
        return Batch(data, mask, meta)


__all__ = ["Collate", "Input", "Target"]
