"""Image index for text -> image search: unit embeddings in safetensors + ids / paths / captions in JSON.

    index = build_index(engine, files, out_dir)          # files: [(id, path, caption or None), ...]
    index = EmbeddingIndex.load(out_dir)
    index.search(query_vector, k) -> [{"rank", "index", "id", "score", "caption", "url"}, ...]

Layout of INDEX_DIR: `embeddings.safetensors` (tensor "embeddings" (N, D) float32, L2-normalised) and
`index.json` ({"model_id", "dim", "items": [{"id", "path", "caption"}]}); paths are relative to INDEX_DIR
when the image lies inside it (the synthetic index copies its PNGs to INDEX_DIR/images/).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import DataError
from ..modalities.image import decode_image

EMBED_CHUNK = 64


class EmbeddingIndex:
    def __init__(
        self,
        embeddings: torch.Tensor,
        items: Sequence[dict[str, Any]],
        model_id: str = "",
        root: str | Path | None = None,
    ):
        if embeddings.ndim != 2 or embeddings.shape[0] != len(items):
            raise DataError(f"index: {tuple(embeddings.shape)} embeddings for {len(items)} items")
        self.embeddings = embeddings.float().contiguous()
        self.items = [dict(it) for it in items]
        self.model_id = model_id
        self.root = Path(root) if root is not None else None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def info(self) -> dict[str, Any]:
        return {"size": len(self), "dim": self.dim, "model_id": self.model_id}

    def search(self, query: np.ndarray | torch.Tensor, k: int = 5) -> list[dict[str, Any]]:
        q = torch.from_numpy(np.array(query, dtype=np.float32)).flatten()
        if q.shape[0] != self.dim:
            raise DataError(f"query has {q.shape[0]} dimensions; the index has {self.dim}")
        scores = self.embeddings @ q
        top = torch.topk(scores, min(k, len(self)))
        return [
            {
                "rank": r + 1,
                "index": int(i),
                "id": self.items[int(i)]["id"],
                "score": float(s),
                "caption": self.items[int(i)].get("caption"),
                "url": f"/v1/index/image/{int(i)}",
            }
            for r, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()))
        ]

    def path(self, i: int) -> Path:
        p = Path(self.items[i]["path"])
        return p if p.is_absolute() or self.root is None else self.root / p

    def image_png(self, i: int) -> bytes:
        """Image i as PNG bytes: a PNG file as it is, another (a JPEG) decoded by `decode_image` and re-encoded.
        OSError when the file is gone, MediaError when it no longer decodes."""
        p = self.path(i)
        if p.suffix.lower() == ".png":
            return p.read_bytes()
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(decode_image(p)).save(buf, format="PNG")
        return buf.getvalue()

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings}, str(directory / "embeddings.safetensors"))
        meta = {"model_id": self.model_id, "dim": self.dim, "items": self.items}
        (directory / "index.json").write_text(json.dumps(meta, indent=1))
        self.root = directory
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> EmbeddingIndex:
        directory = Path(directory)
        meta_path, emb_path = directory / "index.json", directory / "embeddings.safetensors"
        if not meta_path.is_file() or not emb_path.is_file():
            raise DataError(
                f"{directory} is not an index folder (needs index.json and embeddings.safetensors; "
                "build one with `mmfusion index build`)"
            )
        meta = json.loads(meta_path.read_text())
        return cls(load_file(str(emb_path))["embeddings"], meta["items"], meta.get("model_id", ""), directory)


# ---- building ---------------------------------------------------------------------------------------------
def build_index(
    engine, files: Sequence[tuple[str, Path, str | None]], out: str | Path, progress: bool = False
) -> EmbeddingIndex:
    """Embed every image with `engine` (the server's own decoding path: `Engine.prepare`) and save the index to
    `out`."""
    out = Path(out).resolve()
    vecs: list[np.ndarray] = []
    chunks = range(0, len(files), EMBED_CHUNK)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="index", unit="chunk", leave=False)
    for s in chunks:
        part = files[s : s + EMBED_CHUNK]
        prepared = [engine.prepare("image", p.read_bytes(), f"image {p}") for _, p, _ in part]
        vecs.extend(engine.embed("image", prepared))
    items = []
    for ident, p, caption in files:
        rel = p.relative_to(out) if p.is_relative_to(out) else p
        items.append({"id": ident, "path": str(rel), "caption": caption})
    index = EmbeddingIndex(torch.from_numpy(np.stack(vecs)), items, engine.model_id, out)
    index.save(out)
    return index


def build_synthetic_index(
    engine, n: int, out: str | Path, split: str = "test", seed: int = 0, image_size: int = 32
) -> EmbeddingIndex:
    """Render n scenes of the synthetic world as PNGs into out/images/ (captions kept) and index them."""
    from PIL import Image

    from ..data.synthetic import SyntheticWorld, WorldConfig

    if n < 1:
        raise DataError(f"--synthetic {n}: expected a positive number of images")
    out = Path(out).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    world = SyntheticWorld(WorldConfig(seed=seed, image_size=image_size))
    files = []
    for i in range(n):
        s = world.sample(split, i, ("image", "text"))
        path = out / "images" / f"{s['id']}.png"
        Image.fromarray(s["image"]).save(path)
        files.append((s["id"], path, s["text"]))
    return build_index(engine, files, out)


__all__ = ["EmbeddingIndex", "build_index", "build_synthetic_index"]
