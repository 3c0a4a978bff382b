"""The two latents the joint diffusion model denoises, both continuous and both exactly invertible.

Image: the picture itself at `image_size` px in [-1, 1], cut into non-overlapping p x p patches:
(N, 3, S, S) <-> (N, (S / p)^2, 3 p^2) (`patchify` / `unpatchify`). No autoencoder sits in between, so no
decoder error enters the judged images (the VQ-VAE's continuous latent would add its reconstruction error).

Text: a caption as a sequence of `text_len` word vectors (Diffusion-LM style, Li et al. 2022,
arXiv:2205.14217), from a fixed seeded word-embedding table over the synthetic world's caption vocabulary
(every template word and attribute word, plus <pad>); rows have norm sqrt(dim), so entries have unit scale
like the noise. Decoding rounds each position to its nearest word and stops at the first <pad>: a generated
caption is free text over the vocabulary (not retrieved from a caption list), which the scene parser then
reads. The table is not learned: the denoiser learns the text side, so nothing can collapse.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..data.synthetic import COLOURS, SHAPES, SIZES, TEMPLATES
from ..errors import DataError

PAD = "<pad>"


def caption_words(text: str) -> list[str]:
    """Lowercase words of a caption, punctuation dropped: 'a red, big circle.' -> ['a', 'red', 'big', 'circle']."""
    return re.sub(r"[^a-z ]+", " ", text.lower()).split()


def world_vocabulary() -> list[str]:
    """<pad> then every word of the synthetic world's caption templates and attribute names, sorted."""
    words = {w for ts in TEMPLATES.values() for t in ts for w in caption_words(re.sub(r"\{\d\}", " ", t))}
    words |= set(SIZES) | set(COLOURS) | set(SHAPES)
    return [PAD, *sorted(words)]


def canonical_caption(caption: str) -> str:
    """The caption restated in the first template of its object count ("there is a small red circle" ->
    "a small red circle"), when the scene parser reads it; otherwise its own words."""
    from ..unified.train import parse_caption

    objs = parse_caption(caption)
    if objs is None:
        return " ".join(caption_words(caption))
    return " ".join(caption_words(TEMPLATES[len(objs)][0].format(*(" ".join(o) for o in objs))))


class TextCodec:
    """Captions <-> (text_len, dim) latents through a fixed word-embedding table (seeded; see module docs).

    canonical: encode every caption the scene parser reads in its canonical template (`canonical_caption`),
    so that the latent states what the caption says, not which of the world's paraphrases it picked (as a
    sentence encoder would); generated captions then come out in that template."""

    def __init__(self, text_len: int = 24, dim: int = 16, seed: int = 0, canonical: bool = True):
        if text_len < 1 or dim < 1:
            raise DataError(f"text_len and dim must be >= 1, got {text_len}, {dim}")
        self.text_len, self.dim, self.seed, self.canonical = text_len, dim, seed, canonical
        self.vocab = world_vocabulary()
        self.index = {w: i for i, w in enumerate(self.vocab)}
        gen = torch.Generator().manual_seed(seed)
        table = torch.randn(len(self.vocab), dim, generator=gen)
        self.table = table / table.norm(dim=1, keepdim=True) * dim**0.5  # (V, dim)

    def ids(self, caption: str) -> list[int]:
        """Word ids padded to text_len; DataError for an unknown word or a caption over text_len words."""
        words = caption_words(canonical_caption(caption) if self.canonical else caption)
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise DataError(f"caption {caption!r}: words {unknown} are not in the world's caption vocabulary")
        if len(words) > self.text_len:
            raise DataError(
                f"caption {caption!r} has {len(words)} words; text_len is {self.text_len} (raise model.text_len)"
            )
        return [self.index[w] for w in words] + [0] * (self.text_len - len(words))

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """N captions -> (N, text_len, dim) float latents."""
        ids = torch.tensor([self.ids(c) for c in captions], dtype=torch.long).reshape(-1, self.text_len)
        return self.table[ids]

    def nearest(self, latents: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> word ids (...) of the nearest table rows (Euclidean)."""
        flat = latents.float().reshape(-1, self.dim)
        return torch.cdist(flat, self.table.to(flat.device)).argmin(dim=1).reshape(latents.shape[:-1])

    def round(self, latents: torch.Tensor) -> torch.Tensor:
        """Every word vector replaced by its nearest table row (the clamping trick of Diffusion-LM)."""
        return self.table.to(latents.device, latents.dtype)[self.nearest(latents)]

    def decode(self, latents: torch.Tensor) -> list[str]:
        """(N, text_len, dim) -> N captions: the nearest word per position, up to the first <pad>."""
        ids = self.nearest(latents.cpu()).reshape(latents.shape[0], self.text_len).tolist()
        out = []
        for row in ids:
            words = row[: row.index(0)] if 0 in row else row
            out.append(" ".join(self.vocab[i] for i in words))
        return out


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, S, S) -> (N, (S / patch)^2, C patch^2), patches in row-major order."""
    n, c, h, w = x.shape
    if h % patch or w % patch:
        raise DataError(f"image side {h}x{w} is not divisible by patch {patch}")
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    """Inverse of patchify: (N, g^2, C patch^2) -> (N, C, g patch, g patch)."""
    n, k, _ = tokens.shape
    g = int(round(k**0.5))
    x = tokens.reshape(n, g, g, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels, g * patch, g * patch)


def images_to_unit(images: torch.Tensor) -> torch.Tensor:
    """float (N, 3, S, S) in [-1, 1] -> uint8 (N, S, S, 3) (what the judge and PNG writers take)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu()


__all__ = [
    "PAD",
    "TextCodec",
    "caption_words",
    "images_to_unit",
    "patchify",
    "unpatchify",
    "world_vocabulary",
]
