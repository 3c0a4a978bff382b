"""The outputs of `mmfusion data build`: shards copied from the chunk tars (skipping those already written),
manifest.json, rejected.jsonl, and the small JSON / checksum helpers the work folder uses. Every file is
written to a temporary name first and renamed, so an interrupted build never leaves a half-written one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import webdataset as wds

from ..shards import shard_samples


def record_key(index: int) -> str:
    """The WebDataset key of the sample at input position `index` ("000000042"): unique across shards."""
    return f"{index:09d}"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (shards can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write obj as indented, key-sorted JSON, atomically (a .tmp file renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    """The JSON in path, or None when it is missing or not valid JSON (a cache entry to redo)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_shards(
    accepted: list[dict], out: Path, work: Path, shard_size: int, chunk_size: int, progress: bool
) -> tuple[list[str], int]:
    """Copy accepted records from the chunk tars into out/shard-NNNNNN.tar, skipping shards already written
    with the same samples; stale shards from an earlier build are removed. Returns (names, shards written)."""
    from tqdm import tqdm

    state_path = work / "shards.json"
    state = read_json(state_path) or {}
    plan = [accepted[s : s + shard_size] for s in range(0, len(accepted), shard_size)]
    names = [f"shard-{k:06d}.tar" for k in range(len(plan))]
    for old in out.glob("shard-*.tar"):
        if old.name not in names:
            old.unlink()
    cache: dict[int, dict[str, dict]] = {}
    written = 0
    for name, group in tqdm(list(zip(names, plan)), desc="write", unit="shard", disable=not progress):
        ids = [v["id"] for v in group]
        for v in group:
            v["shard"], v["key"] = name, record_key(v["index"])
        path = out / name
        done = state.get(name)
        if done and done["ids"] == ids and path.is_file() and file_sha256(path) == done["sha256"]:
            continue
        tmp = path.with_name(name + ".tmp")
        with wds.TarWriter(str(tmp), encoder=False, mtime=0) as writer:
            for v in group:
                chunk = v["index"] // chunk_size
                if chunk not in cache:
                    cache.clear()  # accepted samples come in input order: one chunk at a time
                    url = str(work / f"chunk-{chunk:06d}.tar")
                    cache[chunk] = {
                        r["__key__"]: {k: b for k, b in r.items() if not k.startswith("__") or k == "__key__"}
                        for r in shard_samples(url)
                    }
                writer.write(cache[chunk][v["key"]])
        tmp.replace(path)
        state[name] = {"ids": ids, "sha256": file_sha256(path)}
        write_json(state_path, state)
        written += 1
    return names, written


MANIFEST_FIELDS = ("id", "sources", "modalities", "hashes", "shard", "key", "align_score", "notes")


def write_manifest(out: Path, head: dict[str, Any], accepted: list[dict]) -> None:
    """out/manifest.json: `head` (format version, build id, source, config, counts, shards) and one entry per
    accepted sample (its MANIFEST_FIELDS that are set)."""
    samples = [{k: v[k] for k in MANIFEST_FIELDS if k in v} for v in accepted]
    write_json(out / "manifest.json", {**head, "samples": samples})


def write_rejected(out: Path, rejected: list[dict]) -> None:
    """out/rejected.jsonl: one line per rejected sample (id, sources, reasons, details, notes if any)."""
    tmp = out / "rejected.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for v in rejected:
            row = {"id": v["id"], "sources": v["sources"], "reasons": [r for r, _ in v["reasons"]]}
            row["details"] = [d for _, d in v["reasons"]]
            if v["notes"]:
                row["notes"] = v["notes"]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out / "rejected.jsonl")


__all__ = [
    "file_sha256",
    "read_json",
    "record_key",
    "write_json",
    "write_manifest",
    "write_rejected",
    "write_shards",
]
