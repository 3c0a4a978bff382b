"""Reading and writing user data (D1): a JSONL manifest of media files, and WebDataset tar shards.

JSONL manifest — one JSON object per line (blank lines ignored); media paths are relative to the
manifest's folder:

    {"id": "0001", "image": "images/0001.png", "text": "a red circle",
     "audio": "audio/0001.wav", "video": "video/0001.npy", "scene": {...}, "vqa": [...]}

- image: any file Pillow reads (any mode/size; the image modality converts and resizes later)
- audio: WAV / FLAC / OGG read with soundfile; multi-channel is averaged to mono; the file's sample rate
  is kept in "audio_sr" (the audio modality resamples)
- video: an .npy array (T, H, W, 3) uint8 (loaded with allow_pickle=False) or a folder of frame images
  (sorted by name)
- text: a string; optional: id (default "<manifest stem>-<line>"), scene (dict), scene_key (str),
  vqa (list), video_text (str); any other field is kept under sample["meta"].

WebDataset shards — members share a key: <key>.txt (text), <key>.png|jpg|jpeg|webp (image),
<key>.wav|flac (audio), <key>.npy (video), <key>.json (id, scene, scene_key, vqa, video_text, meta).

A sample that cannot be read is, with on_error="skip", returned as a SkippedSample(id, reason, detail)
so callers can count it by reason; with on_error="fail" a DataError names the file/line and field.
Reasons: bad_json, wrong_field_type, missing_file, corrupt_image, corrupt_audio, corrupt_video,
missing_modality.
"""

from __future__ import annotations

import glob
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..modalities.image import to_rgb_array

MEDIA = ("image", "audio", "video")
MODALITIES = ("image", "text", "audio", "video")
KNOWN = {"id", "text", "scene", "scene_key", "vqa", "video_text", *MEDIA}
IMAGE_EXT = ("png", "jpg", "jpeg", "webp", "bmp")
AUDIO_EXT = ("wav", "flac", "ogg")


@dataclass(frozen=True)
class SkippedSample:
    """A sample that could not be read: its id, a short reason code and a human detail."""

    id: str
    reason: str
    detail: str = ""


class SampleError(Exception):
    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


# ---- decoding ----------------------------------------------------------------------------------------------
def decode_image(data: bytes | Path) -> np.ndarray:
    """Bytes or a path -> (H, W, 3) uint8, fully decoded (a truncated file fails here, not later)."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            return to_rgb_array(img)
    except FileNotFoundError:
        raise
    except Exception as e:  # Pillow raises many types for bad files
        raise SampleError("corrupt_image", "image", f"cannot decode image: {e}") from None


def decode_audio(data: bytes | Path) -> tuple[np.ndarray, int]:
    """Bytes or a path -> (mono float32 waveform, sample rate)."""
    import soundfile as sf

    try:
        wav, sr = sf.read(io.BytesIO(data) if isinstance(data, bytes) else str(data), dtype="float32", always_2d=True)
    except Exception as e:
        if isinstance(data, Path) and not data.exists():
            raise FileNotFoundError(data) from None
        raise SampleError("corrupt_audio", "audio", f"cannot decode audio: {e}") from None
    return wav.mean(axis=1).astype(np.float32), int(sr)


def check_video(arr: Any) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or arr.shape[0] < 1:
        raise SampleError(
            "corrupt_video", "video", f"video array has shape {arr.shape} and dtype {arr.dtype}; expected (T, H, W, 3) uint8"
        )
    return arr


def decode_video(data: bytes | Path) -> np.ndarray:
    """.npy bytes/path or a folder of frames -> (T, H, W, 3) uint8."""
    if isinstance(data, Path) and data.is_dir():
        frames = sorted(p for p in data.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXT)
        if not frames:
            raise SampleError("corrupt_video", "video", f"frame folder {data} has no images")
        decoded = []
        for f in frames:
            try:
                decoded.append(decode_image(f))
            except SampleError as e:
                raise SampleError("corrupt_video", "video", f"frame {f.name}: {e.detail}") from None
        if len({d.shape for d in decoded}) != 1:
            raise SampleError("corrupt_video", "video", f"frames in {data} differ in size")
        return np.stack(decoded)
    try:
        arr = np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise SampleError("corrupt_video", "video", f"cannot load video array: {e}") from None
    return check_video(arr)


def _check_types(rec: dict[str, Any]) -> None:
    for key in (*MEDIA, "text", "id", "scene_key", "video_text"):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            raise SampleError("wrong_field_type", key, f"field '{key}' is {type(rec[key]).__name__}; expected a string")
    if "scene" in rec and rec["scene"] is not None and not isinstance(rec["scene"], dict):
        raise SampleError("wrong_field_type", "scene", "field 'scene' must be an object")
    if "vqa" in rec and rec["vqa"] is not None and not isinstance(rec["vqa"], list):
        raise SampleError("wrong_field_type", "vqa", "field 'vqa' must be a list")


def _base_sample(rec: dict[str, Any], default_id: str) -> dict[str, Any]:
    sample: dict[str, Any] = {"id": rec.get("id") or default_id}
    for key in ("text", "scene", "scene_key", "vqa", "video_text"):
        if rec.get(key) is not None:
            sample[key] = rec[key]
    meta = {k: v for k, v in rec.items() if k not in KNOWN}
    if meta:
        sample["meta"] = meta
    return sample


# ---- JSONL -------------------------------------------------------------------------------------------------
class JsonlDataset(torch.utils.data.Dataset):
    """Map-style dataset over a JSONL manifest; media are decoded in __getitem__ (so in DataLoader workers)."""

    def __init__(self, path: str | Path, modalities: Sequence[str] | None = None, on_error: str = "skip"):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"manifest {self.path} not found")
        if on_error not in ("skip", "fail"):
            raise DataError(f"on_error = {on_error!r}; expected 'skip' or 'fail'")
        self.root = self.path.parent
        self.modalities = tuple(modalities) if modalities else None
        self.on_error = on_error
        self.lines: list[tuple[int, dict[str, Any] | str]] = []  # (line number, record | JSON error)
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
                except ValueError as e:
                    if on_error == "fail":
                        raise DataError(f"{self.path} line {no}: not valid JSON ({e})") from None
                    rec = str(e)
                self.lines.append((no, rec))

    def __len__(self) -> int:
        return len(self.lines)

    def ids(self) -> list[str]:
        return [
            (rec.get("id") if isinstance(rec, dict) and isinstance(rec.get("id"), str) else None)
            or f"{self.path.stem}-{no}"
            for no, rec in self.lines
        ]

    def texts(self) -> Iterator[str]:
        """Captions without decoding any media (for tokenizer training)."""
        for _, rec in self.lines:
            if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip():
                yield rec["text"]

    def _load(self, rec: dict[str, Any], default_id: str) -> dict[str, Any]:
        _check_types(rec)
        sample = _base_sample(rec, default_id)
        wanted = self.modalities or tuple(m for m in MODALITIES if rec.get(m) is not None)
        for m in wanted:
            if rec.get(m) is None:
                raise SampleError("missing_modality", m, f"field '{m}' is absent")
            if m == "text":
                continue
            file = self.root / rec[m]
            if not file.exists():
                raise SampleError("missing_file", m, f"file {rec[m]} not found")
            try:
                if m == "image":
                    sample["image"] = decode_image(file)
                elif m == "audio":
                    sample["audio"], sample["audio_sr"] = decode_audio(file)
                else:
                    sample["video"] = decode_video(file)
            except FileNotFoundError:
                raise SampleError("missing_file", m, f"file {rec[m]} not found") from None
        return sample

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedSample:
        no, rec = self.lines[i]
        default_id = f"{self.path.stem}-{no}"
        if isinstance(rec, str):
            return SkippedSample(default_id, "bad_json", rec)
        try:
            return self._load(rec, default_id)
        except SampleError as e:
            if self.on_error == "fail":
                raise DataError(f"{self.path} line {no}: field '{e.field}': {e.detail}") from None
            sid = rec.get("id") if isinstance(rec.get("id"), str) else default_id
            return SkippedSample(sid, e.reason, e.detail)


# ---- WebDataset ----------------------------------------------------------------------------------------------
def expand_urls(path: str) -> list[str]:
    """A brace pattern ("train-{000000..000009}.tar"), a single tar, or a folder of tars -> shard paths."""
    import braceexpand

    p = Path(path)
    if p.is_dir():
        urls = sorted(str(x) for x in p.glob("*.tar"))
    elif "{" in path:
        urls = [u for u in braceexpand.braceexpand(path)]
    else:
        urls = sorted(glob.glob(path)) or [path]
    missing = [u for u in urls if not Path(u).is_file()]
    if not urls or missing:
        raise DataError(f"WebDataset shards not found: {missing[0] if missing else path}")
    return urls


class WebDatasetSource(torch.utils.data.IterableDataset):
    """Iterable over WebDataset tar shards; shards are split over DDP ranks and DataLoader workers."""

    def __init__(
        self, urls: str | Sequence[str], modalities: Sequence[str] | None = None, on_error: str = "skip",
        shuffle: int = 0, seed: int = 0,
    ):
        self.urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
        self.modalities = tuple(modalities) if modalities else None
        self.on_error = on_error
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        key = raw["__key__"]
        meta: dict[str, Any] = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except ValueError as e:
                raise SampleError("bad_json", "json", f"{key}.json is not valid JSON: {e}") from None
            if not isinstance(meta, dict):
                raise SampleError("bad_json", "json", f"{key}.json must hold an object")
            _check_types(meta)
        extra = meta.pop("meta", None)
        sample = _base_sample(meta, key)
        if isinstance(extra, dict):
            sample.setdefault("meta", {}).update(extra)
        if "txt" in raw:
            try:
                sample["text"] = raw["txt"].decode("utf-8")
            except UnicodeDecodeError:
                raise SampleError("wrong_field_type", "text", f"{key}.txt is not UTF-8") from None
        image_ext = next((e for e in IMAGE_EXT if e in raw), None)
        audio_ext = next((e for e in AUDIO_EXT if e in raw), None)
        found = {"text": "text" in sample, "image": image_ext, "audio": audio_ext, "video": "npy" in raw}
        wanted = self.modalities or tuple(m for m in MODALITIES if found[m])
        for m in wanted:
            if not found[m]:
                raise SampleError("missing_modality", m, f"{key} has no {m} member")
        if "image" in wanted:
            sample["image"] = decode_image(raw[image_ext])
        if "audio" in wanted:
            sample["audio"], sample["audio_sr"] = decode_audio(raw[audio_ext])
        if "video" in wanted:
            sample["video"] = decode_video(raw["npy"])
        return sample

    def __iter__(self) -> Iterator[dict[str, Any] | SkippedSample]:
        import webdataset as wds

        pipeline = wds.WebDataset(
            self.urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        if self.shuffle:
            pipeline = pipeline.shuffle(self.shuffle, rng=__import__("random").Random(self.seed + self.epoch))
        for raw in pipeline:
            try:
                yield self._decode(raw)
            except SampleError as e:
                url = raw.get("__url__", "?")
                if self.on_error == "fail":
                    raise DataError(f"{url} sample {raw['__key__']}: field '{e.field}': {e.detail}") from None
                yield SkippedSample(raw["__key__"], e.reason, e.detail)

    def texts(self) -> Iterator[str]:
        """Captions only (reads the shards but decodes no media)."""
        import webdataset as wds

        for raw in wds.WebDataset(self.urls, shardshuffle=False, empty_check=False):
            if "txt" in raw:
                try:
                    yield raw["txt"].decode("utf-8")
                except UnicodeDecodeError:
                    continue


def count_samples(urls: str | Sequence[str]) -> int:
    """Number of samples (distinct keys) in the shards."""
    import tarfile

    total = 0
    for url in expand_urls(urls) if isinstance(urls, str) else urls:
        with tarfile.open(url) as tar:
            total += len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    return total


# ---- writers --------------------------------------------------------------------------------------------------
def _encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _encode_wav(wave: np.ndarray, sr: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _json_fields(sample: dict[str, Any]) -> dict[str, Any]:
    return {k: sample[k] for k in ("id", "scene", "scene_key", "vqa", "video_text", "meta") if k in sample}


def write_jsonl(samples: Iterable[dict[str, Any]], out_dir: str | Path, name: str = "manifest") -> Path:
    """Write samples as <out_dir>/<name>.jsonl with media under <out_dir>/<name>/ (PNG, WAV PCM16, .npy)."""
    out_dir = Path(out_dir)
    media = out_dir / name
    media.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / f"{name}.jsonl"
    with open(manifest, "w", encoding="utf-8") as f:
        for i, s in enumerate(samples):
            sid = str(s.get("id", f"{name}-{i:07d}"))
            rec = {**_json_fields(s), "id": sid}
            if s.get("text") is not None:
                rec["text"] = s["text"]
            if s.get("image") is not None:
                (media / f"{sid}.png").write_bytes(_encode_png(to_rgb_array(s["image"])))
                rec["image"] = f"{name}/{sid}.png"
            if s.get("audio") is not None:
                (media / f"{sid}.wav").write_bytes(_encode_wav(s["audio"], int(s.get("audio_sr", 16000))))
                rec["audio"] = f"{name}/{sid}.wav"
            if s.get("video") is not None:
                (media / f"{sid}.npy").write_bytes(_encode_npy(np.asarray(s["video"], dtype=np.uint8)))
                rec["video"] = f"{name}/{sid}.npy"
            f.write(json.dumps(rec) + "\n")
    return manifest


def write_webdataset(
    samples: Iterable[dict[str, Any]], out_dir: str | Path, name: str = "shard", samples_per_shard: int = 1000
) -> list[Path]:
    """Write samples as <out_dir>/<name>-000000.tar, ... (WebDataset layout, see module docstring)."""
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / f"{name}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0) as sink:
        for i, s in enumerate(samples):
            key = str(s.get("id", f"{name}-{i:07d}")).replace(".", "_")
            rec: dict[str, Any] = {"__key__": key, "json": json.dumps(_json_fields(s)).encode()}
            if s.get("text") is not None:
                rec["txt"] = s["text"].encode("utf-8")
            if s.get("image") is not None:
                rec["png"] = _encode_png(to_rgb_array(s["image"]))
            if s.get("audio") is not None:
                rec["wav"] = _encode_wav(s["audio"], int(s.get("audio_sr", 16000)))
            if s.get("video") is not None:
                rec["npy"] = _encode_npy(np.asarray(s["video"], dtype=np.uint8))
            sink.write(rec)
    return sorted(out_dir.glob(f"{name}-*.tar"))


def open_source(kind: str, path: str, modalities: Sequence[str] | None = None, on_error: str = "skip"):
    """"jsonl" -> JsonlDataset, "webdataset" -> WebDatasetSource; DataError when the path does not exist."""
    if kind == "jsonl":
        return JsonlDataset(path, modalities, on_error)
    if kind == "webdataset":
        return WebDatasetSource(path, modalities, on_error)
    raise DataError(f"unknown data source {kind!r}; expected 'jsonl' or 'webdataset'")
