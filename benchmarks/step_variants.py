#!/usr/bin/env python
"""mmfusion's two-tower training step against variants of itself, alternated in one process (main .venv).

The model is the one a run config builds (default: configs/quickstart.yaml, the `make demo` model: conv stem,
patch 8, batch 128); `--set model.image.stem=patch --set model.image.patch_size=4 --batch-size 256` gives the
geometry of `benchmarks/train_throughput.py`'s default. The inputs are one fixed random batch reused every step
(`train_throughput.make_inputs`: images in [-1, 1], token ids with an EOT), so no data loading is timed. A
step is `zero_grad`, forward + InfoNCE loss, backward, AdamW step (CLIP's decay groups).

Each variant is timed against a fresh copy of the unchanged model with the same initial weights: after
`--warmup` untimed steps each, `--rounds` rounds of `--steps` steps, baseline then variant (A, B, A, B, ...).
Reported per variant: median samples/s of each side, the ratio of the medians and the median of the per-round
ratios (adjacent timings, so that ratio cancels bursts of load from other processes).

The baseline is mmfusion as it trains: attention over <= 128 keys on CPU as plain matmuls
(`mmfusion.layers.attention`); the optimizer is torch's default AdamW (multi-tensor loop) on both sides, so
`fused_adamw` shows what the Trainer's fused AdamW (`train.fused_optimizer`, on by default) adds.

Variants (`--variants`, default sdpa_attention sdpa_math fused_adamw; bf16 is `make bench-precision`):
  bf16              torch.autocast("cpu", bfloat16) over forward + loss, fp32 weights (train.precision: bf16)
  sdpa_attention    every attention through F.scaled_dot_product_attention (its flash kernel on CPU), as
                    before mmfusion's matmul path (switched only while the variant's steps run)
  sdpa_math         the same, with SDPA restricted to its math backend (sdpa_kernel(MATH))
  fused_adamw       torch.optim.AdamW(fused=True)
  compile           torch.compile(model); the compile time (first steps) is printed, not timed

It also prints the CPU's bf16 facts (what `mmfusion.train.precision` checks and what `auto` resolves to) and
the best of 5 (--peak-size)^2 matmuls in fp32 and bf16.

    .venv/bin/python benchmarks/step_variants.py --variants bf16 --rounds 4 --steps 3   # make bench-precision
    .venv/bin/python benchmarks/step_variants.py                                        # make bench-step-variants
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from mmfusion.train.optim import param_groups
from train_throughput import EOT_ID, PAD_ID, UNK_ID, make_inputs, matmul_peak

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("bf16", "sdpa_attention", "sdpa_math", "fused_adamw", "compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"), help="run config (model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS[1:4]), choices=VARIANTS)
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds (baseline, variant)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    p.add_argument("--threads", type=int, default=1, help="1: least disturbed on a shared machine")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--peak-size", type=int, default=1024, help="side of the square matmuls timed for the peaks"
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


# ---- the model -------------------------------------------------------------------------------------------
def build_model(model_cfg) -> nn.Module:
    """ContrastiveModel of `model_cfg` with a WordLevel tokenizer of exactly its vocabulary size."""
    from tokenizers import Tokenizer, models

    from mmfusion.modalities.text import EOT, PAD, UNK, TextTokenizer
    from mmfusion.models.contrastive import ContrastiveModel

    v = model_cfg.text.vocab_size
    vocab = {PAD: PAD_ID, UNK: UNK_ID, EOT: EOT_ID} | {f"w{i}": i for i in range(3, v)}
    tok = TextTokenizer(Tokenizer(models.WordLevel(vocab, unk_token=UNK)), model_cfg.text.context_length)
    return ContrastiveModel(model_cfg, tok)


@contextlib.contextmanager
def all_sdpa():
    """Route every `mmfusion.layers.attention` call to F.scaled_dot_product_attention."""
    from mmfusion import layers

    original = layers.MATMUL_ATTENTION_MAX_TOKENS
    layers.MATMUL_ATTENTION_MAX_TOKENS = 0
    try:
        yield
    finally:
        layers.MATMUL_ATTENTION_MAX_TOKENS = original


@contextlib.contextmanager
def sdpa_math():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with all_sdpa(), sdpa_kernel(SDPBackend.MATH):
        yield


class Side:
    """One model + optimizer + the context its steps run in; records samples/s per round."""

    def __init__(self, name: str, model: nn.Module, batch, lr: float, ctx=contextlib.nullcontext, **adamw):
        self.name, self.model, self.batch, self.ctx = name, model.train(), batch, ctx
        self.autocast = False
        self.opt = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.98), eps=1e-6, **adamw)
        self.rates: list[float] = []

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with self.ctx():
            if self.autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = self.model(self.batch).loss
            else:
                loss = self.model(self.batch).loss
            loss.backward()
        self.opt.step()

    def timed(self, steps: int, batch_size: int) -> None:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.rates.append(steps * batch_size / (time.perf_counter() - t0))


def make_variant(name: str, base: nn.Module, batch, lr: float) -> tuple[Side, float]:
    """(the variant's Side on a copy of `base`, seconds its first step took: torch.compile's compile time)."""
    model = copy.deepcopy(base)
    side = Side(name, model, batch, lr)
    if name == "bf16":
        side.autocast = True
    elif name == "sdpa_attention":
        side.ctx = all_sdpa
    elif name == "sdpa_math":
        side.ctx = sdpa_math
    elif name == "fused_adamw":
        side = Side(name, model, batch, lr, fused=True)
    elif name == "compile":
        side.model = torch.compile(model)
    t0 = time.perf_counter()
    side.step()
    return side, time.perf_counter() - t0


# ---- main --------------------------------------------------------------------------------------------------
def cpu_facts() -> dict:
    from mmfusion.train.precision import cpu_has_amx, cpu_has_native_bf16, resolve_precision

    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return {
        "cpu": name,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": bool(avx512_bf16),
        "amx": cpu_has_amx(),
        "native_bf16": cpu_has_native_bf16(),
        "auto_precision": resolve_precision("auto", torch.device("cpu")),
    }


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    from mmfusion.batch import Batch
    from mmfusion.config import load_config

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    batch_size = args.batch_size or cfg.train.batch_size
    m = cfg.model
    ns = SimpleNamespace(
        seed=args.seed,
        batch_size=batch_size,
        context_length=m.text.context_length,
        image_size=m.image.image_size,
        vocab_size=m.text.vocab_size,
    )
    images, ids = make_inputs(ns)
    ones = torch.ones(batch_size, dtype=torch.bool)
    batch = Batch({"image": images, "text": ids}, {"image": ones, "text": ones})
    torch.manual_seed(args.seed)
    base = build_model(m)
    facts = cpu_facts()
    peaks = {d: matmul_peak(args.peak_size, getattr(torch, d)) / 1e9 for d in ("float32", "bfloat16")}
    n_params = sum(p.numel() for p in base.parameters())
    log(f"torch {torch.__version__}, python {platform.python_version()}, {args.threads} threads")
    log(
        f"CPU: {facts['cpu']}; torch capability {facts['torch_cpu_capability']}; AVX512-BF16 "
        f"{'yes' if facts['avx512_bf16'] else 'no'}; AMX {'yes' if facts['amx'] else 'no'}; "
        f"train.precision auto -> {facts['auto_precision']}"
    )
    log(
        f"matmul {args.peak_size}^2, best of 5: fp32 {peaks['float32']:.1f} GFLOP/s, "
        f"bf16 {peaks['bfloat16']:.1f} GFLOP/s ({peaks['float32'] / peaks['bfloat16']:.1f}x slower)"
    )
    img = m.image
    log(
        f"model: {args.config} {' '.join(args.overrides)} (image {img.image_size}px {img.stem} stem patch "
        f"{img.patch_size}, {n_params:,} parameters); batch {batch_size}; {args.rounds} rounds x "
        f"{args.steps} steps per side after {args.warmup} warm-up steps"
    )
    log("")
    log("| variant | baseline samples/s | variant samples/s | ratio (medians) | median per-round ratio |")
    log("|---|---:|---:|---:|---:|")
    rows = []
    for name in args.variants:
        baseline = Side("baseline", copy.deepcopy(base), batch, args.lr)
        variant, first_step_s = make_variant(name, base, batch, args.lr)
        for s in (baseline, variant):
            for _ in range(args.warmup):
                s.step()
        for _ in range(args.rounds):
            for s in (baseline, variant):
                s.timed(args.steps, batch_size)
        b, v = statistics.median(baseline.rates), statistics.median(variant.rates)
        paired = statistics.median(y / x for x, y in zip(baseline.rates, variant.rates))
        note = f" (first step, compile included: {first_step_s:.0f} s)" if name == "compile" else ""
        log(f"| {name}{note} | {b:.1f} | {v:.1f} | {v / b:.3f} | {paired:.3f} |")
        rows.append(
            {
                "variant": name,
                "baseline_samples_per_s": baseline.rates,
                "variant_samples_per_s": variant.rates,
                "ratio_of_medians": v / b,
                "median_per_round_ratio": paired,
                "first_step_s": first_step_s,
            }
        )
    return {
        "command": " ".join(sys.argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "cpu": facts,
        "matmul_gflops": peaks,
        "params": n_params,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
