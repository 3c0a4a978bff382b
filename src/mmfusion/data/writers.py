"""Writing samples as a JSONL manifest with media files, or as WebDataset shards (the formats
mmfusion.data.sources reads; `mmfusion data synth` and the data engine write with these)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import webdataset as wds
from PIL import Image

from ..errors import ConfigError, DataError
from ..modalities import MediaError
from ..modalities.image import to_rgb_array
from ..modalities.video import check_clip
from .sources import RESERVED, SkippedSample


def annotations(s: dict) -> dict[str, Any]:
    """The JSON part of a sample: id, scene, scene_key, vqa, video_text, then meta and extra JSON fields."""
    out = {k: s[k] for k in ("id", "scene", "scene_key", "vqa", "video_text") if s.get(k) is not None}
    extra = {**{k: v for k, v in s.items() if k not in RESERVED}, **(s.get("meta") or {})}
    clash = sorted(set(extra) & RESERVED)
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
        return check_clip(np.asarray(s["video"]))
    except MediaError as b:
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
            line, stem = annotations(s), f"{name}/{i:07d}"
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


def wds_record(s: dict, key: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"__key__": key, "json": json.dumps(annotations(s)).encode()}
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
            writer.write(wds_record(s, f"{i:09d}"))
    finally:
        if writer is not None:
            writer.close()
    return paths


__all__ = ["annotations", "wds_record", "write_jsonl", "write_webdataset"]
