"""The scan of `mmfusion data build`: a source (folder tree, JSONL manifest or WebDataset shards) -> the list
of samples to build (`SampleSpec`: id, members, annotations, an error found while listing), in input order,
with every member's SHA-256 (the build id and the chunk keys are made of them)."""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import DataError
from ..sources import JsonlDataset, SampleProblem, annotation_fields, shard_samples, truncation, vqa_field
from .align import pair_by_name
from .dedup import sha256
from .detect import declared_modality

MEDIA = ("image", "audio", "video")


@dataclass
class Member:
    """One input of a sample: a file path (read by the worker) or inline bytes; `declared` is the modality
    its name or field claims; `name` is how reports refer to it."""

    name: str
    declared: str | None
    path: str | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:  # type: ignore[arg-type]
            return f.read()


@dataclass
class SampleSpec:
    """One sample to build: input position, id, members, source annotations (JSONL / shard JSON fields)
    and an error found while listing it (bad JSON, missing file), plus its members' SHA-256 hashes."""

    index: int
    id: str
    sources: list[str]
    members: list[Member] = field(default_factory=list)
    annotations: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None
    hashes: list[str] = field(default_factory=list)


def source_kind(src: Path) -> str:
    """ "folder" (a tree of media files), "jsonl" or "webdataset" (a .tar or a folder of only .tar files)."""
    if src.is_file():
        if src.suffix == ".jsonl":
            return "jsonl"
        if src.suffix == ".tar":
            return "webdataset"
        raise DataError(f"source {src}: expected a folder, a .jsonl manifest or a .tar shard")
    if src.is_dir():
        files = [p for p in src.iterdir() if not p.name.startswith(".")]
        if files and all(p.is_file() and p.suffix == ".tar" for p in files):
            return "webdataset"
        if (src / "manifest.json").is_file() and any(src.glob("shard-*.tar")):
            return "webdataset"  # a folder written by `mmfusion data build`: its shards
        return "folder"
    raise DataError(f"source {src} not found")


def _walk(root: Path, skip: Path | None) -> Iterator[Path]:
    """Files under root in sorted order; hidden files/folders (".*") and the output folder are left out."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (skip is None or (here / d).resolve() != skip)
        )
        yield from (here / f for f in sorted(filenames) if not f.startswith("."))


def _folder_specs(root: Path, skip: Path | None) -> Iterator[SampleSpec]:
    for i, (sid, files) in enumerate(pair_by_name(_walk(root, skip), root)):
        rels = [p.relative_to(root).as_posix() for p in files]
        members = [Member(rel, declared_modality(rel), path=str(p)) for rel, p in zip(rels, files)]
        yield SampleSpec(i, sid, rels, members)


def _jsonl_specs(path: Path) -> Iterator[SampleSpec]:
    ds = JsonlDataset(path)  # parses lines only; media are read by the workers
    for i, ((n, obj), sid) in enumerate(zip(ds.entries, ds.ids())):
        spec = SampleSpec(i, sid, [f"{path.name}:{n}"])
        if isinstance(obj, str):
            spec.error = ("bad_source", f"line {n}: {obj}")
            yield spec
            continue
        try:
            spec.annotations = annotation_fields(obj)
            if obj.get("vqa") is not None:
                spec.annotations["vqa"] = vqa_field(obj)
            if obj.get("text") is not None:
                if not isinstance(obj["text"], str):
                    raise SampleProblem("wrong_field_type", "text", "expected a string")
                spec.members.append(Member(f"{path.name}:{n}:text", "text", data=obj["text"].encode()))
            for m in MEDIA:
                if obj.get(m) is None:
                    continue
                rel = obj[m]
                if not isinstance(rel, str):
                    raise SampleProblem("wrong_field_type", m, "expected a path string")
                file = ds.root / rel
                if not file.is_file():
                    what = (
                        "is a folder (frame folders are not supported by build)"
                        if file.is_dir()
                        else "not found"
                    )
                    raise SampleProblem("missing_file", m, f"file {rel} {what}")
                spec.sources.append(rel)
                spec.members.append(Member(rel, m, path=str(file)))
        except SampleProblem as b:
            spec.error = ("bad_source", b.message(f"line {n}"))
        spec.annotations.pop("id", None)
        yield spec


def _wds_specs(src: Path) -> Iterator[SampleSpec]:
    urls = sorted(str(p) for p in src.glob("*.tar")) if src.is_dir() else [str(src)]
    i = 0
    for url in urls:
        name = Path(url).name
        try:
            for raw in shard_samples(url):
                key = raw["__key__"]
                spec = SampleSpec(i, key, [f"{name}:{key}"])
                i += 1
                for ext, data in sorted(raw.items()):
                    if ext.startswith("__"):
                        continue
                    if ext == "json":
                        try:
                            obj = json.loads(data.decode("utf-8"))
                            if not isinstance(obj, dict):
                                raise ValueError("expected a JSON object")
                            spec.annotations = annotation_fields(obj)
                            if obj.get("vqa") is not None:
                                spec.annotations["vqa"] = vqa_field(obj)
                            spec.id = spec.annotations.pop("id", key)
                            if isinstance(obj.get("text"), str) and "txt" not in raw:
                                spec.members.append(
                                    Member(f"{name}:{key}.json:text", "text", data=obj["text"].encode())
                                )
                        except (ValueError, SampleProblem) as e:
                            spec.error = ("bad_source", f"{name} key {key}: .json: {e}")
                        continue
                    spec.members.append(
                        Member(f"{name}:{key}.{ext}", declared_modality(f"x.{ext}"), data=data)
                    )
                yield spec
            problem = truncation(url)  # tarfile stops quietly at a cut header: say so
        except (OSError, tarfile.TarError, ValueError) as e:
            problem = f"cannot read shard: {e}"
        if problem:
            yield SampleSpec(
                i,
                name,
                [name],
                error=("bad_source", f"{name}: {problem} (samples from there on could not be read)"),
            )
            i += 1


def scan(src: Path, skip: Path | None = None, progress: bool = False) -> list[SampleSpec]:
    """Every sample of the source, in input order, with its members' SHA-256 hashes."""
    from tqdm import tqdm

    kind = source_kind(src)
    specs_it = {"folder": lambda: _folder_specs(src, skip), "jsonl": lambda: _jsonl_specs(src)}.get(
        kind, lambda: _wds_specs(src)
    )()
    specs = []
    for spec in tqdm(specs_it, desc="scan", unit="sample", disable=not progress):
        for m in spec.members:
            try:
                spec.hashes.append(sha256(m.read()))
            except OSError as e:
                spec.error = spec.error or ("bad_source", f"{m.name}: cannot read: {e}")
                spec.hashes.append("")
        specs.append(spec)
    if not specs:
        raise DataError(f"source {src} holds no samples")
    return specs


__all__ = ["Member", "SampleSpec", "scan", "source_kind"]
