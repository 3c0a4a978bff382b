"""Image files named on a command line: every image of a folder or of a JSONL manifest, with its id and caption.

Used by `mmfusion tokenize` / `mmfusion generate` (unified) and `mmfusion index build` (serve); it lives here,
below serve, so that unified never imports serve.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(source: str | Path) -> list[tuple[str, Path, str | None]]:
    """(id, path, caption) for every image of a folder (sorted by name) or of a JSONL manifest (lines with
    "image" relative to the manifest's folder, optional "id" and "text"/"caption")."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        out = [(str(p.relative_to(source).with_suffix("")), p.resolve(), None) for p in files]
    elif source.is_file() and source.suffix == ".jsonl":
        out = []
        for n, line in enumerate(source.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{source}:{n + 1}: not JSON ({e})") from None
            if not rec.get("image"):
                continue
            p = (source.parent / rec["image"]).resolve()
            out.append((str(rec.get("id", p.stem)), p, rec.get("caption", rec.get("text"))))
    else:
        raise DataError(f"--images {source}: expected a folder of PNG/JPEG files or a .jsonl manifest")
    if not out:
        raise DataError(f"no images found in {source}")
    missing = [str(p) for _, p, _ in out if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} image file(s) missing, e.g. {missing[0]}")
    return out


__all__ = ["IMAGE_SUFFIXES", "list_images"]
