#!/usr/bin/env python
"""Training throughput of mmfusion's two-tower CLIP model against OpenCLIP on the identical architecture.

Both sides get the same widths, depths, heads, MLP ratio, patch size, image size, context length,
vocabulary size and embedding size; the same batch (one fixed set of random input tensors, reused every
step, so no data loading is timed); the same precision (fp32, or bf16 autocast with fp32 weights); the
same loss (symmetric InfoNCE with a learnable logit scale); the same optimizer (AdamW with CLIP's
decay/no-decay parameter groups) and the same thread count. OpenCLIP's model even starts from
mmfusion's weights (copied tensor by tensor), and before timing the script checks that both models
give the same loss on the same batch, which pins down that the two architectures really are one.

Inputs: images uniform in [-1, 1] of shape (B, 3, S, S); token ids (B, L) where row i holds random
content ids in [3, V) at positions 0 .. e_i - 1, the EOT id 2 at a random position e_i in [1, L - 1],
and padding id 0 after it. mmfusion pools the text tower at (ids != 0).sum(1) - 1 and OpenCLIP's
text tower is built with pool_type='eos', eos_id=2; both therefore pool at the EOT token, and both use
a causal mask.

Each side trains the way its framework sets a training process up. `--process-setup own` (the default) runs
each model in its own worker process: mmfusion's applies what mmfusion's Trainer applies on CPU
(`mmfusion.train.runtime.reuse_freed_memory`, and `mmfusion.train.optim.adamw`: fused AdamW), OpenCLIP's is
a plain process with `torch.optim.AdamW` as OpenCLIP's training script builds it. `--process-setup shared`
runs both models in this one process with the C library's default allocator (no mmfusion process setting), so
the two ratios separate what the model code gains from what the process setting gains. Either way the parent
alternates the two: after warm-up steps (not timed) it runs `--rounds` rounds of `--steps` training steps
each, mmfusion then OpenCLIP (A, B, A, B, ...; the idle worker waits on a pipe), and reports the median
samples/s of each and the ratio mmfusion / OpenCLIP. FLOPs per training sample come from
torch.utils.flop_counter.FlopCounterMode over one forward + backward divided by the batch size, and
the model-FLOPs utilisation (MFU) is achieved FLOP/s over the FLOP/s of a large square fp32 matmul
measured on the same thread count.

OpenCLIP (`open_clip_torch`) is a benchmark-only dependency: run this from the `.venv-bench`
environment that `make bench-env` creates (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PAD_ID, UNK_ID, EOT_ID = 0, 1, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training samples/s of mmfusion's CLIP-style model vs OpenCLIP on the identical architecture.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("architecture (defaults: the quickstart model)")
    g.add_argument("--image-size", type=int, default=32)
    g.add_argument("--patch-size", type=int, default=4)
    g.add_argument("--vision-width", type=int, default=128)
    g.add_argument("--vision-depth", type=int, default=3)
    g.add_argument("--vision-heads", type=int, default=4)
    g.add_argument("--context-length", type=int, default=32)
    g.add_argument("--text-width", type=int, default=128)
    g.add_argument("--text-depth", type=int, default=3)
    g.add_argument("--text-heads", type=int, default=4)
    g.add_argument("--vocab-size", type=int, default=1000)
    g.add_argument("--embed-dim", type=int, default=128)
    g.add_argument("--mlp-ratio", type=float, default=4.0)
    t = p.add_argument_group("training step and timing")
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast, fp32 weights"
    )
    t.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads for both models and the peak"
    )
    t.add_argument("--rounds", type=int, default=8, help="alternating rounds (A, B per round)")
    t.add_argument("--steps", type=int, default=8, help="timed training steps per model per round")
    t.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per model")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul timed for the peak")
    t.add_argument(
        "--process-setup",
        choices=["own", "shared"],
        default="own",
        help="own: each model in its own process, set up as its framework does (mmfusion: "
        "reuse_freed_memory); shared: both in this process, default allocator",
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON here")
    o.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile N steps of each model with torch.profiler and print the top ops",
    )
    o.add_argument("--profile-rows", type=int, default=25)
    args = p.parse_args(argv)
    if args.image_size % args.patch_size:
        p.error(f"--image-size {args.image_size} is not divisible by --patch-size {args.patch_size}")
    if args.vision_width % args.vision_heads or args.text_width % args.text_heads:
        p.error("widths must be divisible by their head counts")
    if args.vocab_size < 16 or args.context_length < 4:
        p.error("--vocab-size must be >= 16 and --context-length >= 4 (mmfusion's config limits)")
    return args


# ---- inputs ------------------------------------------------------------------------------------------
def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [-1, 1] and token ids: content ids in [3, V), EOT (2) at a random position, 0 after."""
    gen = torch.Generator().manual_seed(args.seed)
    b, n = args.batch_size, args.context_length
    images = torch.rand(b, 3, args.image_size, args.image_size, generator=gen) * 2.0 - 1.0
    ids = torch.randint(3, args.vocab_size, (b, n), generator=gen)
    eot = torch.randint(1, n, (b,), generator=gen)  # EOT position in [1, L-1]: at least one content token
    pos = torch.arange(n)[None, :]
    ids = torch.where(pos < eot[:, None], ids, torch.zeros_like(ids))
    ids[torch.arange(b), eot] = EOT_ID
    return images.contiguous(), ids.contiguous()


# ---- the two models ----------------------------------------------------------------------------------
def build_mmfusion(args: argparse.Namespace) -> nn.Module:
    from tokenizers import Tokenizer, models

    from mmfusion.config import ImageConfig, ModelConfig, TextConfig
    from mmfusion.modalities.text import EOT, PAD, UNK, TextTokenizer
    from mmfusion.models.contrastive import ContrastiveModel

    # A WordLevel vocabulary of exactly V entries, with mmfusion's special ids [PAD]=0, [UNK]=1, [EOT]=2.
    vocab = {PAD: PAD_ID, UNK: UNK_ID, EOT: EOT_ID} | {f"w{i}": i for i in range(3, args.vocab_size)}
    tokenizer = TextTokenizer(Tokenizer(models.WordLevel(vocab, unk_token=UNK)), args.context_length)
    assert tokenizer.vocab_size == args.vocab_size and tokenizer.eot_id == EOT_ID
    config = ModelConfig(
        embed_dim=args.embed_dim,
        text=TextConfig(
            vocab_size=args.vocab_size,
            context_length=args.context_length,
            width=args.text_width,
            depth=args.text_depth,
            heads=args.text_heads,
            mlp_ratio=args.mlp_ratio,
        ),
        image=ImageConfig(
            image_size=args.image_size,
            patch_size=args.patch_size,
            width=args.vision_width,
            depth=args.vision_depth,
            heads=args.vision_heads,
            mlp_ratio=args.mlp_ratio,
        ),
        loss="infonce",
    )
    return ContrastiveModel(config, tokenizer)


def build_openclip(args: argparse.Namespace) -> nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=args.vision_depth,
        width=args.vision_width,
        head_width=args.vision_width // args.vision_heads,
        mlp_ratio=args.mlp_ratio,
        patch_size=args.patch_size,
        image_size=args.image_size,
    )
    text = CLIPTextCfg(
        context_length=args.context_length,
        vocab_size=args.vocab_size,
        width=args.text_width,
        heads=args.text_heads,
        layers=args.text_depth,
        mlp_ratio=args.mlp_ratio,
        pad_id=PAD_ID,
        eos_id=EOT_ID,
        pool_type="eos",  # pool at the EOT token, as mmfusion ('argmax' assumes EOT is the largest id)
        no_causal_mask=False,
        proj_bias=False,
        proj_type="linear",
    )
    return CLIP(
        args.embed_dim,
        vision_cfg=vision,
        text_cfg=text,
        quick_gelu=False,
        init_logit_scale=math.log(1 / 0.07),
    )


def copy_mmfusion_into_openclip(mm: nn.Module, oc: nn.Module) -> None:
    """Load mmfusion's weights into the OpenCLIP model; every tensor of both sides must be used exactly once."""
    src = {k: v.detach() for k, v in mm.state_dict().items()}
    dst: dict[str, torch.Tensor] = {}

    def blocks(prefix_src: str, prefix_dst: str) -> None:
        names = {
            "ln_1": "ln_1",
            "ln_2": "ln_2",
            "attn.out": "attn.out_proj",
            "mlp.fc1": "mlp.c_fc",
            "mlp.fc2": "mlp.c_proj",
        }
        i = 0
        while f"{prefix_src}.{i}.ln_1.weight" in src:
            s, d = f"{prefix_src}.{i}", f"{prefix_dst}.{i}"
            for a, b in names.items():
                for leaf in ("weight", "bias"):
                    dst[f"{d}.{b}.{leaf}"] = src.pop(f"{s}.{a}.{leaf}")
            dst[f"{d}.attn.in_proj_weight"] = src.pop(f"{s}.attn.qkv.weight")
            dst[f"{d}.attn.in_proj_bias"] = src.pop(f"{s}.attn.qkv.bias")
            i += 1

    im, tx = "image_encoder", "text_encoder"
    dst["visual.conv1.weight"] = src.pop(f"{im}.patch_embed.weight")
    dst["visual.class_embedding"] = src.pop(f"{im}.class_embedding")
    dst["visual.positional_embedding"] = src.pop(f"{im}.positional_embedding")
    for ln in ("ln_pre", "ln_post"):
        for leaf in ("weight", "bias"):
            dst[f"visual.{ln}.{leaf}"] = src.pop(f"{im}.{ln}.{leaf}")
    dst["visual.proj"] = src.pop(f"{im}.proj.weight").t().contiguous()
    blocks(f"{im}.transformer.blocks", "visual.transformer.resblocks")
    dst["token_embedding.weight"] = src.pop(f"{tx}.token_embedding.weight")
    dst["positional_embedding"] = src.pop(f"{tx}.positional_embedding")
    for leaf in ("weight", "bias"):
        dst[f"ln_final.{leaf}"] = src.pop(f"{tx}.ln_final.{leaf}")
    dst["text_projection"] = src.pop(f"{tx}.proj.weight").t().contiguous()
    blocks(f"{tx}.transformer.blocks", "transformer.resblocks")
    dst["logit_scale"] = src.pop("logit_scale").reshape(oc.logit_scale.shape)
    if src:
        raise RuntimeError(f"mmfusion tensors with no OpenCLIP counterpart: {sorted(src)}")
    oc.load_state_dict(dst, strict=True)  # strict: every OpenCLIP tensor was filled


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- one training step per side ----------------------------------------------------------------------
@dataclass
class Side:
    name: str
    model: nn.Module
    loss_fn: Callable[[str], torch.Tensor]  # precision -> forward + loss (under that precision's autocast)
    precision: str = "fp32"
    after_step: Callable[[], None] = lambda: None
    optimizer: torch.optim.Optimizer | None = None
    rates: list[float] = field(default_factory=list)  # samples/s of each round
    # process CPU time / (wall time x threads) of each round: ~100% unless other processes competed
    cpu_share: list[float] = field(default_factory=list)

    embed: Callable[[], tuple[torch.Tensor, torch.Tensor]] = lambda: (torch.zeros(0), torch.zeros(0))

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn(self.precision).backward()
        self.optimizer.step()
        self.after_step()

    def outputs(self) -> dict[str, Any]:
        """fp32, no grad: the normalised image and text embeddings and the loss on the benchmark batch."""
        with torch.no_grad():
            image, text = self.embed()
            return {"image": image, "text": text, "loss": self.loss_fn("fp32").item()}


def autocast_ctx(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_sides(args: argparse.Namespace, images: torch.Tensor, ids: torch.Tensor) -> tuple[Side, Side]:
    from open_clip.loss import ClipLoss

    from mmfusion.batch import Batch
    from mmfusion.train.optim import adamw, param_groups  # CLIP's decay rule, for both sides

    torch.manual_seed(args.seed)
    mm = build_mmfusion(args).train()
    oc = build_openclip(args).train()
    copy_mmfusion_into_openclip(mm, oc)
    ones = torch.ones(images.shape[0], dtype=torch.bool)
    batch = Batch({"image": images, "text": ids}, {"image": ones, "text": ones})
    clip_loss = ClipLoss()

    def mm_loss(precision: str) -> torch.Tensor:
        with autocast_ctx(precision):
            return mm(batch).loss

    def oc_loss(precision: str) -> torch.Tensor:
        with autocast_ctx(precision):
            img, txt, scale = oc(images, ids)
            return clip_loss(img.float(), txt.float(), scale)

    def oc_clamp() -> None:  # OpenCLIP's training loop clamps the logit scale after each step
        with torch.no_grad():
            oc.logit_scale.clamp_(0, math.log(100))

    sides = (
        Side("mmfusion", mm, mm_loss, args.precision),
        Side("OpenCLIP", oc, oc_loss, args.precision, oc_clamp),
    )
    sides[0].embed = lambda: (mm.embed_image_tensor(images), mm.embed_text_ids(ids))
    sides[1].embed = lambda: (oc.encode_image(images, normalize=True), oc.encode_text(ids, normalize=True))
    # each framework's optimizer: mmfusion's Trainer builds it with mmfusion.train.optim.adamw (fused where the
    # parameters allow), OpenCLIP's training script with torch.optim.AdamW; both with CLIP's decay groups
    sides[0].optimizer = adamw(param_groups(mm, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    sides[1].optimizer = torch.optim.AdamW(
        param_groups(oc, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6
    )
    return sides


def check_parity(mm: dict[str, Any], oc: dict[str, Any]) -> dict[str, float]:
    """Same weights + same batch -> the same embeddings and loss (`Side.outputs` of each), or the comparison
    is void."""
    out = {
        "max_abs_diff_image_embedding": (mm["image"] - oc["image"]).abs().max().item(),
        "max_abs_diff_text_embedding": (mm["text"] - oc["text"]).abs().max().item(),
        "loss_mmfusion": mm["loss"],
        "loss_openclip": oc["loss"],
    }
    emb_diff = max(out["max_abs_diff_image_embedding"], out["max_abs_diff_text_embedding"])
    if emb_diff > 1e-4 or abs(mm["loss"] - oc["loss"]) > 1e-4 * max(1.0, abs(mm["loss"])):
        raise RuntimeError(f"the two models do not compute the same function: {out}")
    return out


# ---- measurements --------------------------------------------------------------------------------------
def flops_per_sample(side: Side, batch_size: int) -> float:
    """FLOPs of one forward + backward (FlopCounterMode: matmuls, convs, attention) divided by the batch.
    mmfusion's attention is counted as SDPA (as OpenCLIP's): its CPU matmul path computes the same function,
    but the counter's formulas for SDPA and for plain matmuls differ."""
    from mmfusion import layers

    side.optimizer.zero_grad(set_to_none=True)
    matmul_max, layers.MATMUL_ATTENTION_MAX_TOKENS = layers.MATMUL_ATTENTION_MAX_TOKENS, 0
    try:
        with FlopCounterMode(display=False) as counter:
            side.loss_fn(side.precision).backward()
    finally:
        layers.MATMUL_ATTENTION_MAX_TOKENS = matmul_max
    side.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def matmul_peak(n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` (n x n) @ (n x n) matmuls on the current thread count."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def time_steps(side: Side, steps: int, batch_size: int, threads: int) -> None:
    """Run `steps` training steps; record samples/s and how much of `threads` cores the process got."""
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        side.step()
    wall = time.perf_counter() - t0
    side.rates.append(steps * batch_size / wall)
    side.cpu_share.append((time.process_time() - c0) / (wall * threads))


def profile(side: Side, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            side.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ---- where each side runs: this process, or a worker process set up as its framework does ----------------
def handle(side: Side, args: argparse.Namespace, cmd: str, arg: int = 0) -> Any:
    if cmd == "outputs":
        return side.outputs()
    if cmd == "params":
        return n_params(side.model)
    if cmd == "flops":
        return flops_per_sample(side, args.batch_size)
    if cmd == "warmup":  # allocator, oneDNN primitive caches, optimizer state
        for _ in range(arg):
            side.step()
        return None
    if cmd == "round":
        time_steps(side, args.steps, args.batch_size, args.threads)
        return side.rates[-1], side.cpu_share[-1]
    if cmd == "profile":
        return profile(side, arg, args.profile_rows)
    raise ValueError(cmd)


def worker(name: str, args: argparse.Namespace, conn) -> None:
    """A worker process for one side: set up as that side's framework sets up a training process."""
    torch.set_num_threads(args.threads)
    if name == "mmfusion":
        from mmfusion.train.runtime import reuse_freed_memory  # what mmfusion's Trainer does on CPU

        reuse_freed_memory()
    images, ids = make_inputs(args)
    side = {s.name: s for s in make_sides(args, images, ids)}[name]  # both built: OpenCLIP copies the weights
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            return
        try:
            conn.send(("ok", handle(side, args, cmd, arg)))
        except Exception as e:  # noqa: BLE001 - reported by the parent
            conn.send(("error", f"{type(e).__name__}: {e}"))


class Local:
    def __init__(self, side: Side, args: argparse.Namespace):
        self.name, self.side, self.args = side.name, side, args

    def call(self, cmd: str, arg: int = 0) -> Any:
        return handle(self.side, self.args, cmd, arg)

    def close(self) -> None:
        pass


class Remote:
    def __init__(self, name: str, args: argparse.Namespace):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(name, args, child), daemon=True, name=f"bench-{name}")
        self.proc.start()

    def call(self, cmd: str, arg: int = 0) -> Any:
        self.conn.send((cmd, arg))
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.name} worker, {cmd}: {value}")
        return value

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("stop", 0))
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


# ---- main ------------------------------------------------------------------------------------------------
def fmt_int(n: float) -> str:
    return f"{n:,.0f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import open_clip
    except ImportError:
        print(
            "open_clip is not importable: run this from the benchmark venv (`make bench-env`, then "
            "`.venv-bench/bin/python benchmarks/train_throughput.py`)",
            file=sys.stderr,
        )
        return 2
    import mmfusion  # noqa: F401  (fail early with a clear error when mmfusion is not installed)

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.process_setup == "own":
        runners = [Remote("mmfusion", args), Remote("OpenCLIP", args)]
    else:
        images, ids = make_inputs(args)
        runners = [Local(s, args) for s in make_sides(args, images, ids)]
    sides = [SimpleNamespace(name=r.name, rates=[], cpu_share=[]) for r in runners]
    try:
        parity = check_parity(*(r.call("outputs") for r in runners))
        params = {r.name: r.call("params") for r in runners}
        flops = {r.name: r.call("flops") for r in runners}
        peak_fp32 = matmul_peak(args.peak_size, torch.float32)
        peak_bf16 = matmul_peak(args.peak_size, torch.bfloat16) if args.precision == "bf16" else None
        for r in runners:
            r.call("warmup", args.warmup)
        for _ in range(args.rounds):
            for r, s in zip(runners, sides):  # A, B, A, B, ...
                rate, share = r.call("round")
                s.rates.append(rate)
                s.cpu_share.append(share)
        profiles = {r.name: r.call("profile", args.profile) for r in runners} if args.profile else {}
    finally:
        for r in runners:
            r.close()

    med = {s.name: statistics.median(s.rates) for s in sides}
    ratio = med["mmfusion"] / med["OpenCLIP"]
    # Each round's two timings are adjacent in time, so their ratio cancels slow drifts and bursts of
    # load from other processes that can hit one round of a shared machine.
    paired = statistics.median(a / b for a, b in zip(sides[0].rates, sides[1].rates))
    mfu = {n: flops[n] * med[n] / peak_fp32 for n in med}
    mfu_bf16 = {n: flops[n] * med[n] / peak_bf16 for n in med} if peak_bf16 else None

    arch = (
        f"vision {args.image_size}px/p{args.patch_size} w{args.vision_width} d{args.vision_depth} "
        f"h{args.vision_heads}; text L{args.context_length} V{args.vocab_size} w{args.text_width} "
        f"d{args.text_depth} h{args.text_heads}; embed {args.embed_dim}; mlp x{args.mlp_ratio:g}"
    )
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, python {platform.python_version()}")
    print(f"{arch}; batch {args.batch_size}; {args.precision}; {args.threads} threads")
    print(
        "process setup: "
        + (
            "own (each model in its own process; mmfusion's with reuse_freed_memory, as its Trainer)"
            if args.process_setup == "own"
            else "shared (both models in one process, default allocator)"
        )
    )
    print(
        f"{args.rounds} alternating rounds x {args.steps} steps per model ({args.warmup} warm-up steps excluded); "
        f"parity: loss {parity['loss_mmfusion']:.6f} vs {parity['loss_openclip']:.6f}, "
        f"max |emb diff| {max(parity['max_abs_diff_image_embedding'], parity['max_abs_diff_text_embedding']):.1e}"
    )
    print(f"fp32 matmul peak ({args.peak_size}^2, {args.threads} threads): {peak_fp32 / 1e9:.1f} GFLOP/s")
    if peak_bf16:
        print(f"bf16 matmul peak ({args.peak_size}^2, {args.threads} threads): {peak_bf16 / 1e9:.1f} GFLOP/s")
    print()
    head = f"{'model':<10} {'params':>10} {'MFLOP/sample':>13} {'samples/s (median)':>19} {'min..max':>15} {'MFU fp32':>9}"
    head += f" {'MFU bf16':>9}" if mfu_bf16 else ""
    print(head)
    print("-" * len(head))
    for s in sides:
        row = (
            f"{s.name:<10} {fmt_int(params[s.name]):>10} {flops[s.name] / 1e6:>13.1f} {med[s.name]:>19.1f} "
            f"{f'{min(s.rates):.0f}..{max(s.rates):.0f}':>15} {100 * mfu[s.name]:>8.1f}%"
        )
        row += f" {100 * mfu_bf16[s.name]:>8.1f}%" if mfu_bf16 else ""
        print(row)
    print()
    diff = params["mmfusion"] - params["OpenCLIP"]
    print(f"parameter counts {'match' if diff == 0 else f'differ by {diff:+d}'}")
    print(f"ratio mmfusion / OpenCLIP (median samples/s): {ratio:.3f}")
    print(f"median of the per-round ratios: {paired:.3f}")
    print("per round samples/s (mmfusion / OpenCLIP), cpu share of the threads:")
    for r, (a, b) in enumerate(zip(sides[0].rates, sides[1].rates)):
        print(
            f"  round {r + 1}: {a:7.1f} / {b:7.1f} = {a / b:.3f}   "
            f"cpu {100 * sides[0].cpu_share[r]:.0f}% / {100 * sides[1].cpu_share[r]:.0f}%"
        )
    elapsed = time.perf_counter() - t_start

    for name, table in profiles.items():
        print(f"\n== torch.profiler, {args.profile} training steps of {name} (self CPU time) ==")
        print(table)

    if args.json:
        result = {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "python": platform.python_version(),
            "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
            "parity": parity,
            "params": params,
            "flops_per_sample": flops,
            "matmul_peak_flops": {"fp32": peak_fp32, "bf16": peak_bf16},
            "samples_per_s": {s.name: s.rates for s in sides},
            "median_samples_per_s": med,
            "ratio_mmfusion_over_openclip": ratio,
            "median_per_round_ratio": paired,
            "cpu_share": {s.name: s.cpu_share for s in sides},
            "mfu_fp32_peak": mfu,
            "mfu_bf16_peak": mfu_bf16,
            "elapsed_s": elapsed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
