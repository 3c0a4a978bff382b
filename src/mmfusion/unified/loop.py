"""The unified decoder's own training loop (`train_unified`), kept for the stability and quality benchmarks
(benchmarks/unified*.py) and the tests that calibrate against them; runs go through the common Trainer
instead (`mmfusion.unified.recipe`, `model.kind: unified`).

AdamW (matrices decayed, as mmfusion.train; eps 1e-8, torch's default), linear warm-up then cosine
(mmfusion.train.trainer.lr_lambda), gradient clipping, batches drawn by `MixedBatches` (temperature task
mixing, one sequential seeded stream). Every `log_every` steps it logs the total ce, the text and image ce,
their token-weighted mean (equal to the total ce: every trained token is text or image), the z-loss, mean
|log Z| and the largest attention logit of the step's forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..train.precision import autocast, resolve_precision
from ..train.rng import seed_everything
from ..train.trainer import lr_lambda, param_groups, resolve_device
from .sequences import MixedBatches, TokenSequence, UnifiedVocab


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


__all__ = ["TrainResult", "UnifiedTrainConfig", "train_unified"]
