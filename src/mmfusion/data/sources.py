"""Multimodal sample sources: JSONL manifests and WebDataset shards, for reading and writing.

A sample is a dict with optional keys "id", "text", "image" ((H, W, 3) uint8), "audio" (float32 mono in
[-1, 1]) + "audio_sr", "video" ((T, H, W, 3) uint8), "scene", "scene_key", "vqa", "video_text" and "meta".

JSONL manifest
--------------
One JSON object per line; blank lines are ignored. Media paths are relative to the manifest's folder::

    {"id": "cat-1", "image": "img/cat.png", "text": "a cat on a mat", "audio": "wav/cat.flac",
     "video": "vid/cat.npy", "scene": {...}, "scene_key": "...", "video_text": "...",
     "vqa": [{"question": "what animal?", "answer": "cat"}], "source": "web"}

- ``image``: any file Pillow reads; any mode (grayscale, RGBA, palette, 16-bit) becomes (H, W, 3) uint8,
  the size is kept (resizing happens in the image modality).
- ``audio``: WAV / FLAC / OGG; channels are averaged to mono float32, ``audio_sr`` is the file's rate.
- ``video``: a ``.npy`` file with a (T, H, W, 3) uint8 array, or a folder of frame images (sorted by name).
- ``text``, ``scene_key``, ``video_text``: strings; ``scene``: an object; ``vqa``: a list of
  {"question": str, "answer": str}; ``id``: a string (default "<manifest stem>-<line number>").
- A ``null`` value counts as absent. Any other field is kept in ``sample["meta"]``.

WebDataset shards
-----------------
Plain ``.tar`` files; the members of a sample share a key: ``<key>.txt`` (text), ``<key>.png|jpg|jpeg|webp``
(image), ``<key>.wav|flac|ogg`` (audio), ``<key>.npy`` (video, as above) and ``<key>.json`` (id, scene,
scene_key, vqa, video_text, text if there is no .txt; other fields go to meta).

Bad samples
-----------
With ``on_error="skip"`` an unreadable sample comes back as ``SkippedSample(id, reason, detail)``, reason one
of REASONS ("corrupt_shard" / "missing_file" with the shard as id for a tar that cannot be read); with
``on_error="fail"`` a DataError names the manifest and line (or shard and key), the field and the problem.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, IterableDataset
from webdataset.utils import pytorch_worker_info

from ..errors import ConfigError, DataError
from ..modalities import MODALITIES, MediaError
from ..modalities.audio import AUDIO_EXTS
from ..modalities.image import IMAGE_EXTS
from .shards import (  # noqa: F401 - count_samples, shard_list, shard_samples, truncation: re-exported
    buffer_shuffle,
    count_samples,
    count_shard,
    is_remote,
    shard_list,
    shard_samples,
    truncation,
)

FIELDS = (
    "image",
    "text",
    "audio",
    "video",
    "vqa",
)  # the built-in fields a source reads (media / typed values)


def readable_fields() -> tuple[str, ...]:
    """The fields a source reads: text, vqa and every modality with a media decoder (MODALITIES, including
    modalities added with register_modality), in that order."""
    media = [m for m, spec in MODALITIES.items() if spec.decode is not None]
    return ("image", "text", "audio", "video", "vqa", *[m for m in media if m not in FIELDS])


REASONS = (
    "bad_json",
    "wrong_field_type",
    "missing_file",
    "corrupt_image",
    "corrupt_audio",
    "corrupt_video",
    "missing_modality",
    "corrupt_shard",
)
_FIELDS = ("id", "text", "image", "audio", "video", "scene", "scene_key", "vqa", "video_text")
RESERVED = {*_FIELDS, "audio_sr", "meta"}


@dataclass(frozen=True)
class SkippedSample:
    """A sample that could not be read: its id, a short reason code (one of REASONS) and a readable detail."""

    id: str
    reason: str
    detail: str


class SampleProblem(Exception):
    """One sample is unreadable: a reason code (REASONS), the field (or None) and the problem; readers turn it
    into a SkippedSample or, with on_error="fail", a DataError naming where."""

    def __init__(self, reason: str, field: str | None, problem: str):
        super().__init__(problem)
        self.reason, self.field, self.problem = reason, field, problem

    def message(self, where: str) -> str:
        return f"{where}: field '{self.field}': {self.problem}" if self.field else f"{where}: {self.problem}"


def _jtype(v: Any) -> str:
    names = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
    return names.get(type(v), type(v).__name__)


def _typed(obj: dict, key: str, kind: type) -> Any:
    v = obj[key]
    if not isinstance(v, kind):
        raise SampleProblem("wrong_field_type", key, f"expected {_jtype(kind())}, got {_jtype(v)}")
    return v


def vqa_field(obj: dict) -> list:
    vqa = _typed(obj, "vqa", list)
    if not all(
        isinstance(q, dict) and isinstance(q.get("question"), str) and isinstance(q.get("answer"), str)
        for q in vqa
    ):
        raise SampleProblem(
            "wrong_field_type", "vqa", 'expected a list of {"question": string, "answer": string}'
        )
    return vqa


def annotation_fields(obj: dict) -> dict[str, Any]:
    """The annotation fields (id, scene, scene_key, video_text) and meta of a JSON object, type-checked."""
    out: dict[str, Any] = {}
    for key, kind in (("id", str), ("scene", dict), ("scene_key", str), ("video_text", str)):
        if obj.get(key) is not None:
            out[key] = _typed(obj, key, kind)
    meta = {k: v for k, v in obj.items() if k not in _FIELDS and k not in MODALITIES}
    if meta:
        out["meta"] = meta
    return out


def _decode(kind: str, src: Any, field: str) -> Any:
    """The modality's one decoder (mmfusion.modalities), its MediaError as this sample's SampleProblem."""
    try:
        return MODALITIES[kind].decode(src)
    except MediaError as e:
        raise SampleProblem(e.reason, field, e.problem) from None


def _store(sample: dict[str, Any], field: str, value: Any) -> None:
    """Put a decoded value into a sample: a (wave, rate) pair becomes `field` + `field_sr` (audio)."""
    if isinstance(value, tuple):
        sample[field], sample[f"{field}_sr"] = value
    else:
        sample[field] = value


def _check_args(modalities: Sequence[str] | None, on_error: str) -> tuple[str, ...] | None:
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"on_error={on_error!r}: expected 'skip' or 'fail'")
    if modalities is None:
        return None
    mods = (modalities,) if isinstance(modalities, str) else tuple(modalities)
    bad = [m for m in mods if m not in readable_fields()]
    if bad:
        raise ConfigError(f"unknown modalities {bad}; expected a subset of {list(readable_fields())}")
    return mods


class _Reader:
    on_error: str

    def _bad(self, sid: str, bad: SampleProblem, where: str) -> SkippedSample:
        msg = bad.message(where)
        if self.on_error == "fail":
            raise DataError(msg)
        return SkippedSample(sid, bad.reason, msg)


class JsonlDataset(_Reader, Dataset):
    """Map-style dataset over a JSONL manifest: item i is a sample dict or a SkippedSample.

    The manifest is parsed at construction (no media decoding); media of the requested modalities
    (None = all present in the line) are decoded in __getitem__. `require`: a requested modality a line lacks
    makes it a SkippedSample ("missing_modality"); with False the sample simply lacks it (a fusion model
    masks it).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        modalities: Sequence[str] | None = None,
        on_error: str = "skip",
        require: bool = True,
    ):
        self.modalities = _check_args(modalities, on_error)
        self.on_error, self.require = on_error, require
        self.path, self.name = Path(path), str(path)
        if not self.path.is_file():
            raise DataError(
                f"JSONL manifest {self.name} not found" + (" (it is a folder)" if self.path.is_dir() else "")
            )
        self.root = self.path.parent
        self.entries: list[tuple[int, dict | str]] = []  # (line number, object or JSON error text)
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
                    if not isinstance(obj, dict):
                        raise ValueError(f"expected a JSON object, got {_jtype(obj)}")
                except ValueError as e:  # includes JSONDecodeError and UnicodeDecodeError
                    if on_error == "fail":
                        raise DataError(f"{self.name} line {n}: invalid JSON: {e}") from None
                    obj = f"invalid JSON: {e}"
                self.entries.append((n, obj))

    def __len__(self) -> int:
        return len(self.entries)

    def ids(self) -> list[str]:
        """The id of every entry (as __getitem__ would give it), without decoding media."""
        return [
            o["id"] if isinstance(o, dict) and isinstance(o.get("id"), str) else f"{self.path.stem}-{n}"
            for n, o in self.entries
        ]

    def texts(self) -> list[str]:
        """Every caption in the manifest, without decoding media."""
        return [o["text"] for _, o in self.entries if isinstance(o, dict) and isinstance(o.get("text"), str)]

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedSample:
        n, obj = self.entries[i]
        where, sid = f"{self.name} line {n}", f"{self.path.stem}-{n}"
        if isinstance(obj, str):
            return self._bad(sid, SampleProblem("bad_json", None, obj), where)
        if isinstance(obj.get("id"), str):
            sid = obj["id"]
        try:
            return self._read(obj, f"{self.path.stem}-{n}")
        except SampleProblem as b:
            return self._bad(sid, b, where)

    def _file(self, obj: dict, key: str) -> tuple[Path, str]:
        rel = _typed(obj, key, str)
        path = self.root / rel
        if not path.exists():
            raise SampleProblem("missing_file", key, f"file {rel} not found")
        return path, rel

    def _read(self, obj: dict, default_id: str) -> dict[str, Any]:
        sample = {"id": default_id, **annotation_fields(obj)}
        for m in self.modalities or [m for m in readable_fields() if obj.get(m) is not None]:
            if obj.get(m) is None:
                if self.require:
                    raise SampleProblem("missing_modality", m, "requested modality is absent")
                continue
            if m == "text":
                sample["text"] = _typed(obj, "text", str)
            elif m == "vqa":
                sample["vqa"] = vqa_field(obj)
            else:
                _store(sample, m, _decode(m, self._file(obj, m)[0], m))
        return sample


def _pick(raw: dict, exts: Sequence[str]) -> bytes | None:
    return next((raw[e] for e in exts if e in raw), None)


class WebDatasetSource(_Reader, IterableDataset):
    """Streams sample dicts (or SkippedSample) from WebDataset tar shards; no __len__ (see count_samples).

    Splitting (rank / world from RANK + WORLD_SIZE or torch.distributed, workers from the DataLoader):
    whole shards go to ranks when that gives every rank the same number of samples (+-1, from tar headers),
    otherwise every rank reads all shards and keeps every world-th sample; within a rank, shards go to
    DataLoader workers (every k-th sample when there are fewer shards than workers). shuffle > 0 permutes
    the shard order per epoch (the same on every rank) and shuffles samples in a buffer of that size; call
    set_epoch(e) before each epoch. ``keep(url, key)``, when given, drops the samples it rejects before
    decoding and before the split (so the split stays exactly-once and the per-rank balance counts only
    kept samples); it must be picklable for DataLoader workers (a module-level class, not a lambda).
    """

    def __init__(
        self,
        urls,
        modalities: Sequence[str] | None = None,
        on_error: str = "skip",
        shuffle: int = 0,
        seed: int = 0,
        keep: Callable[[str, str], bool] | None = None,
        require: bool = True,
    ):
        self.modalities = _check_args(modalities, on_error)
        self.on_error, self.shuffle, self.seed, self.epoch = on_error, int(shuffle), int(seed), 0
        self.require = require
        self.keep = keep
        self.urls = shard_list(urls)
        self._sizes: dict[str, int] | None = None
        if pytorch_worker_info()[1] > 1:
            self.shard_sizes()  # once here rather than in every DataLoader worker

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard_sizes(self) -> dict[str, int] | None:
        """Samples per shard from tar headers (cached); None when a shard is remote."""
        if self._sizes is None and not any(map(is_remote, self.urls)):
            self._sizes = {url: count_shard(url, self.keep) for url in self.urls}
        return self._sizes

    def texts(self) -> Iterator[str]:
        """Every caption (.txt member) of every shard (that `keep` accepts), without decoding media."""
        for url in self.urls:
            try:
                for raw in shard_samples(url, lambda f: f.endswith(".txt")):
                    if "txt" in raw and (self.keep is None or self.keep(url, raw["__key__"])):
                        yield raw["txt"].decode("utf-8", errors="replace")
            except Exception:  # unreadable shards are reported when the samples are read
                continue

    def _balanced(self, shards: list[str], world: int) -> bool:
        """Whether whole shards dealt round-robin to ranks give each the same number of samples (+-1)."""
        sizes = self.shard_sizes() if len(shards) % world == 0 else None
        if sizes is None:
            return False
        per_rank = [sum(sizes[u] for u in shards[r::world]) for r in range(world)]
        return max(per_rank) - min(per_rank) <= 1

    def __iter__(self) -> Iterator[dict[str, Any] | SkippedSample]:
        rank, world, worker, workers = pytorch_worker_info()
        shards = list(self.urls)
        if self.shuffle > 0:
            random.Random(f"shards-{self.seed}-{self.epoch}").shuffle(shards)
        if world > 1 and not self._balanced(shards, world):
            items = self._items(shards, world * workers, worker * world + rank)
        else:
            shards = shards[rank::world]
            plan = (shards[worker::workers], 1, 0) if len(shards) >= workers else (shards, workers, worker)
            items = self._items(*plan)
        if self.shuffle > 1:
            items = buffer_shuffle(
                items, self.shuffle, random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}")
            )
        return items

    def _items(self, shards: list[str], stride: int, offset: int) -> Iterator[dict[str, Any] | SkippedSample]:
        k = 0
        for url in shards:
            for raw in self._raw(url):
                if self.keep is not None and isinstance(raw, dict) and not self.keep(url, raw["__key__"]):
                    continue
                if k % stride == offset:
                    yield raw if isinstance(raw, SkippedSample) else self._decode(raw)
                k += 1

    def _raw(self, url: str) -> Iterator[dict | SkippedSample]:
        try:
            yield from shard_samples(url)
            problem = truncation(url) if url.endswith(".tar") and not is_remote(url) else None
            bad = SampleProblem("corrupt_shard", None, problem) if problem else None
        except Exception as e:
            reason = "missing_file" if isinstance(e, FileNotFoundError) else "corrupt_shard"
            detail = f"{type(e).__name__}: {str(e.args[0]).split(' @ ')[0] if e.args else ''}"
            bad = SampleProblem(reason, None, f"cannot read shard: {detail}")
        if bad is not None:
            yield self._bad(url, bad, url)

    def _decode(self, raw: dict) -> dict[str, Any] | SkippedSample:
        key = raw["__key__"]
        where, sid = f"{raw['__url__']} key {key}", key
        try:
            obj: dict = {}
            if "json" in raw:
                try:
                    obj = json.loads(raw["json"].decode("utf-8"))
                except ValueError as e:
                    raise SampleProblem("bad_json", "json", f"invalid JSON: {e}") from None
                if not isinstance(obj, dict):
                    raise SampleProblem("bad_json", "json", f"expected a JSON object, got {_jtype(obj)}")
                sid = obj["id"] if isinstance(obj.get("id"), str) else key
            return self._read(raw, obj)
        except SampleProblem as b:
            return self._bad(sid, b, where)

    def _read(self, raw: dict, obj: dict) -> dict[str, Any]:
        sample = {"id": raw["__key__"], **annotation_fields(obj)}
        members = {
            m: _pick(raw, spec.extensions)
            for m, spec in MODALITIES.items()
            if spec.decode is not None and spec.extensions
        }
        present = {m for m, v in members.items() if v is not None}
        present |= {m for m in ("text", "vqa") if obj.get(m) is not None} | (
            {"text"} if "txt" in raw else set()
        )
        for m in self.modalities or [m for m in readable_fields() if m in present]:
            if m not in present:
                if self.require:
                    raise SampleProblem("missing_modality", m, "requested modality is absent")
                continue
            if m == "text" and "txt" in raw:
                try:
                    sample["text"] = raw["txt"].decode("utf-8")
                except UnicodeDecodeError as e:
                    raise SampleProblem("wrong_field_type", "text", f"not UTF-8 text: {e}") from None
            elif m == "text":
                sample["text"] = _typed(obj, "text", str)
            elif m == "vqa":
                sample["vqa"] = vqa_field(obj)
            else:
                _store(sample, m, _decode(m, members[m], m))
        return sample


def open_source(
    kind: str,
    path: str | os.PathLike,
    modalities: Sequence[str] | None = None,
    on_error: str = "skip",
    require: bool = True,
) -> JsonlDataset | WebDatasetSource:
    """A JsonlDataset ("jsonl": path to the manifest) or a WebDatasetSource ("webdataset": a tar, a brace
    pattern or a folder of tars)."""
    if kind == "jsonl":
        return JsonlDataset(path, modalities=modalities, on_error=on_error, require=require)
    if kind == "webdataset":
        return WebDatasetSource(path, modalities=modalities, on_error=on_error, require=require)
    raise ConfigError(f"unknown data source kind {kind!r}; expected 'jsonl' or 'webdataset'")


__all__ = [
    "AUDIO_EXTS",
    "IMAGE_EXTS",
    "FIELDS",
    "readable_fields",
    "REASONS",
    "JsonlDataset",
    "SkippedSample",
    "WebDatasetSource",
    "count_samples",
    "open_source",
    "shard_list",
    "RESERVED",
    "SampleProblem",
    "annotation_fields",
    "shard_samples",
    "truncation",
    "vqa_field",
]
