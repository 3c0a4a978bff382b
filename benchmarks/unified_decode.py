#!/usr/bin/env python
"""Unified decoder throughput (issue 6 parts 3 and 6): generation tokens/s with and without the KV cache, and
training tokens/s (forward + backward + AdamW step).

Model: UnifiedDecoder(vocab --vocab, dim --dim, depth --depth, heads --heads), random weights (speed does not
depend on them), fp32, seeded. Generation: batch --batch, a --prompt-token text prompt, greedy,
`generate(..., use_cache=True|False)` for each length in --new-tokens; tokens/s = batch * new tokens / wall
time (best of --repeats rounds, cache and no cache interleaved, after one warm-up). Without the cache every
step re-runs the whole sequence, so its cost grows with the square of the length and the ratio grows with
--new-tokens. Training: --train-batch sequences of --train-len mixed tokens (half text, half image),
--train-steps timed steps after one warm-up step.

Writes --json (rows + settings) and --plot (tokens/s against new tokens), prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial

import torch

from mmfusion.unified.generation import SamplingConfig, generate
from mmfusion.unified.model import IMAGE, TEXT, UnifiedConfig, UnifiedDecoder, unified_loss


def best_of_rounds(fns: dict, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds per call of each fn, interleaved round by round after one warm-up each (on a
    shared, loaded machine the minimum over interleaved rounds is the least disturbed figure)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def generate_and_sync(model, prompt, prompt_mod, n: int, use_cache: bool) -> None:
    generate(model, prompt, prompt_mod, n, SamplingConfig("greedy"), use_cache=use_cache)
    sync(prompt.device)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--image-window", type=int, default=None, help="sliding window over image tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="unified_decode.json")
    p.add_argument("--plot", default="unified_decode.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    max_len = max(args.prompt_tokens + max(args.new_tokens), args.train_len)
    cfg = UnifiedConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        max_len=max_len,
        image_window=args.image_window,
    )
    torch.manual_seed(0)
    model = UnifiedDecoder(cfg).to(device)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt_tokens), generator=g).to(device)
    prompt_mod = torch.full_like(prompt, TEXT)

    rows = []
    for n in args.new_tokens:
        row = {"new_tokens": n}
        fns = {
            "cache": partial(generate_and_sync, model, prompt, prompt_mod, n, True),
            "no_cache": partial(generate_and_sync, model, prompt, prompt_mod, n, False),
        }
        row |= {name: args.batch * n / s for name, s in best_of_rounds(fns, args.repeats).items()}
        row["speedup"] = row["cache"] / row["no_cache"]
        rows.append(row)
        print(
            f"new tokens {n}: {row['cache']:.1f} tok/s with cache, {row['no_cache']:.1f} without "
            f"({row['speedup']:.2f}x)",
            flush=True,
        )

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.train_batch, args.train_len), generator=g).to(device)
    mod = torch.full_like(ids, TEXT)
    mod[:, args.train_len // 2 :] = IMAGE
    mask = torch.ones_like(ids, dtype=torch.bool)

    def step():
        out = model(ids, mod)
        loss = unified_loss(out.logits, ids, mod, mask, cfg.z_loss)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)

    step()
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    train_tps = args.train_batch * args.train_len * args.train_steps / (time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())

    print(
        f"\nUnifiedDecoder dim {args.dim} depth {args.depth} heads {args.heads} vocab {args.vocab} "
        f"({n_params / 1e6:.2f} M params), {device}, {args.threads} thread(s), batch {args.batch}, "
        f"prompt {args.prompt_tokens}, greedy"
    )
    print("| new tokens | tokens/s with KV cache | tokens/s without | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['new_tokens']} | {r['cache']:.1f} | {r['no_cache']:.1f} | {r['speedup']:.2f}x |")
    print(
        f"\ntraining (forward + backward + AdamW), batch {args.train_batch} x {args.train_len} tokens: "
        f"{train_tps:.0f} tokens/s"
    )
    result = {
        "settings": vars(args)
        | {"params": n_params, "torch": torch.__version__, "cpu": platform.processor()},
        "generation": rows,
        "train_tokens_per_s": train_tps,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [r["new_tokens"] for r in rows]
        ax.plot(xs, [r["cache"] for r in rows], "o-", label="KV cache")
        ax.plot(xs, [r["no_cache"] for r in rows], "s-", label="no cache (recompute)")
        ax.set_xlabel("new tokens")
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"UnifiedDecoder d{args.dim} L{args.depth}, {device}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return result


if __name__ == "__main__":
    main()
