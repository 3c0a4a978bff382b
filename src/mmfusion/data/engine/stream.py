"""Streaming training data from WebDataset shards: lazy reads, shuffle buffers, exactly-once splitting over
DDP ranks x DataLoader workers, a validation hold-out stratified by modality combination (D8), augmentation.

Guarantees (tested in tests/data/engine/test_stream.py):

* **Exactly once per epoch.** Every sample of the split is delivered once across all ranks and workers. The
  split is `WebDatasetSource`'s: whole shards go to ranks when that leaves every rank the same number of
  samples (+-1, counted from tar headers, after the hold-out filter); otherwise (e.g. 5 shards on 2 ranks,
  or uneven shard sizes) every rank reads every shard and keeps every (world x workers)-th sample
  (*sample-level striding*: no padding, no repeats, per-rank counts differ by at most one; the price is
  that each rank reads all bytes and decodes only its own samples). Within a rank, shards go to workers.
* **Deterministic per (seed, epoch).** The shard order, the shuffle buffers and the augmentation draws are
  functions of (seed, epoch, rank, worker) or (seed, epoch, sample id) only; call `set_epoch(e)`.
* **Validation covers every combination.** `stratified_holdout` puts round(fraction x n) samples (at least
  `min_per_combination`) of every modality combination in validation, by a seeded hash of the sample id;
  a combination with a single sample goes to validation only (listed in `HoldoutSplit.singletons`).
* **No augmentation in validation.** The "val" split never shuffles and never augments.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from torch.utils.data import IterableDataset
from webdataset.tariterators import base_plus_ext

from ...errors import ConfigError, DataError
from ..sources import AUDIO_EXTS, IMAGE_EXTS, SkippedSample, WebDatasetSource, shard_list
from .augment import AugmentConfig, Augmenter

SPLITS = ("all", "train", "val")


@dataclass(frozen=True)
class IndexEntry:
    """One sample of a shard (from its tar headers and .json member): shard name, key, id, combination."""

    shard: str
    key: str
    id: str
    combination: str


def combination_of(modalities: Iterable[str]) -> str:
    """The canonical name of a modality combination: sorted, '+'-joined ('image+text')."""
    return "+".join(sorted(set(modalities))) or "none"


def sample_combination(sample: dict[str, Any]) -> str:
    """The combination of a decoded sample dict (its non-None image/text/audio/video/vqa fields)."""
    return combination_of(m for m in ("image", "text", "audio", "video", "vqa") if sample.get(m) is not None)


def _member_modalities(exts: set[str], meta: dict[str, Any]) -> set[str]:
    mods = set()
    if exts & set(IMAGE_EXTS):
        mods.add("image")
    if exts & set(AUDIO_EXTS):
        mods.add("audio")
    if "npy" in exts:
        mods.add("video")
    if "txt" in exts or isinstance(meta.get("text"), str):
        mods.add("text")
    if isinstance(meta.get("vqa"), list):
        mods.add("vqa")
    return mods


def scan_shards(urls) -> list[IndexEntry]:
    """Index local shards without decoding media: tar headers give the members, the small .json member the
    id and the text/vqa fields. Raises DataError naming a shard that cannot be read."""
    out: list[IndexEntry] = []
    for url in shard_list(urls):
        name = os.path.basename(url)
        try:
            with tarfile.open(url, "r:*") as tf:
                groups: dict[str, tuple[set[str], dict[str, Any]]] = {}
                for m in tf:
                    if not m.isreg() or m.name.startswith("__"):
                        continue
                    key, ext = base_plus_ext(m.name)
                    if key is None:
                        continue
                    exts, meta = groups.setdefault(key, (set(), {}))
                    exts.add(ext.lower())
                    if ext.lower() == "json":
                        try:
                            obj = json.loads(tf.extractfile(m).read().decode("utf-8"))
                            meta.update(obj if isinstance(obj, dict) else {})
                        except ValueError:
                            pass  # the reader reports bad JSON when the sample is decoded
        except (OSError, tarfile.TarError) as e:
            raise DataError(f"cannot index shard {url}: {e}") from None
        for key, (exts, meta) in groups.items():
            sid = meta["id"] if isinstance(meta.get("id"), str) else key
            out.append(IndexEntry(name, key, sid, combination_of(_member_modalities(exts, meta))))
    return out


def _rank_hash(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}|{text}".encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class HoldoutSplit:
    """A validation hold-out: the (shard file name, key) pairs in validation, and counts per combination."""

    val: frozenset[tuple[str, str]]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # combination -> {"train": n, "val": n}
    singletons: tuple[str, ...] = ()

    def table(self) -> str:
        """A small text table: combination, train, val."""
        rows = [f"{'combination':<32} {'train':>7} {'val':>6}"]
        rows += [f"{c:<32} {v['train']:>7} {v['val']:>6}" for c, v in sorted(self.counts.items())]
        return "\n".join(rows)


def stratified_holdout(
    index: Sequence[IndexEntry], fraction: float = 0.1, seed: int = 0, min_per_combination: int = 1
) -> HoldoutSplit:
    """Hold out max(min_per_combination, round(fraction x n)) samples of every combination (at most n - 1,
    except a combination of one sample, which goes to validation), chosen by a seeded hash of the sample id:
    stable when samples are added or shards re-cut."""
    if not 0 < fraction < 1:
        raise ConfigError(f"val_fraction = {fraction}: expected a number in (0, 1)")
    if min_per_combination < 1:
        raise ConfigError(f"min_per_combination = {min_per_combination}: expected >= 1")
    by_combo: dict[str, list[IndexEntry]] = defaultdict(list)
    for e in index:
        by_combo[e.combination].append(e)
    val: set[tuple[str, str]] = set()
    counts: dict[str, dict[str, int]] = {}
    singletons = []
    for combo, entries in sorted(by_combo.items()):
        n = len(entries)
        k = 1 if n == 1 else min(n - 1, max(min_per_combination, round(fraction * n)))
        if n == 1:
            singletons.append(combo)
        chosen = sorted(entries, key=lambda e: (_rank_hash(seed, e.id), e.shard, e.key))[:k]
        val.update((e.shard, e.key) for e in chosen)
        counts[combo] = {"train": n - k, "val": k}
    return HoldoutSplit(frozenset(val), counts, tuple(singletons))


class _KeepSplit:
    """Picklable keep(url, key) filter for WebDatasetSource: in / not in the hold-out."""

    def __init__(self, val: frozenset[tuple[str, str]], want_val: bool):
        self.val, self.want_val = val, want_val

    def __call__(self, url: str, key: str) -> bool:
        return ((os.path.basename(url), key) in self.val) == self.want_val


def sample_rng(seed: int, epoch: int, sample_id: str) -> np.random.Generator:
    """The augmentation generator of one sample in one epoch (independent of ranks, workers and order)."""
    return np.random.default_rng([seed, epoch, _rank_hash(seed, sample_id)])


class StreamingDataset(IterableDataset):
    """Sample dicts streamed from WebDataset shards, for `DataLoader` / `StreamData` (see the module doc).

    split: "all" (every sample), "train" or "val" (the stratified hold-out, computed from the shards' headers
    unless `holdout` is given; build it once and pass it to both splits to avoid a second scan).
    shuffle: the shuffle-buffer size (0 = shard order); forced to 0 for "val". augment: an AugmentConfig (or
    dict) applied to "train" / "all" samples only.
    """

    def __init__(
        self,
        urls,
        split: Literal["all", "train", "val"] = "all",
        val_fraction: float = 0.1,
        holdout: HoldoutSplit | None = None,
        modalities: Sequence[str] | None = None,
        on_error: str = "skip",
        shuffle: int = 1000,
        seed: int = 0,
        augment: AugmentConfig | dict | None = None,
        require: bool = True,
    ):
        if split not in SPLITS:
            raise ConfigError(f"split = {split!r}: expected one of {', '.join(SPLITS)}")
        if shuffle < 0:
            raise ConfigError(f"shuffle = {shuffle}: expected a buffer size >= 0")
        self.urls = shard_list(urls)
        self.split, self.seed, self.epoch = split, int(seed), 0
        keep = None
        if split != "all":
            names = Counter(os.path.basename(u) for u in self.urls)
            clash = sorted(n for n, c in names.items() if c > 1)
            if clash:
                raise DataError(
                    f"split={split!r} identifies samples by shard file name + key, but {clash} occur in more "
                    "than one folder: give the shards distinct names"
                )
            if holdout is None:
                holdout = stratified_holdout(scan_shards(self.urls), val_fraction, seed)
            keep = _KeepSplit(holdout.val, split == "val")
        self.holdout = holdout
        train = split != "val"
        self.augmenter = Augmenter(augment, train=train)
        self.source = WebDatasetSource(
            self.urls,
            modalities,
            on_error,
            shuffle=shuffle if train else 0,
            seed=seed,
            keep=keep,
            require=require,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.source.set_epoch(epoch)

    def num_samples(self) -> int:
        """Samples in this split (from tar headers; local shards only)."""
        sizes = self.source.shard_sizes()
        if sizes is None:
            raise DataError("num_samples needs local shards (remote URLs cannot be counted from headers)")
        return sum(sizes.values())

    def texts(self) -> Iterator[str]:
        """Every caption of this split, without decoding media (for tokenizer training)."""
        return self.source.texts()

    def __iter__(self) -> Iterator[dict[str, Any] | SkippedSample]:
        for s in self.source:
            if isinstance(s, dict) and self.augmenter.active:  # a generator costs ~0.1 ms: only when needed
                s = self.augmenter(s, sample_rng(self.seed, self.epoch, str(s.get("id"))))
            yield s


def combination_counts(index: Iterable[IndexEntry]) -> Counter[str]:
    """Samples per modality combination."""
    return Counter(e.combination for e in index)


__all__ = [
    "HoldoutSplit",
    "IndexEntry",
    "StreamingDataset",
    "combination_counts",
    "combination_of",
    "sample_combination",
    "sample_rng",
    "scan_shards",
    "stratified_holdout",
]
