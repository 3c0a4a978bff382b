"""The latents the joint diffusion model denoises, all continuous.

Image, `image_latent: pixels`: the picture itself at `image_size` px in [-1, 1], cut into non-overlapping
p x p patches: (N, 3, S, S) <-> (N, (S / p)^2, 3 p^2) (`patchify` / `unpatchify`), exactly invertible.
Image, `image_latent: autoencoder`: `ImageAutoencoder`, a small conv autoencoder with one global latent vector
per image (normalised to zero mean, unit variance per entry, cut into a few tokens), trained on the run's
training images before the denoiser (Rombach et al. 2022's latent diffusion, arXiv:2112.10752, with a global
instead of a spatial latent). Its decoder's error enters the judged images.

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
import torch.nn.functional as F
from torch import nn

from ..data.synthetic import COLOURS, SHAPES, SIZES, TEMPLATES
from ..errors import ConfigError, DataError

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


class ImageAutoencoder(nn.Module):
    """(N, 3, S, S) in [-1, 1] <-> (N, tokens, latent_dim / tokens): a global latent vector per image.

    Encoder: three stride-2 conv4x4 (S -> S / 8, `channels`, 2x, 2x) with SiLU, flattened, one linear layer to
    latent_dim; the decoder mirrors it with transposed convs. `fit` trains both on images (MSE, with Gaussian
    noise of `noise` x the batch's latent std added to the latent, so the decoder tolerates the denoiser's
    imprecision) and then stores the per-entry mean / std of the training latents (buffers), which `encode`
    removes and `decode` restores."""

    def __init__(self, image_size: int = 32, latent_dim: int = 32, tokens: int = 4, channels: int = 32):
        super().__init__()
        if image_size % 8:
            raise ConfigError(f"the image autoencoder needs image_size divisible by 8; got {image_size}")
        if latent_dim % tokens:
            raise ConfigError(f"ae_latent_dim = {latent_dim} is not divisible by ae_tokens = {tokens}")
        c, g = channels, image_size // 8
        self.tokens, self.token_dim = tokens, latent_dim // tokens
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(2 * c, 2 * c, 4, 2, 1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * c * g * g, latent_dim),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 2 * c * g * g), nn.Unflatten(1, (2 * c, g, g)), nn.SiLU(),
            nn.ConvTranspose2d(2 * c, 2 * c, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(c, 3, 4, 2, 1),
        )  # fmt: skip
        self.register_buffer("mean", torch.zeros(latent_dim))
        self.register_buffer("std", torch.ones(latent_dim))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> normalised latents (N, tokens, token_dim)."""
        z = (self.encoder(images) - self.mean) / self.std
        return z.reshape(len(images), self.tokens, self.token_dim)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, tokens, token_dim) -> images (N, 3, S, S), not clamped."""
        return self.decoder(latents.flatten(1) * self.std + self.mean)

    def fit(
        self,
        images: torch.Tensor,
        steps: int,
        batch_size: int = 64,
        lr: float = 2e-3,
        noise: float = 0.1,
        seed: int = 0,
    ) -> float:
        """Train on `images` (N, 3, S, S) for `steps` steps (AdamW, one-cycle lr), then set the latent
        statistics from them; returns the reconstruction MSE of the last step. Leaves the module frozen."""
        gen = torch.Generator().manual_seed(seed)
        self.requires_grad_(True).train()
        params = [*self.encoder.parameters(), *self.decoder.parameters()]
        opt = torch.optim.AdamW(params, lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 2), pct_start=0.05)
        loss = torch.zeros(())
        for _ in range(steps):
            batch = images[torch.randint(0, len(images), (batch_size,), generator=gen)]
            z = self.encoder(batch)
            z = z + noise * z.detach().std(dim=0) * torch.randn(z.shape, generator=gen)
            loss = F.mse_loss(self.decoder(z), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        self.requires_grad_(False).eval()
        with torch.no_grad():
            z = torch.cat([self.encoder(c) for c in images.split(256)])
            self.mean.copy_(z.mean(dim=0))
            self.std.copy_(z.std(dim=0).clamp(min=1e-6))
        return float(loss.detach())


def images_to_unit(images: torch.Tensor) -> torch.Tensor:
    """float (N, 3, S, S) in [-1, 1] -> uint8 (N, S, S, 3) (what the judge and PNG writers take)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu()


__all__ = [
    "PAD",
    "ImageAutoencoder",
    "TextCodec",
    "caption_words",
    "images_to_unit",
    "patchify",
    "unpatchify",
    "world_vocabulary",
]
