"""From training rows to unified token batches: the examples a row gives, the collate, and the task-mixed,
resumable step iteration the Trainer reads (its TrainData).

A row is a sample dict of a data source (a JSONL manifest line, a synthetic scene ...). Its fields say which
examples it gives (`row_examples`):

  image + text                       caption (image -> text) and image (text -> image); every `uncond_every`-th
                                     such row also gives a caption-less image example (the unconditional branch
                                     of classifier-free guidance)
  image + question + answer          vqa (the row's fields, or its manifest extras in "meta")
  image + vqa [{question, answer}]   one vqa example per pair
  audio (+ audio_sr) + text          audio_caption (only when the model has an audio tokenizer)

A row that gives none is skipped with the reason "missing_modality" ("no_audio_tokenizer" for an audio + text
row of a model without an audio tokenizer). The collate turns examples (rows with
their "task") into token sequences (mmfusion.unified.sequences) and a Batch; rows it cannot read are listed in
batch.meta["skipped"] as (id, reason), which the Trainer counts (data_errors.json).

Task mixing (`MixedTaskData`): each step's global batch draws every row's task from p_task ∝ n_task^(1/T)
(n_task: the task's examples), then an example uniformly within the task, as `MixedBatches` does; the draws
of step s come from a generator seeded by (seed, s) alone, so a resumed run and any world size see the same
global batches (split over ranks and micro-batches as MapData splits them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..batch import Batch
from ..data.loader import rank_micro_batches
from ..data.sources import JsonlDataset, SkippedSample
from ..errors import DataError
from ..modalities.base import read_field
from ..modalities.image import preprocess_image
from ..models.vq import VQVAE, AudioFrontEnd
from .model import AUDIO, IMAGE
from .sequences import SequenceBuilder, TokenSequence, UnifiedVocab, collate, mixture_probabilities

IMAGE_TASKS = ("caption", "image", "vqa")


@dataclass(frozen=True)
class Example:
    """One training sequence of a row: its task; for vqa the pair (`qa`: index into the row's "vqa" list, -1
    for its question / answer fields); for image whether the caption is left out (`uncond`)."""

    row: int
    task: str
    qa: int = -1
    uncond: bool = False


def _text(row: Mapping[str, Any], field: str) -> str | None:
    value = read_field(row, field)
    return value if isinstance(value, str) and value.strip() else None


def qa_pairs(row: Mapping[str, Any]) -> list[tuple[int, str, str]]:
    """(qa index, question, answer) of a row: its "vqa" list, then its question / answer fields (qa -1)."""
    out = []
    vqa = read_field(row, "vqa")
    if isinstance(vqa, list):
        for j, qa in enumerate(vqa):
            q, a = (qa.get("question"), qa.get("answer")) if isinstance(qa, Mapping) else (None, None)
            if isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip():
                out.append((j, q, a))
    q, a = _text(row, "question"), _text(row, "answer")
    if q is not None and a is not None:
        out.append((-1, q, a))
    return out


def row_tasks(row: Mapping[str, Any], audio: bool) -> list[str]:
    """The tasks a row's fields allow, in TASKS order (audio_caption only when `audio`)."""
    image = read_field(row, "image") is not None
    text = _text(row, "text") is not None
    tasks = ["caption", "image"] if image and text else []
    if image and qa_pairs(row):
        tasks.append("vqa")
    if audio and text and read_field(row, "audio") is not None:
        tasks.append("audio_caption")
    return tasks


def peek_rows(dataset: Any) -> list[Mapping[str, Any] | SkippedSample]:
    """Every row of a map-style dataset as its fields, decoding no media where the source allows (a JSONL
    manifest's parsed lines, samples held in memory); other datasets are read item by item."""
    if isinstance(dataset, JsonlDataset):
        ids = dataset.ids()
        return [
            obj if isinstance(obj, dict) else SkippedSample(sid, "bad_json", obj)
            for sid, (_, obj) in zip(ids, dataset.entries)
        ]
    samples = dataset if isinstance(dataset, list) else getattr(dataset, "samples", None)
    if isinstance(samples, list):
        return samples
    if not hasattr(dataset, "__len__"):
        raise DataError(
            "a unified run reads map-style training data (data.source: synthetic or jsonl), not a stream"
        )
    return [dataset[i] for i in range(len(dataset))]


def row_examples(
    rows: Sequence[Mapping[str, Any] | SkippedSample],
    audio: bool,
    tasks: Sequence[str] | None = None,
    uncond_every: int = 10,
) -> tuple[list[Example], list[tuple[str, str]]]:
    """The examples of `rows` (see the module docstring), restricted to `tasks` (None = all), and the rows
    that give none as (id, reason)."""
    examples: list[Example] = []
    skipped: list[tuple[str, str]] = []
    captioned = 0  # image + text rows so far: every uncond_every-th gives a caption-less image example
    for i, row in enumerate(rows):
        if isinstance(row, SkippedSample):
            skipped.append((row.id, row.reason))
            continue
        allowed = row_tasks(row, audio)
        found = [t for t in allowed if tasks is None or t in tasks]
        if not found:
            lone_audio = not audio and read_field(row, "audio") is not None and _text(row, "text")
            reason = "no_audio_tokenizer" if lone_audio else "missing_modality"
            skipped.append((str(row.get("id", f"row-{i}")), reason))
            continue
        if "caption" in found:
            examples.append(Example(i, "caption"))
        if "image" in found:
            examples.append(Example(i, "image"))
            if uncond_every and captioned % uncond_every == 0:
                examples.append(Example(i, "image", uncond=True))
        captioned += "image" in allowed
        if "vqa" in found:
            examples.extend(Example(i, "vqa", qa=j) for j, _, _ in qa_pairs(row))
        if "audio_caption" in found:
            examples.append(Example(i, "audio_caption"))
    return examples, skipped


def example_fields(row: Mapping[str, Any], ex: Example) -> dict[str, Any]:
    """The row with the example's "task" and, for vqa, its "question" and "answer"."""
    out = {**row, "task": ex.task}
    if ex.task == "vqa":
        pair = next(((q, a) for j, q, a in qa_pairs(row) if j == ex.qa), None)
        if pair is None:
            raise DataError(f"row {row.get('id', ex.row)} has no question/answer pair {ex.qa}")
        out["question"], out["answer"] = pair
    if ex.uncond:
        out["text"] = None
    return out


class ExampleDataset(Dataset):
    """Item i: example i's row (read from `rows`, media decoded there) with its task fields, or the row's
    SkippedSample when the source cannot read it."""

    def __init__(self, rows: Any, examples: Sequence[Example]):
        self.rows, self.examples = rows, list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedSample:
        ex = self.examples[i]
        row = self.rows[ex.row]
        return row if isinstance(row, SkippedSample) else example_fields(row, ex)


class UnifiedCollate:
    """Rows with a "task" (an ExampleDataset's items; a row without one gets its first task) -> a Batch:

      data["ids"] (B, T) long, right-padded with <pad>; data["modality"] (B, T) (TEXT / IMAGE / AUDIO per token);
      data["loss_mask"] (B, T) bool, True = a trained target token (see mmfusion.unified.sequences)
      mask["text"] / mask["image"] / mask["audio"] (B,) bool: the sequence holds that input (a caption or
      question; image codes; audio codes)
      meta["id"], meta["task"], meta["source"] (= the task, for the Trainer's mixture logging), meta["skipped"]

    Images are resized to the image tokenizer's size and tokenized here (eval mode, CPU); so are audio clips.
    Skip reasons: the source's (corrupt_image ...), "missing_modality" (no task, or a field the task needs is
    absent or empty), "corrupt_image" / "corrupt_audio" (media the tokenizer cannot take), "too_long" (longer
    than `max_len`)."""

    def __init__(
        self,
        vocab: UnifiedVocab,
        text_tokenizer: Any,
        vqvae: VQVAE,
        audio_vqvae: VQVAE | None = None,
        audio_frontend: AudioFrontEnd | None = None,
        max_len: int | None = None,
    ):
        self.builder = SequenceBuilder(vocab, text_tokenizer)
        self.vqvae, self.audio_frontend = vqvae.eval(), audio_frontend
        self.audio_vqvae = audio_vqvae.eval() if audio_vqvae is not None else None
        self.max_len = max_len

    @property
    def vocab(self) -> UnifiedVocab:
        return self.builder.vocab

    def _codes(self, items: list[tuple[str, dict]], skipped: list) -> dict[int, torch.Tensor]:
        """VQ codes of every item's image / audio clip by item position; unreadable media are skipped."""
        out: dict[int, torch.Tensor] = {}
        size = self.vqvae.image_size
        pixels: dict[int, torch.Tensor] = {}
        spectrograms: dict[int, torch.Tensor] = {}
        for k, (sid, s) in enumerate(items):
            image = s["task"] in IMAGE_TASKS
            raw = read_field(s, "image" if image else "audio")
            if raw is None:
                skipped.append((sid, "missing_modality"))
                continue
            try:
                if image:
                    pixels[k] = preprocess_image(raw, size)
                else:
                    rate = read_field(s, "audio_sr")
                    if not rate:
                        raise DataError(f"sample {sid} has audio but no audio_sr")
                    spectrograms[k] = self.audio_frontend([raw], [int(rate)])[0]
            except (DataError, TypeError, ValueError):
                skipped.append((sid, "corrupt_image" if image else "corrupt_audio"))
        with torch.no_grad():
            if pixels:
                out.update(zip(pixels, self.vqvae.encode(torch.stack(list(pixels.values())))))
            if spectrograms:
                spec = torch.stack(list(spectrograms.values()))
                out.update(zip(spectrograms, self.audio_vqvae.encode(spec)))
        return out

    def _sequence(self, s: Mapping[str, Any], codes: torch.Tensor) -> TokenSequence:
        b, task = self.builder, s["task"]
        if task == "caption":
            return b.caption(codes, read_field(s, "text"))
        if task == "image":
            return b.image(read_field(s, "text"), codes)  # text None: the caption-less example
        if task == "vqa":
            return b.vqa(codes, read_field(s, "question"), read_field(s, "answer"))
        return b.audio_caption(codes, read_field(s, "text"))

    def __call__(self, samples: Sequence[Mapping[str, Any] | SkippedSample]) -> Batch:
        skipped: list[tuple[str, str]] = []
        items: list[tuple[str, dict]] = []
        has_audio = self.audio_vqvae is not None
        for s in samples:
            if isinstance(s, SkippedSample):
                skipped.append((s.id, s.reason))
                continue
            sid = str(s.get("id", "?"))
            task = s.get("task") or next(iter(row_tasks(s, has_audio)), None)
            if task is None or (task == "audio_caption" and not has_audio):
                skipped.append((sid, "missing_modality"))
                continue
            items.append((sid, {**s, "task": task} if task != s.get("task") else s))
        codes = self._codes(items, skipped)
        kept: list[tuple[Mapping[str, Any], TokenSequence]] = []
        for k, (sid, s) in enumerate(items):
            if k not in codes:
                continue
            try:
                seq = self._sequence(s, codes[k])
            except DataError:  # an empty caption / question / answer, or a wrong code count
                skipped.append((sid, "missing_modality"))
                continue
            if self.max_len is not None and len(seq.ids) > self.max_len:
                skipped.append((sid, "too_long"))
                continue
            kept.append((s, seq))
        if not kept:
            return Batch({}, {}, {"skipped": skipped})
        seqs = [q for _, q in kept]
        ids, mod, mask = collate(seqs, self.vocab.pad)
        present = {
            "text": torch.tensor([_text(s, "text") is not None or s["task"] == "vqa" for s, _ in kept]),
            "image": (mod == IMAGE).any(dim=1),
        }
        if has_audio:
            present["audio"] = (mod == AUDIO).any(dim=1)
        tasks = [s["task"] for s, _ in kept]
        meta = {"id": [s.get("id") for s, _ in kept], "task": tasks, "source": tasks, "skipped": skipped}
        return Batch({"ids": ids, "modality": mod, "loss_mask": mask}, present, meta)


class MixedTaskData:
    """Task-mixed, resumable step iteration over an ExampleDataset (the Trainer's TrainData; see the module
    docstring). An epoch is len(examples) // batch_size steps (draws are with replacement, so it is only a
    count). Every micro-batch carries meta["loss_norm"] = (the step's trained tokens, over all its micro-batches
    and ranks) / (world x accumulation), by which UnifiedModel divides its summed token losses: any split of a
    step into micro-batches then gives the gradient of the step's token-mean loss (only skipped rows, whose
    tokens are counted but never seen, make it differ).

    targets: trained tokens per example (TokenSequence.loss_mask.sum()), computed when the examples are made.
    Exposes `source_names` / `target_mixture(step)`, so the Trainer logs the realised (source/<task>) and the
    target (target/<task>) task mix."""

    def __init__(
        self,
        dataset: ExampleDataset,
        targets: Sequence[int],
        collate_fn: Any,
        batch_size: int,
        seed: int,
        temperature: float = 1.0,
        num_workers: int = 0,
    ):
        if len(targets) != len(dataset):
            raise DataError(f"{len(targets)} target counts for {len(dataset)} examples")
        self.dataset, self.collate, self.batch_size = dataset, collate_fn, batch_size
        self.seed, self.num_workers = seed, num_workers
        self.targets = np.asarray(targets, dtype=np.int64)
        by_task: dict[str, list[int]] = {}
        for i, ex in enumerate(dataset.examples):
            by_task.setdefault(ex.task, []).append(i)
        if not by_task:
            raise DataError("no training examples: no row has the fields of any unified task")
        self.source_names = list(by_task)
        self._indices = [np.asarray(by_task[t]) for t in self.source_names]
        self.probabilities = mixture_probabilities({t: len(by_task[t]) for t in by_task}, temperature)
        self._p = np.array([self.probabilities[t] for t in self.source_names])

    def target_mixture(self, step: int) -> dict[str, float]:
        return dict(self.probabilities)

    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def step_indices(self, step: int) -> list[int]:
        """The example indices of optimizer step `step` (counted from the start of the run)."""
        rng = np.random.default_rng((self.seed, step))
        tasks = rng.choice(len(self._p), size=self.batch_size, p=self._p)
        return [int(self._indices[t][rng.integers(len(self._indices[t]))]) for t in tasks]

    def step_batches(
        self, epoch: int, start_step: int, rank: int, world: int, accumulation: int
    ) -> Iterator[list[Batch]]:
        spe = self.steps_per_epoch()
        steps = [self.step_indices(epoch * spe + s) for s in range(start_step, spe)]
        norms = [float(self.targets[s].sum()) / (world * accumulation) for s in steps]
        index_lists = rank_micro_batches(iter(steps), self.batch_size, rank, world, accumulation)
        loader = DataLoader(
            self.dataset,
            batch_sampler=index_lists,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            # a private generator: creating the iterator must not draw from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),
        )
        group: list[Batch] = []
        for k, b in enumerate(loader):
            b.meta["loss_norm"] = norms[k // accumulation]
            group.append(b)
            if len(group) == accumulation:
                yield group
                group = []


__all__ = [
    "Example",
    "ExampleDataset",
    "MixedTaskData",
    "UnifiedCollate",
    "example_fields",
    "peek_rows",
    "qa_pairs",
    "row_examples",
    "row_tasks",
]
