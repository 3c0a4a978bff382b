"""Training recipe of the unified model: the VQ image tokenizer, the text BPE, the mixed-task decoder, and the
model folder that holds all of them.

Model folder layout (written by `UnifiedBundle.save`, read by `UnifiedBundle.load`):
  decoder/          UnifiedDecoder.save_pretrained (config.json + model.safetensors)
  image_tokenizer/  VQVAE.save_pretrained
  audio_tokenizer/  optional: an audio VQVAE + frontend.json, as `mmfusion tokenize train --modality audio`
                    writes it (folders without it load with no audio tokenizer)
  text/             tokenizer.json (TextTokenizer)
  vocab.json        UnifiedVocab
  train.json        the training config and the last logged metrics

The decoder loop (`train_unified`): AdamW (matrices decayed, as mmfusion.train), linear warm-up then cosine
(mmfusion.train.trainer.lr_lambda), gradient clipping, batches drawn by `MixedBatches` (temperature task
mixing). Every `log_every` steps it logs the total ce, the text and image ce, their token-weighted mean
(equal to the total ce: every trained token is text or image), the z-loss, mean |log Z| and the largest
attention logit of the step's forward pass.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.synthetic import COLOURS, SHAPES, SIZES, TEMPLATES, SyntheticWorld, make_split
from ..errors import ConfigError, DataError
from ..modalities.audio import AudioFrontEnd
from ..modalities.text import TextTokenizer
from ..models.vq import VQVAE, psnr
from ..train.precision import autocast, resolve_precision
from ..train.rng import seed_everything
from ..train.trainer import lr_lambda, param_groups, resolve_device
from .sequences import TASKS, MixedBatches, SequenceBuilder, TokenSequence, UnifiedVocab

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
) -> SyntheticSetup:
    """The recipe the unified tests and benchmarks share: `n` train scenes of SyntheticWorld(seed, image_size),
    a BPE of `text_vocab` ids on their captions, and VQVAE(image_size, dead_code_threshold, **vq_kwargs) built
    after torch.manual_seed(seed) and trained `vq_steps` steps of 32 images (`train_vqvae`, same seed)."""
    from ..data.synthetic import WorldConfig

    world = SyntheticWorld(WorldConfig(seed=seed, image_size=image_size))
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


# ---- the decoder loop ------------------------------------------------------------------------------------


@dataclass
class UnifiedTrainConfig:
    """Settings of `train_unified`; z_loss None = the decoder config's z_loss."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    z_loss: float | None = None
    temperature: float = 1.0
    seed: int = 0
    log_every: int = 10
    device: str = "auto"
    precision: str = "fp32"
    progress: bool = False

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "warmup_steps": self.warmup_steps >= 0,
            "grad_clip": self.grad_clip >= 0,
            "temperature": self.temperature > 0,
            "log_every": self.log_every >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                f"UnifiedTrainConfig: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}"
            )
        if self.z_loss is not None and self.z_loss < 0:
            raise ConfigError(f"UnifiedTrainConfig.z_loss must be >= 0; got {self.z_loss}")


@dataclass
class TrainResult:
    """Logged rows (one per `log_every` steps, plus the last step) and the run's totals."""

    history: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    max_attn_logit: float = 0.0  # over all steps

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1]


def _mean_row(rows: list[dict[str, float]]) -> dict[str, float]:
    """Token-weighted means of per-step losses over the rows since the last log."""
    n_text = sum(r["n_text"] for r in rows)
    n_image = sum(r["n_image"] for r in rows)
    out = {k: sum(r[k] for r in rows) / len(rows) for k in ("loss", "ce", "z_loss", "log_z_abs", "grad_norm")}
    out["max_attn_logit"] = max(r["max_attn_logit"] for r in rows)
    out["ce_text"] = sum(r["ce_text"] * r["n_text"] for r in rows) / max(n_text, 1)
    out["ce_image"] = sum(r["ce_image"] * r["n_image"] for r in rows) / max(n_image, 1)
    out["n_text"], out["n_image"] = n_text, n_image
    # the token-weighted mean of the per-modality ce over the same steps: equals the token-weighted ce
    out["ce_weighted"] = (out["ce_text"] * n_text + out["ce_image"] * n_image) / max(n_text + n_image, 1)
    out["ce_tokens"] = sum(r["ce"] * (r["n_text"] + r["n_image"]) for r in rows) / max(n_text + n_image, 1)
    out["image_ppl"] = math.exp(min(out["ce_image"], 50.0))
    return out


def train_unified(
    model: torch.nn.Module,
    examples: Mapping[str, Sequence[TokenSequence]],
    vocab: UnifiedVocab,
    cfg: UnifiedTrainConfig | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `model` (a UnifiedDecoder) on batches mixed over the tasks of `examples`; returns the log."""
    import time

    from .model import unified_loss

    cfg = cfg or UnifiedTrainConfig()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model.to(device).train()
    z_weight = model.cfg.z_loss if cfg.z_loss is None else cfg.z_loss
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    batches = iter(MixedBatches(examples, cfg.batch_size, vocab.pad, cfg.temperature, cfg.seed))
    result, pending = TrainResult(), []
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="train unified", unit="step")
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        ids, mod, mask = (t.to(device) for t in next(batches))
        with autocast(precision, device):
            out = model(ids, mod)
        losses = unified_loss(out.logits.float(), ids, mod, mask, z_loss=z_weight)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        gn = torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        )
        opt.step()
        sched.step()
        result.tokens += int(ids.numel())
        row = {k: float(v.detach()) for k, v in losses.items()}
        row["max_attn_logit"] = float(out.max_attn_logit)
        row["grad_norm"] = float(gn)
        result.max_attn_logit = max(result.max_attn_logit, row["max_attn_logit"])
        pending.append(row)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logged = {"step": step + 1, "lr": sched.get_last_lr()[0], **_mean_row(pending)}
            result.history.append(logged)
            pending = []
            if log is not None:
                log(logged)
            if bar is not None:
                bar.set_postfix(ce=f"{logged['ce']:.3f}", img=f"{logged['ce_image']:.3f}")
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result


# ---- the model folder ------------------------------------------------------------------------------------


def code_count(vq: VQVAE) -> int:
    """Vocabulary tokens one input of `vq` becomes (grid cells x residual levels)."""
    return vq.tokens_per_image * (vq.config["rvq_levels"] if vq.quantizer_type == "rvq" else 1)


def save_audio_tokenizer(vq: VQVAE, frontend: AudioFrontEnd, directory: str | Path) -> Path:
    """Write an audio tokenizer folder as `mmfusion tokenize train --modality audio` does (VQVAE + frontend.json)."""
    from .tokenize_cli import FRONTEND_FILE

    out = Path(vq.save_pretrained(directory))
    (out / FRONTEND_FILE).write_text(json.dumps({"modality": "audio", **frontend.to_dict()}, indent=2) + "\n")
    return out


def load_audio_tokenizer(directory: str | Path) -> tuple[VQVAE, AudioFrontEnd]:
    """(VQVAE, AudioFrontEnd) of an audio tokenizer folder; DataError when it is an image tokenizer."""
    from .tokenize_cli import FRONTEND_FILE, _tokenizer

    vq, frontend = _tokenizer(str(directory))
    if frontend is None:
        raise DataError(
            f"{directory} has no {FRONTEND_FILE}: an image tokenizer, not an audio one "
            "(make one with `mmfusion tokenize train --modality audio`)"
        )
    return vq, frontend


@dataclass
class UnifiedBundle:
    """Everything generation needs: the decoder, its vocabulary, the text BPE, the VQ image tokenizer and,
    optionally, the audio tokenizer (VQVAE over AudioFrontEnd spectrograms)."""

    decoder: torch.nn.Module
    vocab: UnifiedVocab
    text_tokenizer: TextTokenizer
    vqvae: VQVAE
    audio_vqvae: VQVAE | None = None
    audio_frontend: AudioFrontEnd | None = None

    def __post_init__(self) -> None:
        if (self.audio_vqvae is None) != (self.audio_frontend is None):
            raise ConfigError("UnifiedBundle: give audio_vqvae and audio_frontend together (or neither)")
        want = (0, 0)
        if self.audio_vqvae is not None:
            want = (self.audio_vqvae.codebook_size, code_count(self.audio_vqvae))
        if (self.vocab.n_audio, self.vocab.tokens_per_audio) != want:
            raise ConfigError(
                f"UnifiedBundle: vocab has n_audio={self.vocab.n_audio}, tokens_per_audio="
                f"{self.vocab.tokens_per_audio}; the audio tokenizer needs {want} "
                f"({'none given' if self.audio_vqvae is None else 'codebook size, codes per clip'})"
            )

    @property
    def builder(self) -> SequenceBuilder:
        return SequenceBuilder(self.vocab, self.text_tokenizer)

    def save(self, directory: str | Path, train_info: Mapping[str, Any] | None = None) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.decoder.save_pretrained(d / "decoder")
        self.vqvae.save_pretrained(d / "image_tokenizer")
        if self.audio_vqvae is not None:
            save_audio_tokenizer(self.audio_vqvae, self.audio_frontend, d / "audio_tokenizer")
        (d / "text").mkdir(exist_ok=True)
        self.text_tokenizer.save(d / "text")
        self.vocab.save(d / "vocab.json")
        if train_info is not None:
            (d / "train.json").write_text(json.dumps(dict(train_info), indent=2, default=str) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> UnifiedBundle:
        from .model import UnifiedDecoder

        d = Path(directory)
        missing = [p for p in ("decoder", "image_tokenizer", "text", "vocab.json") if not (d / p).exists()]
        if missing:
            raise DataError(
                f"{d} is not a unified model folder: missing {', '.join(missing)} "
                "(make one with `mmfusion train-unified --out DIR`)"
            )
        vocab = UnifiedVocab.load(d / "vocab.json")
        decoder = UnifiedDecoder.from_pretrained(d / "decoder").to(map_location).eval()
        vqvae = VQVAE.from_pretrained(d / "image_tokenizer", map_location=map_location)
        audio: tuple[VQVAE | None, AudioFrontEnd | None] = (None, None)
        if (d / "audio_tokenizer").exists():
            audio = load_audio_tokenizer(d / "audio_tokenizer")
            audio[0].to(map_location)
        if decoder.cfg.vocab_size != vocab.size:
            raise DataError(
                f"{d}: decoder vocab_size {decoder.cfg.vocab_size} != vocab.json size {vocab.size}"
            )
        try:
            return cls(decoder, vocab, TextTokenizer.load(d / "text", context_length=64), vqvae, *audio)
        except ConfigError as err:
            raise DataError(f"{d}: {err}") from None


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
