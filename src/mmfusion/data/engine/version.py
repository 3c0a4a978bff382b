"""Dataset versioning (D6): `mmfusion data info DIR` and `mmfusion data diff A B` on built dataset folders.

A build is identified by its build id: the SHA-256 of its config and of every input's id and content
(see pipeline.build_id), so the same inputs and settings always give the same id, and any change of a
file, a threshold or the model gives a new one.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ...errors import DataError


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest.json of a built dataset folder (DataError when it is missing or damaged)."""
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path} not found: {folder} is not a built dataset (run `mmfusion data build`)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read manifest: {e}") from None
    if not isinstance(manifest, dict) or not {"build_id", "samples"} <= manifest.keys():
        raise DataError(f"{path}: not an mmfusion build manifest (expected 'build_id' and 'samples')")
    return manifest


def info(folder: str | os.PathLike) -> dict[str, Any]:
    """Build id, counts, samples per modality and per modality combination, and rejections per reason."""
    manifest = read_manifest(folder)
    samples = manifest["samples"]
    rejected: Counter = Counter()
    rej_path = Path(folder) / "rejected.jsonl"
    if rej_path.is_file():
        for line in rej_path.read_text(encoding="utf-8").splitlines():
            rejected.update(json.loads(line)["reasons"])
    return {
        "build_id": manifest["build_id"],
        "source": manifest.get("source"),
        "counts": manifest.get("counts", {}),
        "shards": len(manifest.get("shards", [])),
        "modalities": dict(sorted(Counter(m for s in samples for m in s["modalities"]).items())),
        "combinations": dict(sorted(Counter("+".join(s["modalities"]) for s in samples).items())),
        "rejected": dict(sorted(rejected.items())),
    }


def format_info(data: dict[str, Any]) -> str:
    """info() as the text `mmfusion data info` prints."""
    c = data["counts"]
    lines = [
        f"build id   {data['build_id']}",
        f"source     {data['source']}",
        f"samples    {c.get('accepted', '?')} accepted in {data['shards']} shards, "
        f"{c.get('rejected', '?')} rejected, {c.get('inputs', '?')} inputs",
        "per modality:",
        *(f"  {k:<24}{v:>8}" for k, v in data["modalities"].items()),
        "per combination:",
        *(f"  {k:<24}{v:>8}" for k, v in data["combinations"].items()),
    ]
    if data["rejected"]:
        lines += ["rejected per reason:", *(f"  {k:<24}{v:>8}" for k, v in data["rejected"].items())]
    return "\n".join(lines)


def diff(a: str | os.PathLike, b: str | os.PathLike) -> dict[str, list[str]]:
    """Sample ids added in B, removed from A, and changed (same id, other content hash), each sorted."""
    old = {s["id"]: s["hashes"].get("content") for s in read_manifest(a)["samples"]}
    new = {s["id"]: s["hashes"].get("content") for s in read_manifest(b)["samples"]}
    return {
        "added": sorted(new.keys() - old.keys()),
        "removed": sorted(old.keys() - new.keys()),
        "changed": sorted(k for k in old.keys() & new.keys() if old[k] != new[k]),
    }


def format_diff(d: dict[str, list[str]]) -> str:
    """diff() as the text `mmfusion data diff` prints: one line per sample, prefixed +, - or ~."""
    marks = {"added": "+", "removed": "-", "changed": "~"}
    lines = [f"{marks[k]} {sid}" for k in ("added", "removed", "changed") for sid in d[k]]
    summary = ", ".join(f"{len(d[k])} {k}" for k in ("added", "removed", "changed"))
    return "\n".join([*lines, summary])


__all__ = ["diff", "format_diff", "format_info", "info", "read_manifest"]
