"""The unified model's ingredients: the VQ image tokenizer recipe (`train_vqvae`), the text BPE, and the
synthetic world's task data (`world_task_data`, `synthetic_setup`) that the tests and benchmarks share.

The model folder lives in `mmfusion.unified.bundle` and the benchmarks' own decoder loop in
`mmfusion.unified.loop`; both are re-exported here, where callers have always found them. Runs train
through the common Trainer (`mmfusion.unified.recipe`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.synthetic import COLOURS, SHAPES, SIZES, TEMPLATES, SyntheticWorld, make_split
from ..errors import ConfigError, DataError
from ..modalities.audio import AudioFrontEnd
from ..modalities.text import TextTokenizer
from ..models.vq import VQVAE, psnr
from .bundle import UnifiedBundle, code_count, load_audio_tokenizer, save_audio_tokenizer
from .loop import TrainResult, UnifiedTrainConfig, train_unified
from .sequences import TASKS, SequenceBuilder, TokenSequence, UnifiedVocab

# ---- the image tokenizer ---------------------------------------------------------------------------------


def images_to_tensor(images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1] (the VQVAE's input range)."""
    arr = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise DataError(f"expected uint8 images (N, H, W, 3); got {arr.dtype} {tuple(arr.shape)}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((x.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def train_vqvae(
    model: VQVAE,
    images: torch.Tensor,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> VQVAE:
    """Adam on MSE + commitment over random batches of `images` (N, 3, S, S) in [-1, 1] (the recipe of
    benchmarks/vq.py); returns the model in eval mode."""
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps and batch size must be >= 1; got {steps}, {batch_size}")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="train tokenizer", unit="step")
    for _ in range(steps):
        batch = images[torch.randint(0, images.shape[0], (batch_size,), generator=gen)]
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if bar is not None:
            bar.update()
            bar.set_postfix(mse=f"{out.recon_loss.item():.4f}")
    if bar is not None:
        bar.close()
    return model.eval()


@torch.no_grad()
def evaluate_vqvae(model: VQVAE, images: torch.Tensor) -> dict[str, float]:
    """Held-out codebook usage, perplexity (absolute and / K), PSNR (dB) and tokens per image."""
    model.eval()
    recon, idx = [], []
    for chunk in images.split(128):
        o = model(chunk)
        recon.append(o.recon)
        idx.append(o.indices)
    stats = model.quantizer.usage_stats(torch.cat(idx))
    return {
        "usage": stats["usage"],
        "perplexity": stats["perplexity"],
        "normalized_perplexity": stats["normalized_perplexity"],
        "psnr": psnr(torch.cat(recon), images),
        "tokens_per_image": code_count(model),
        "codebook_size": model.codebook_size,
    }


@torch.no_grad()
def encode_images(model: VQVAE, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, S, S) in [-1, 1] -> codes (N, h, w) ((N, h, w, L) for rvq), in eval mode."""
    model.eval()
    return torch.cat([model.encode(c) for c in images.split(batch_size)])


# ---- data ------------------------------------------------------------------------------------------------


def train_text_tokenizer(samples: Sequence[Mapping[str, Any]], vocab_size: int = 256) -> TextTokenizer:
    """BPE over the samples' captions, VQA questions and answers."""
    texts = [s["text"] for s in samples]
    texts += [t for s in samples for qa in s.get("vqa", []) for t in (qa["question"], qa["answer"])]
    return TextTokenizer.train(texts, vocab_size=vocab_size, context_length=64)


@dataclass
class TaskData:
    """Samples of a world split, their VQ codes (N, ...), their audio codes (N, ...; None without an audio
    tokenizer) and the task sequences built from them."""

    samples: list[dict[str, Any]]
    codes: torch.Tensor
    examples: dict[str, list[TokenSequence]]
    audio_codes: torch.Tensor | None = None


def world_task_data(
    world: SyntheticWorld,
    split: str,
    n: int,
    vqvae: VQVAE,
    builder: SequenceBuilder,
    tasks: Sequence[str] | None = None,
    uncond_every: int = 10,
    progress: bool = False,
    audio_vqvae: VQVAE | None = None,
    audio_frontend: AudioFrontEnd | None = None,
) -> TaskData:
    """Samples 0..n-1 of `split` as sequences: one caption and one text->image sequence per sample, one
    VQA sequence per (question, answer) pair (so VQA has ~5x the examples: temperature mixing matters), and
    for every `uncond_every`-th sample (0 = none) an extra caption-less text->image sequence, so that the
    model learns the unconditional branch classifier-free guidance needs.

    With an audio tokenizer (`audio_vqvae` and the `audio_frontend` that makes its input), each sample also
    gives one audio_caption sequence: the scene's clip (one tone per object, left to right; colour -> pitch)
    with the scene's caption as target. tasks None = every task the given tokenizers allow."""
    if (audio_vqvae is None) != (audio_frontend is None):
        raise ConfigError("world_task_data: give audio_vqvae and audio_frontend together (or neither)")
    if tasks is None:
        tasks = [t for t in TASKS if t != "audio_caption" or audio_vqvae is not None]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown tasks {unknown}; expected a subset of {list(TASKS)}")
    audio = "audio_caption" in tasks
    if audio and audio_vqvae is None:
        raise ConfigError("the audio_caption task needs an audio tokenizer (audio_vqvae + audio_frontend)")
    modalities = ("image", "text", "vqa", "audio") if audio else ("image", "text", "vqa")
    samples = make_split(world, split, n, modalities, progress=progress)
    codes = encode_images(vqvae, images_to_tensor([s["image"] for s in samples]))
    audio_codes = None
    if audio:
        spec = audio_frontend([s["audio"] for s in samples], [s["audio_sr"] for s in samples])
        audio_codes = encode_images(audio_vqvae, spec)
    examples: dict[str, list[TokenSequence]] = {t: [] for t in tasks}
    for i, (s, c) in enumerate(zip(samples, codes)):
        if "caption" in examples:
            examples["caption"].append(builder.caption(c, s["text"]))
        if "image" in examples:
            examples["image"].append(builder.image(s["text"], c))
            if uncond_every and i % uncond_every == 0:
                examples["image"].append(builder.image(None, c))
        if "vqa" in examples:
            examples["vqa"].extend(builder.vqa(c, qa["question"], qa["answer"]) for qa in s["vqa"])
        if audio:
            examples["audio_caption"].append(builder.audio_caption(audio_codes[i], s["text"]))
    return TaskData(samples, codes, examples, audio_codes)


@dataclass
class SyntheticSetup:
    """A synthetic world with what a small unified model needs from it: its training samples, a BPE text
    tokenizer and a VQ-VAE trained on them, the vocabulary and the sequence builder."""

    world: SyntheticWorld
    samples: list[dict[str, Any]]
    text_tokenizer: TextTokenizer
    vqvae: VQVAE
    vocab: UnifiedVocab
    builder: SequenceBuilder


def synthetic_setup(
    seed: int,
    image_size: int,
    n: int,
    vq_kwargs: Mapping[str, Any],
    vq_steps: int,
    text_vocab: int,
    dead_code_threshold: float = 3.0,
    object_count_probs: Sequence[float] | None = None,
) -> SyntheticSetup:
    """The recipe the unified tests and benchmarks share: `n` train scenes of SyntheticWorld(seed, image_size),
    a BPE of `text_vocab` ids on their captions, and VQVAE(image_size, dead_code_threshold, **vq_kwargs) built
    after torch.manual_seed(seed) and trained `vq_steps` steps of 32 images (`train_vqvae`, same seed).
    object_count_probs: the world's (1, 2, 3)-object probabilities (None: the world's default)."""
    from ..data.synthetic import WorldConfig

    counts = {} if object_count_probs is None else {"object_count_probs": tuple(object_count_probs)}
    world = SyntheticWorld(WorldConfig(seed=seed, image_size=image_size, **counts))
    samples = make_split(world, "train", n, ("image", "text", "vqa"))
    tok = train_text_tokenizer(samples, text_vocab)
    torch.manual_seed(seed)
    vq = VQVAE(image_size=image_size, dead_code_threshold=dead_code_threshold, **vq_kwargs)
    train_vqvae(vq, images_to_tensor([s["image"] for s in samples]), steps=vq_steps, batch_size=32, seed=seed)
    vocab = UnifiedVocab(tok.vocab_size, vq.codebook_size, vq.tokens_per_image)
    return SyntheticSetup(world, samples, tok, vq, vocab, SequenceBuilder(vocab, tok))


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z ]+", " ", text.lower()).split())


@functools.cache
def _template_patterns() -> list[tuple[int, re.Pattern]]:
    """(objects, regex) of every caption template of the synthetic world, on punctuation-free words."""
    out = []
    for n, templates in TEMPLATES.items():
        for t in templates:
            words = re.sub(r"[^a-z{}0-9 ]+", " ", t).split()
            rx = " ".join(
                rf"(?P<o{w[1]}>[a-z]+ [a-z]+ [a-z]+)" if re.fullmatch(r"\{\d\}", w) else re.escape(w)
                for w in words
            )
            out.append((n, re.compile(rx)))
    return out


def parse_caption(caption: str) -> tuple[tuple[str, str, str], ...] | None:
    """The (size, colour, shape) objects, left to right, that a caption in one of the synthetic world's
    templates states; None when it follows no template or names an unknown attribute."""
    words = _words(caption)
    for n, pattern in _template_patterns():
        m = pattern.fullmatch(words)
        if m is None:
            continue
        objs = tuple(tuple(m.group(f"o{k}").split()) for k in range(n))
        if all(s in SIZES and c in COLOURS and sh in SHAPES for s, c, sh in objs):
            return objs
    return None


__all__ = [
    "TaskData",
    "TrainResult",
    "UnifiedBundle",
    "UnifiedTrainConfig",
    "code_count",
    "encode_images",
    "evaluate_vqvae",
    "images_to_tensor",
    "load_audio_tokenizer",
    "parse_caption",
    "save_audio_tokenizer",
    "tensor_to_images",
    "train_text_tokenizer",
    "train_unified",
    "train_vqvae",
    "world_task_data",
]
