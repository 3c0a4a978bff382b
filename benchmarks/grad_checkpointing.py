#!/usr/bin/env python
"""Peak memory and time per training step of the two-tower model with and without gradient checkpointing (T8).

For each size (width x depth, the same for both towers) the script builds one seeded ContrastiveModel and
trains it on one fixed random batch (images uniform in [-1, 1], random token ids ending in the EOT id),
first with `Transformer.grad_checkpointing` off in every encoder, then on. A step is forward + backward +
AdamW step, run after zero_grad(set_to_none=True); warm-up steps (which also create the optimizer state)
are not measured.

Peak memory is the largest amount of memory allocated during one step beyond what was allocated when the
step began (parameters, optimizer state and the batch are therefore not counted; activations, gradients
and temporaries are; the previous step's gradients are already freed):
  * CUDA: torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated() at the step start, after
    torch.cuda.reset_peak_memory_stats(); the caching allocator's reserve is not counted.
  * CPU: torch has no CPU allocator statistics and tracemalloc does not see torch's allocations, so the
    step runs once under torch.profiler with profile_memory=True; every allocation and free that the CPU
    allocator reports is replayed in time order and the peak of the running sum is taken. This counts
    bytes of live tensors exactly (no malloc caching or RSS noise). It reads the profiler's event tree
    (`kineto_results.experimental_event_tree()`), an experimental torch API.
Time per step is the median over `--steps` steps run before the profiled one (CUDA synchronised around
each step); on a shared machine it is noisy, memory is not.

The loss of the measured step is printed for both settings: checkpointing recomputes the same blocks, so it
must not change (tests/train/test_grad_checkpointing.py checks loss and gradients bitwise).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mmfusion.config import ModelConfig
from mmfusion.layers import set_grad_checkpointing
from mmfusion.models.contrastive import ContrastiveModel

EOT_ID = 2  # padding 0, unknown 1, end of text 2 (mmfusion.modalities.text)


class RandomTokenizer:
    """Just enough tokenizer for ContrastiveModel's constructor: the benchmark feeds token ids directly."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Peak memory and time per training step with vs without gradient checkpointing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--sizes",
        default="128x3,256x6,384x8",
        help="comma-separated WIDTHxDEPTH for both towers (heads = width / 64, at least 2)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--context-length", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per setting")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    try:
        args.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
        if any(len(s) != 2 or min(s) < 1 for s in args.sizes):
            raise ValueError
    except ValueError:
        p.error(f"--sizes must look like 128x3,256x6 (WIDTHxDEPTH), got {args.sizes!r}")
    return args


def build(args: argparse.Namespace, width: int, depth: int, device: torch.device) -> ContrastiveModel:
    heads = max(2, width // 64)
    tower = {"width": width, "depth": depth, "heads": heads}
    cfg = ModelConfig.model_validate(
        {
            "embed_dim": args.embed_dim,
            "text": {**tower, "context_length": args.context_length, "vocab_size": args.vocab_size},
            "image": {**tower, "image_size": args.image_size, "patch_size": args.patch_size},
        }
    )
    torch.manual_seed(0)
    return ContrastiveModel(cfg, RandomTokenizer(args.vocab_size)).to(device).train()


def make_batch(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    b, length = args.batch_size, args.context_length
    images = torch.rand(b, 3, args.image_size, args.image_size, generator=g) * 2 - 1
    ids = torch.randint(3, args.vocab_size, (b, length), generator=g)
    eot = torch.randint(1, length, (b,), generator=g)  # EOT position; padding (0) after it
    pos = torch.arange(length)
    ids = torch.where(pos < eot[:, None], ids, torch.zeros_like(ids))
    ids[torch.arange(b), eot] = EOT_ID
    return {"image": images.to(device), "text": ids.to(device)}


def cpu_peak_bytes(step: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Run `step` under the profiler; peak of the running sum of CPU allocations minus frees."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = step()
    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(allocs):
        live += size
        peak = max(peak, live)
    return peak, loss


def cuda_peak_bytes(step: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start, loss


def measure(args: argparse.Namespace, width: int, depth: int, on: bool, device: torch.device) -> dict:
    model = build(args, width, depth, device)
    set_grad_checkpointing(model, on)
    batch = make_batch(args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> torch.Tensor:  # callers zero the gradients first, so a step starts with none allocated
        loss = model(batch).loss
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(args.warmup):
        opt.zero_grad(set_to_none=True)
        step()
    times = []
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # the profiled step comes after the timed ones, so no profiler state can slow them
    opt.zero_grad(set_to_none=True)
    peak, loss = (cuda_peak_bytes if device.type == "cuda" else cpu_peak_bytes)(step)
    params = sum(p.numel() for p in model.parameters())
    return {"peak": peak, "time": statistics.median(times), "loss": loss.item(), "params": params}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = torch.device("cpu" if name == "auto" else name)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"torch {torch.__version__}, batch {args.batch_size}, image {args.image_size}/{args.patch_size}, "
        f"context {args.context_length}; peak = memory allocated during one step beyond its start"
    )
    header = (
        f"{'size':>8} {'params':>8} | {'peak MiB off':>12} {'on':>9} {'on/off':>7} | "
        f"{'ms/step off':>11} {'on':>9} {'on/off':>7} | loss off = on"
    )
    print(header)
    print("-" * len(header))
    for width, depth in args.sizes:
        off = measure(args, width, depth, False, device)
        on = measure(args, width, depth, True, device)
        mib = 2**20
        print(
            f"{f'{width}x{depth}':>8} {off['params'] / 1e6:>7.2f}M | "
            f"{off['peak'] / mib:>12.1f} {on['peak'] / mib:>9.1f} {on['peak'] / off['peak']:>7.2f} | "
            f"{off['time'] * 1e3:>11.1f} {on['time'] * 1e3:>9.1f} {on['time'] / off['time']:>7.2f} | "
            f"{off['loss']:.6f} {'=' if off['loss'] == on['loss'] else '!='} {on['loss']:.6f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
