"""Training recipe of the unified model: the VQ image tokenizer, the text BPE, the mixed-task decoder, and the
model folder that holds all of them.

Model folder layout (written by `UnifiedBundle.save`, read by `UnifiedBundle.load`):
  decoder/          UnifiedDecoder.save_pretrained (config.json + model.safetensors)
  image_tokenizer/  VQVAE.save_pretrained
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

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.synthetic import SyntheticWorld, make_split
from ..errors import ConfigError, DataError
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
        "tokens_per_image": model.tokens_per_image
        * (model.config["rvq_levels"] if model.quantizer_type == "rvq" else 1),
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
    """Samples of a world split, their VQ codes (N, ...) and the task sequences built from them."""

    samples: list[dict[str, Any]]
    codes: torch.Tensor
    examples: dict[str, list[TokenSequence]]


def world_task_data(
    world: SyntheticWorld,
    split: str,
    n: int,
    vqvae: VQVAE,
    builder: SequenceBuilder,
    tasks: Sequence[str] = TASKS,
    uncond_every: int = 10,
    progress: bool = False,
) -> TaskData:
    """Samples 0..n-1 of `split` as sequences: one caption and one text->image sequence per sample, one
    VQA sequence per (question, answer) pair (so VQA has ~5x the examples: temperature mixing matters), and
    for every `uncond_every`-th sample (0 = none) an extra caption-less text->image sequence, so that the
    model learns the unconditional branch classifier-free guidance needs."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown tasks {unknown}; expected a subset of {list(TASKS)}")
    samples = make_split(world, split, n, ("image", "text", "vqa"), progress=progress)
    codes = encode_images(vqvae, images_to_tensor([s["image"] for s in samples]))
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
    return TaskData(samples, codes, examples)


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


@dataclass
class UnifiedBundle:
    """Everything generation needs: the decoder, its vocabulary, the text BPE and the VQ image tokenizer."""

    decoder: torch.nn.Module
    vocab: UnifiedVocab
    text_tokenizer: TextTokenizer
    vqvae: VQVAE

    @property
    def builder(self) -> SequenceBuilder:
        return SequenceBuilder(self.vocab, self.text_tokenizer)

    def save(self, directory: str | Path, train_info: Mapping[str, Any] | None = None) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.decoder.save_pretrained(d / "decoder")
        self.vqvae.save_pretrained(d / "image_tokenizer")
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
        bundle = cls(decoder, vocab, TextTokenizer.load(d / "text", context_length=64), vqvae)
        if decoder.cfg.vocab_size != vocab.size:
            raise DataError(
                f"{d}: decoder vocab_size {decoder.cfg.vocab_size} != vocab.json size {vocab.size}"
            )
        return bundle


__all__ = [
    "TaskData",
    "TrainResult",
    "UnifiedBundle",
    "UnifiedTrainConfig",
    "encode_images",
    "evaluate_vqvae",
    "images_to_tensor",
    "tensor_to_images",
    "train_text_tokenizer",
    "train_unified",
    "train_vqvae",
    "world_task_data",
]
