"""The captioner's text side: which prompt and target a sample gives, their token ids and loss labels, and the
Collate of a vlm run (images through the one Collate, prompt + target tokens by the LM's own tokenizer).

Row layout (before the image tokens are spliced in after the prefix):

    ids     [bos] prompt...  target... eos  pad...
    labels  -100  -100...    target... eos  -100...     (loss on the target and eos only)

A sample with "question" and "answer" gives (question_prompt.format(question=...), answer); else its caption
("text", or "caption") gives (prompt, caption). A sample with neither is skipped as missing_modality.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..batch import Batch
from ..data.collate import Collate
from ..data.sources import SkippedSample
from ..modalities.base import read_field
from .vlm_config import VLMConfig

IGNORE = -100  # label of positions without loss (cross_entropy's ignore_index)
TEXT_FIELDS = ("question", "answer", "text", "caption")  # the fields a prompt + target come from


def _text(sample: Mapping[str, Any], field: str) -> str | None:
    value = read_field(sample, field)
    return value.strip() if isinstance(value, str) and value.strip() else None


@dataclass
class PromptFormat:
    """The LM tokenizer + the config's prompts: sample -> (prompt, target) -> (ids, labels)."""

    tokenizer: Any
    config: VLMConfig

    @property
    def prefix(self) -> list[int]:
        """[bos] when the tokenizer has one (Llama, GPT-2), else nothing (Qwen2): image tokens come after it."""
        bos = self.tokenizer.bos_token_id
        return [] if bos is None else [bos]

    @property
    def eos(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos if pad is None else pad

    def pair(self, sample: Mapping[str, Any]) -> tuple[str, str] | None:
        """(prompt, target) of a sample; None when it has neither a question + answer nor a caption."""
        q, a = _text(sample, "question"), _text(sample, "answer")
        if q is not None and a is not None:
            return self.config.question_prompt.format(question=q), a
        caption = _text(sample, "text") or _text(sample, "caption")
        return (self.config.prompt, caption) if caption is not None else None

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def prompt_ids(self, prompt: str) -> list[int]:
        """[bos] + prompt tokens, cut to max_text_tokens (what generation continues)."""
        return self.prefix + self._ids(prompt)[: self.config.max_text_tokens]

    def encode(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """(ids, labels) of one training row: prefix + prompt + target + eos, at most prefix + max_text_tokens."""
        head = self.prompt_ids(prompt)
        tail = self._ids(target) + [self.eos]
        ids = (head + tail)[: len(self.prefix) + self.config.max_text_tokens]
        labels = ([IGNORE] * len(head) + tail)[: len(ids)]
        return ids, labels


@dataclass
class VLMCollate:
    """Samples -> Batch: data "image" (B, 3, S, S); "input_ids", "labels" (B, L) int64 right-padded (pad id /
    -100); "attention_mask" (B, L) bool, True on real tokens. `images` is the one Collate with the image input,
    whose meta carries TEXT_FIELDS (a sample without a prompt + target is skipped before it)."""

    images: Collate
    text: PromptFormat

    def __call__(self, samples: Sequence[Mapping[str, Any] | SkippedSample]) -> Batch:
        rows = [
            s
            if isinstance(s, SkippedSample) or self.text.pair(s) is not None
            else SkippedSample(str(s.get("id", "?")), "missing_modality", "no caption / question + answer")
            for s in samples
        ]
        batch = self.images(rows)
        if not batch.data:
            return batch
        fields = [f for f in TEXT_FIELDS if f in batch.meta]
        pairs = [self.text.pair({f: batch.meta[f][i] for f in fields}) for i in range(len(batch))]
        encoded = [self.text.encode(*p) for p in pairs if p is not None]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(encoded), width), self.text.pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.bool)
        for i, (row_ids, row_labels) in enumerate(encoded):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            labels[i, : len(row_labels)] = torch.tensor(row_labels)
            mask[i, : len(row_ids)] = True
        batch.data.update(input_ids=ids, labels=labels, attention_mask=mask)
        return batch


__all__ = ["IGNORE", "PromptFormat", "VLMCollate"]
