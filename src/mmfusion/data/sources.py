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

import io
import json
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander
from webdataset.utils import pytorch_worker_info

from ..errors import ConfigError, DataError
from ..modalities.image import to_rgb_array

MODALITIES = ("image", "text", "audio", "video", "vqa")
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
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTS = ("wav", "flac", "ogg")
_FIELDS = ("id", "text", "image", "audio", "video", "scene", "scene_key", "vqa", "video_text")
_RESERVED = {*_FIELDS, "audio_sr", "meta"}


@dataclass(frozen=True)
class SkippedSample:
    """A sample that could not be read: its id, a short reason code (one of REASONS) and a readable detail."""

    id: str
    reason: str
    detail: str


class _Bad(Exception):
    """Internal: one sample is unreadable (reason code, field or None, problem)."""

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
        raise _Bad("wrong_field_type", key, f"expected {_jtype(kind())}, got {_jtype(v)}")
    return v


def _vqa(obj: dict) -> list:
    vqa = _typed(obj, "vqa", list)
    if not all(
        isinstance(q, dict) and isinstance(q.get("question"), str) and isinstance(q.get("answer"), str)
        for q in vqa
    ):
        raise _Bad("wrong_field_type", "vqa", 'expected a list of {"question": string, "answer": string}')
    return vqa


def _common(obj: dict) -> dict[str, Any]:
    """The annotation fields (id, scene, scene_key, video_text) and meta of a JSON object, type-checked."""
    out: dict[str, Any] = {}
    for key, kind in (("id", str), ("scene", dict), ("scene_key", str), ("video_text", str)):
        if obj.get(key) is not None:
            out[key] = _typed(obj, key, kind)
    meta = {k: v for k, v in obj.items() if k not in _FIELDS}
    if meta:
        out["meta"] = meta
    return out


def _decode_image(src: Any, field: str = "image") -> np.ndarray:
    """Path or file object -> (H, W, 3) uint8 (fully decoded, EXIF orientation applied)."""
    try:
        with Image.open(src) as img:
            img.load()
            return to_rgb_array(ImageOps.exif_transpose(img))
    except Exception as e:
        raise _Bad("corrupt_image", field, f"cannot decode image: {e}") from e


def _decode_audio(src: Any, field: str = "audio") -> tuple[np.ndarray, int]:
    """Path or file object -> (float32 mono samples in [-1, 1], sample rate)."""
    try:
        data, sr = sf.read(src, dtype="float32", always_2d=True)
    except Exception as e:
        raise _Bad("corrupt_audio", field, f"cannot decode audio: {e}") from e
    if data.shape[0] == 0 or not np.isfinite(data).all():
        raise _Bad("corrupt_audio", field, "audio is empty or has NaN/infinite values")
    return np.clip(data.mean(axis=1, dtype=np.float32), -1.0, 1.0), int(sr)


def _check_video(arr: Any, field: str = "video") -> np.ndarray:
    if not (
        isinstance(arr, np.ndarray)
        and arr.dtype == np.uint8
        and arr.ndim == 4
        and arr.shape[-1] == 3
        and arr.shape[0] > 0
    ):
        got = f"shape {arr.shape}, dtype {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise _Bad("corrupt_video", field, f"expected a (T, H, W, 3) uint8 array, got {got}")
    return arr


def _decode_npy(src: Any, field: str = "video") -> np.ndarray:
    try:
        arr = np.load(src, allow_pickle=False)
    except Exception as e:
        raise _Bad("corrupt_video", field, f"cannot load array: {e}") from e
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
    return _check_video(arr, field)


def _decode_frames(folder: Path, rel: str, field: str = "video") -> np.ndarray:
    """A folder of frame images (sorted by name) -> (T, H, W, 3) uint8."""
    exts = Image.registered_extensions()
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts and p.name[0] != "."
    )
    if not files:
        raise _Bad("corrupt_video", field, f"folder {rel} has no frame images")
    frames = []
    for p in files:
        try:
            frames.append(_decode_image(p, field))
        except _Bad as b:
            raise _Bad("corrupt_video", field, f"frame {rel}/{p.name}: {b.problem}") from None
    if len({f.shape for f in frames}) > 1:
        raise _Bad("corrupt_video", field, f"frames in {rel} differ in size")
    return np.stack(frames)


def _check_args(modalities: Sequence[str] | None, on_error: str) -> tuple[str, ...] | None:
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"on_error={on_error!r}: expected 'skip' or 'fail'")
    if modalities is None:
        return None
    mods = (modalities,) if isinstance(modalities, str) else tuple(modalities)
    bad = [m for m in mods if m not in MODALITIES]
    if bad:
        raise ConfigError(f"unknown modalities {bad}; expected a subset of {list(MODALITIES)}")
    return mods


class _Reader:
    on_error: str

    def _bad(self, sid: str, bad: _Bad, where: str) -> SkippedSample:
        msg = bad.message(where)
        if self.on_error == "fail":
            raise DataError(msg)
        return SkippedSample(sid, bad.reason, msg)


class JsonlDataset(_Reader, Dataset):
    """Map-style dataset over a JSONL manifest: item i is a sample dict or a SkippedSample.

    The manifest is parsed at construction (no media decoding); media of the requested modalities
    (None = all present in the line) are decoded in __getitem__.
    """

    def __init__(
        self, path: str | os.PathLike, modalities: Sequence[str] | None = None, on_error: str = "skip"
    ):
        self.modalities = _check_args(modalities, on_error)
        self.on_error = on_error
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
            return self._bad(sid, _Bad("bad_json", None, obj), where)
        if isinstance(obj.get("id"), str):
            sid = obj["id"]
        try:
            return self._read(obj, f"{self.path.stem}-{n}")
        except _Bad as b:
            return self._bad(sid, b, where)

    def _file(self, obj: dict, key: str) -> tuple[Path, str]:
        rel = _typed(obj, key, str)
        path = self.root / rel
        if not path.exists():
            raise _Bad("missing_file", key, f"file {rel} not found")
        return path, rel

    def _read(self, obj: dict, default_id: str) -> dict[str, Any]:
        sample = {"id": default_id, **_common(obj)}
        for m in self.modalities or [m for m in MODALITIES if obj.get(m) is not None]:
            if obj.get(m) is None:
                raise _Bad("missing_modality", m, "requested modality is absent")
            if m == "text":
                sample["text"] = _typed(obj, "text", str)
            elif m == "vqa":
                sample["vqa"] = _vqa(obj)
            elif m == "image":
                sample["image"] = _decode_image(self._file(obj, m)[0])
            elif m == "audio":
                sample["audio"], sample["audio_sr"] = _decode_audio(self._file(obj, m)[0])
            else:
                path, rel = self._file(obj, m)
                sample["video"] = _decode_frames(path, rel) if path.is_dir() else _decode_npy(path)
        return sample


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def shard_list(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand a brace pattern ("train-{000000..000003}.tar"), a tar, a folder of tars or a list of them.

    Local shards must exist (DataError naming the missing one); remote URLs ("s3://", "pipe:") pass unchecked.
    """
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in map(str, items):
        if _is_remote(item):
            out += expand_urls(item)
        elif Path(item).is_dir():
            tars = sorted(str(p) for p in Path(item).glob("*.tar"))
            if not tars:
                raise DataError(f"WebDataset folder {item} has no .tar shards")
            out += tars
        else:
            for url in expand_urls(item):
                if not Path(url).is_file():
                    raise DataError(
                        f"WebDataset shard {url} not found" + (f" (from {item})" if url != item else "")
                    )
                out.append(url)
    if not out:
        raise DataError("no WebDataset shards given")
    return out


def _buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _shard_samples(url: str, select_files=None) -> Iterator[dict]:
    """Raw samples ({"__key__", "__url__", ext: bytes}) of one shard, grouped by webdataset's tar iterators;
    the file is closed when the generator ends."""
    stream = wds.gopen(url, "rb")
    try:
        yield from group_by_keys(
            tar_file_expander([{"url": url, "stream": stream}], select_files=select_files)
        )
    finally:
        stream.close()


def _truncation(path: str) -> str | None:
    """Why a local .tar looks truncated (Python's tarfile silently stops at a cut header), or None."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - 1024, 0))
        tail = f.read()
    if size % 512 or len(tail) < 1024 or tail.strip(b"\0"):
        return f"truncated: {size} bytes and no end-of-archive blocks"
    return None


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
    ):
        self.modalities = _check_args(modalities, on_error)
        self.on_error, self.shuffle, self.seed, self.epoch = on_error, int(shuffle), int(seed), 0
        self.keep = keep
        self.urls = shard_list(urls)
        self._sizes: dict[str, int] | None = None
        if pytorch_worker_info()[1] > 1:
            self.shard_sizes()  # once here rather than in every DataLoader worker

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard_sizes(self) -> dict[str, int] | None:
        """Samples per shard from tar headers (cached); None when a shard is remote."""
        if self._sizes is None and not any(map(_is_remote, self.urls)):
            self._sizes = {url: _count_shard(url, self.keep) for url in self.urls}
        return self._sizes

    def texts(self) -> Iterator[str]:
        """Every caption (.txt member) of every shard (that `keep` accepts), without decoding media."""
        for url in self.urls:
            try:
                for raw in _shard_samples(url, lambda f: f.endswith(".txt")):
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
            items = _buffer_shuffle(
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
            yield from _shard_samples(url)
            problem = _truncation(url) if url.endswith(".tar") and not _is_remote(url) else None
            bad = _Bad("corrupt_shard", None, problem) if problem else None
        except Exception as e:
            reason = "missing_file" if isinstance(e, FileNotFoundError) else "corrupt_shard"
            detail = f"{type(e).__name__}: {str(e.args[0]).split(' @ ')[0] if e.args else ''}"
            bad = _Bad(reason, None, f"cannot read shard: {detail}")
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
                    raise _Bad("bad_json", "json", f"invalid JSON: {e}") from None
                if not isinstance(obj, dict):
                    raise _Bad("bad_json", "json", f"expected a JSON object, got {_jtype(obj)}")
                sid = obj["id"] if isinstance(obj.get("id"), str) else key
            return self._read(raw, obj)
        except _Bad as b:
            return self._bad(sid, b, where)

    def _read(self, raw: dict, obj: dict) -> dict[str, Any]:
        sample = {"id": raw["__key__"], **_common(obj)}
        members = {"image": _pick(raw, IMAGE_EXTS), "audio": _pick(raw, AUDIO_EXTS), "video": raw.get("npy")}
        present = {m for m, v in members.items() if v is not None}
        present |= {m for m in ("text", "vqa") if obj.get(m) is not None} | (
            {"text"} if "txt" in raw else set()
        )
        for m in self.modalities or [m for m in MODALITIES if m in present]:
            if m not in present:
                raise _Bad("missing_modality", m, "requested modality is absent")
            if m == "text" and "txt" in raw:
                try:
                    sample["text"] = raw["txt"].decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _Bad("wrong_field_type", "text", f"not UTF-8 text: {e}") from None
            elif m == "text":
                sample["text"] = _typed(obj, "text", str)
            elif m == "vqa":
                sample["vqa"] = _vqa(obj)
            elif m == "image":
                sample["image"] = _decode_image(io.BytesIO(members["image"]))
            elif m == "audio":
                sample["audio"], sample["audio_sr"] = _decode_audio(io.BytesIO(members["audio"]))
            else:
                sample["video"] = _decode_npy(io.BytesIO(members["video"]))
        return sample


def _count_shard(url: str, keep: Callable[[str, str], bool] | None = None) -> int:
    """Samples in one local shard (consecutive member keys, as webdataset groups them), from tar headers;
    with `keep`, only those keep(url, key) accepts."""
    total, prev = 0, None
    try:
        with tarfile.open(url, "r:*") as tf:
            for m in tf:
                key = base_plus_ext(m.name)[0] if m.isreg() and not m.name.startswith("__") else None
                if key is not None and key != prev:
                    total, prev = total + (keep is None or keep(url, key)), key
    except (OSError, tarfile.TarError) as e:
        warnings.warn(f"counting samples: cannot read all of {url}: {e}", stacklevel=3)
    return total


def count_samples(urls) -> int:
    """Number of samples in local shards (a brace pattern, tar, folder or list), from tar headers only.

    An unreadable shard is counted as far as it can be read, with a warning."""
    return sum(_count_shard(url) for url in shard_list(urls))


def _annotations(s: dict) -> dict[str, Any]:
    """The JSON part of a sample: id, scene, scene_key, vqa, video_text, then meta and extra JSON fields."""
    out = {k: s[k] for k in ("id", "scene", "scene_key", "vqa", "video_text") if s.get(k) is not None}
    extra = {**{k: v for k, v in s.items() if k not in _RESERVED}, **(s.get("meta") or {})}
    clash = sorted(set(extra) & _RESERVED)
    if clash:
        raise DataError(f"sample {s.get('id', '?')}: meta fields {clash} clash with reserved field names")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise DataError(f"sample {s.get('id', '?')}: extra fields are not JSON-serialisable: {e}") from None
    return {**out, **extra}


def _audio_of(s: dict) -> tuple[np.ndarray, int]:
    if not s.get("audio_sr"):
        raise DataError(f"sample {s.get('id', '?')}: has audio but no audio_sr")
    return np.clip(np.asarray(s["audio"], dtype=np.float32), -1.0, 1.0), int(s["audio_sr"])


def _video_of(s: dict) -> np.ndarray:
    try:
        return _check_video(np.asarray(s["video"]))
    except _Bad as b:
        raise DataError(f"sample {s.get('id', '?')}: video: {b.problem}") from None


def write_jsonl(
    samples: Iterable[dict], out_dir: str | os.PathLike, name: str = "manifest", image_format: str = "png"
) -> Path:
    """Write samples as out_dir/<name>.jsonl with media in out_dir/<name>/ (images as image_format, audio as
    16-bit PCM WAV at audio_sr, video as .npy); SkippedSample entries are left out. Returns the manifest path."""
    out_dir = Path(out_dir)
    (out_dir / name).mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, s in enumerate(x for x in samples if not isinstance(x, SkippedSample)):
            line, stem = _annotations(s), f"{name}/{i:07d}"
            if s.get("text") is not None:
                line["text"] = s["text"]
            if s.get("image") is not None:
                line["image"] = f"{stem}.{image_format}"
                Image.fromarray(to_rgb_array(s["image"])).save(out_dir / line["image"])
            if s.get("audio") is not None:
                line["audio"] = f"{stem}.wav"
                sf.write(out_dir / line["audio"], *_audio_of(s), subtype="PCM_16")
            if s.get("video") is not None:
                line["video"] = f"{stem}.npy"
                np.save(out_dir / line["video"], _video_of(s), allow_pickle=False)
            f.write(json.dumps(line) + "\n")
    return path


def _wds_record(s: dict, key: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"__key__": key, "json": json.dumps(_annotations(s)).encode()}
    if s.get("text") is not None:
        rec["txt"] = str(s["text"]).encode("utf-8")
    if s.get("image") is not None:
        buf = io.BytesIO()
        Image.fromarray(to_rgb_array(s["image"])).save(buf, format="PNG")
        rec["png"] = buf.getvalue()
    if s.get("audio") is not None:
        buf = io.BytesIO()
        sf.write(buf, *_audio_of(s), format="WAV", subtype="PCM_16")
        rec["wav"] = buf.getvalue()
    if s.get("video") is not None:
        buf = io.BytesIO()
        np.save(buf, _video_of(s), allow_pickle=False)
        rec["npy"] = buf.getvalue()
    return rec


def write_webdataset(
    samples: Iterable[dict], out_dir: str | os.PathLike, name: str = "shard", samples_per_shard: int = 1000
) -> list[Path]:
    """Write samples into out_dir/<name>-000000.tar, ... (samples_per_shard each; keys are running numbers,
    ids go in the .json member); SkippedSample entries are left out. Returns the shard paths."""
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard = {samples_per_shard}: expected a positive number")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = None
    try:
        for i, s in enumerate(x for x in samples if not isinstance(x, SkippedSample)):
            if i % samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                paths.append(out_dir / f"{name}-{len(paths):06d}.tar")
                writer = wds.TarWriter(str(paths[-1]), encoder=False, mtime=0)
            writer.write(_wds_record(s, f"{i:09d}"))
    finally:
        if writer is not None:
            writer.close()
    return paths


def open_source(
    kind: str, path: str | os.PathLike, modalities: Sequence[str] | None = None, on_error: str = "skip"
) -> JsonlDataset | WebDatasetSource:
    """A JsonlDataset ("jsonl": path to the manifest) or a WebDatasetSource ("webdataset": a tar, a brace
    pattern or a folder of tars)."""
    if kind == "jsonl":
        return JsonlDataset(path, modalities=modalities, on_error=on_error)
    if kind == "webdataset":
        return WebDatasetSource(path, modalities=modalities, on_error=on_error)
    raise ConfigError(f"unknown data source kind {kind!r}; expected 'jsonl' or 'webdataset'")


__all__ = [
    "AUDIO_EXTS",
    "IMAGE_EXTS",
    "MODALITIES",
    "REASONS",
    "JsonlDataset",
    "SkippedSample",
    "WebDatasetSource",
    "count_samples",
    "open_source",
    "shard_list",
    "write_jsonl",
    "write_webdataset",
]
