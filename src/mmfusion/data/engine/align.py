"""Stage (c) of `mmfusion data build`: cross-modal alignment.

- Pairing loose files by name: in a folder tree, files in the same folder with the same stem form one
  sample (`pets/cat.jpg` + `pets/cat.txt` -> sample "pets/cat"); the content decides each file's modality.
- Pair scoring with a trained mmfusion model (`--model`): the cosine between the image and caption
  embeddings, as CLIPScore (Hessel et al. 2021) without its 2.5 rescaling; a pair under `min_alignment`
  is rejected as `misaligned`. Only a model whose towers share one embedding space can score pairs — a
  contrastive model, trained with a learned temperature (`scale()`); a MultiModalModel's per-modality
  embeddings live in separate spaces.

The data engine does not import the models (the layers: data < models): whoever starts a build with a model
passes the loader, `mmfusion.load_model` (the CLI does), and the scorer checks what it loaded by its verbs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError

ModelLoader = Callable[[str | os.PathLike], Any]  # a model folder -> the model (mmfusion.load_model)
_SCORERS: dict[str, PairScorer] = {}


def pair_by_name(files: Iterable[Path], root: Path) -> list[tuple[str, list[Path]]]:
    """Group files under `root` by folder + stem: [(sample id "sub/stem", [files sorted by name])], sorted by id.

    The stem is the name up to the first dot, so `cat.jpg`, `cat.txt` and `cat.en.txt` pair up."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        rel = f.relative_to(root)
        sid = (rel.parent / rel.name.split(".", 1)[0]).as_posix()
        groups.setdefault(sid, []).append(f)
    return [(sid, sorted(groups[sid], key=lambda p: p.name)) for sid in sorted(groups)]


class PairScorer:
    """A trained image–text model with one shared embedding space that scores image-caption pairs: it needs
    `encode_image`, `encode_text` (L2-normalised (N, D) embeddings) and a learned temperature `scale()`, as a
    ContrastiveModel has. `cached` loads a model folder once per process."""

    def __init__(self, model: Any, name: str = "the model"):
        import torch

        if not all(hasattr(model, verb) for verb in ("encode_image", "encode_text", "scale")):
            raise ConfigError(
                f"--model {name}: a {type(model).__name__} cannot score image-caption pairs "
                "(its modality embeddings are separate spaces); expected a contrastive model folder"
            )
        self.model = model.eval().to("cuda" if torch.cuda.is_available() else "cpu")

    @classmethod
    def cached(cls, model_dir: str | os.PathLike, load_model: ModelLoader) -> PairScorer:
        """The scorer for model_dir in this process, loaded by `load_model` the first time (worker processes
        load the model once)."""
        key = str(Path(model_dir).resolve())
        if key not in _SCORERS:
            _SCORERS[key] = cls(load_model(model_dir), str(model_dir))
        return _SCORERS[key]

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, H, W, 3) uint8 images -> (N, D) L2-normalised float32 embeddings."""
        if not images:
            return np.zeros((0, self.model.config.embed_dim), dtype=np.float32)
        return self.model.encode_image(list(images)).numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> (N, D) L2-normalised float32 embeddings."""
        if not texts:
            return np.zeros((0, self.model.config.embed_dim), dtype=np.float32)
        return self.model.encode_text(list(texts)).numpy()


def pair_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (N, D) L2-normalised image and text embeddings -> (N,) CLIP-style scores."""
    return (image_emb * text_emb).sum(axis=1)


__all__ = ["ModelLoader", "PairScorer", "pair_by_name", "pair_scores"]
