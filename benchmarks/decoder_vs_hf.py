#!/usr/bin/env python
"""UnifiedDecoder vs Hugging Face transformers' LlamaForCausalLM on the same architecture and weights (issue 19
part 2): training, prefill and KV-cache decode tokens/s, ours vs transformers, timed in the same run.

The decoder is LLaMA-shaped (`mlp="swiglu"`, `qk_norm=False`, RMSNorm, rotate-half RoPE, no biases, tied
embeddings; mmfusion.unified.hf_llama) with random seeded weights, which `to_llama` copies into a
LlamaForCausalLM (sdpa attention). Before any timing the two must give the same logits on a random batch
(max |diff| printed; the script exits 1 above --tolerance).

Timed, each pair interleaved round by round (ours, then transformers, --rounds rounds after one warm-up) so
both see the same machine load; figures are the median over rounds, and the ratio is the median of the
per-round ratios ours / transformers:
  train    forward + backward + AdamW step on --train-batch x --train-len tokens; both models' logits go
           through the same next-token cross-entropy (`next_token_loss`, transformers' own shifted-labels
           form), so the two sides differ only in the model
  prefill  no-grad forward of --prefill-batch x --prefill-len tokens, returning logits and the KV cache
  decode   greedy generation of --new-tokens tokens after a --prompt-tokens prompt at each --batch, KV cache
           on both sides: ours `generate(..., use_cache=True)`, transformers
           `generate(do_sample=False, max_new_tokens=n, min_new_tokens=n)`; tokens/s = batch * n / time.
           The generated tokens are compared (identical greedy paths = the same work).
  cache    ours with the KV cache vs ours recomputing the whole sequence every step (`use_cache=False`),
           at each --recompute-batch.

    .venv/bin/python benchmarks/decoder_vs_hf.py --json runs/bench/decoder_vs_hf.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from mmfusion.unified.generation import generate
from mmfusion.unified.hf_llama import to_llama
from mmfusion.unified.model import TEXT, UnifiedConfig, UnifiedDecoder


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each fn for `rounds` rounds, the fns alternating within a round, after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def compare(label: str, work: float, times: dict[str, list[float]], a: str, b: str) -> dict:
    """Row: median tokens/s of a and b (work tokens per call) and the median per-round ratio a / b."""
    ratio = statistics.median(tb / ta for ta, tb in zip(times[a], times[b], strict=True))
    row = {
        "what": label,
        a: work / statistics.median(times[a]),
        b: work / statistics.median(times[b]),
        "ratio": ratio,
        "rounds_s": times,
    }
    print(f"{label}: {a} {row[a]:.0f} tok/s, {b} {row[b]:.0f} tok/s, {a}/{b} {ratio:.2f}x", flush=True)
    return row


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (batch, T, vocab) at t against ids[t + 1], as transformers'
    ForCausalLMLoss computes it (labels shifted and padded with the ignore index; the logits are not sliced)."""
    labels = F.pad(ids, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mlp-ratio", type=float, default=2.75)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--recompute-batch", type=int, nargs="*", default=[1])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |logit diff| allowed before timing")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    max_len = max(args.prompt_tokens + args.new_tokens, args.train_len, args.prefill_len)
    cfg = UnifiedConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        mlp_ratio=args.mlp_ratio,
        max_len=max_len,
        qk_norm=False,
        mlp="swiglu",
        z_loss=0.0,
    )
    torch.manual_seed(0)
    ours = UnifiedDecoder(cfg).eval()
    hf = to_llama(ours)
    g = torch.Generator().manual_seed(0)
    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"LLaMA-shaped decoder: dim {args.dim}, depth {args.depth}, heads {args.heads}, SwiGLU hidden "
        f"{int(args.dim * args.mlp_ratio)}, vocab {args.vocab}, {n_params / 1e6:.2f} M params, fp32, "
        f"{args.threads} thread(s); torch {torch.__version__}, transformers {transformers.__version__}; "
        f"load average {loadavg()}",
        flush=True,
    )

    ids = torch.randint(0, args.vocab, (4, 64), generator=g)
    with torch.no_grad():
        diff = (ours(ids, torch.full_like(ids, TEXT)).logits - hf(ids).logits).abs().max().item()
    print(f"parity: max |logit diff| = {diff:.3g} on a 4 x 64 random batch", flush=True)
    if not diff <= args.tolerance:
        print(f"refusing to time: the logits differ by more than --tolerance {args.tolerance}")
        sys.exit(1)

    rows = []
    # ---- training: fwd + bwd + AdamW ---------------------------------------------------------------------
    tr_ids = torch.randint(0, args.vocab, (args.train_batch, args.train_len), generator=g)
    tr_mod = torch.full_like(tr_ids, TEXT)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def train_ours():
        loss = next_token_loss(ours(tr_ids, tr_mod, attn_logit=False).logits, tr_ids)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def train_hf():
        loss = next_token_loss(hf(tr_ids).logits, tr_ids)
        opt_hf.zero_grad(set_to_none=True)
        loss.backward()
        opt_hf.step()

    ours.train(), hf.train()
    with torch.no_grad():  # the same loss before any step: the training path agrees too
        l_ours = next_token_loss(ours(tr_ids, tr_mod, attn_logit=False).logits, tr_ids).item()
        l_hf = hf(tr_ids, labels=tr_ids).loss.item()  # transformers' own loss, as a check on next_token_loss
    print(f"training loss before the first step: ours {l_ours:.6f}, transformers {l_hf:.6f}", flush=True)
    times = interleaved({"ours": train_ours, "transformers": train_hf}, args.rounds)
    rows.append(
        compare(f"train {args.train_batch}x{args.train_len}", tr_ids.numel(), times, "ours", "transformers")
    )
    ours.eval(), hf.eval()

    # ---- prefill ---------------------------------------------------------------------------------------------
    pf_ids = torch.randint(0, args.vocab, (args.prefill_batch, args.prefill_len), generator=g)
    pf_mod = torch.full_like(pf_ids, TEXT)

    @torch.no_grad()
    def prefill_ours():
        ours(pf_ids, pf_mod, use_cache=True, attn_logit=False)

    @torch.no_grad()
    def prefill_hf():
        hf(pf_ids, use_cache=True)

    times = interleaved({"ours": prefill_ours, "transformers": prefill_hf}, args.rounds)
    rows.append(
        compare(
            f"prefill {args.prefill_batch}x{args.prefill_len}", pf_ids.numel(), times, "ours", "transformers"
        )
    )

    # ---- decode ------------------------------------------------------------------------------------------------
    n = args.new_tokens
    for b in args.batch:
        prompt = torch.randint(0, args.vocab, (b, args.prompt_tokens), generator=g)
        mod = torch.full_like(prompt, TEXT)
        mask = torch.ones_like(prompt)
        out: dict[str, torch.Tensor] = {}

        def dec_ours(prompt=prompt, mod=mod, out=out):
            out["ours"] = generate(ours, prompt, mod, n, use_cache=True)

        @torch.no_grad()
        def dec_hf(prompt=prompt, mask=mask, out=out):
            out["transformers"] = hf.generate(
                prompt, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n
            )[:, prompt.shape[1] :]

        times = interleaved({"ours": dec_ours, "transformers": dec_hf}, args.rounds)
        row = compare(f"decode batch {b}, {n} new tokens (KV cache)", b * n, times, "ours", "transformers")
        row["same_tokens"] = bool(torch.equal(out["ours"], out["transformers"]))
        print(f"  same generated tokens: {row['same_tokens']}")
        rows.append(row)

    for b in args.recompute_batch:
        prompt = torch.randint(0, args.vocab, (b, args.prompt_tokens), generator=g)
        mod = torch.full_like(prompt, TEXT)
        fns = {
            "cache": lambda prompt=prompt, mod=mod: generate(ours, prompt, mod, n, use_cache=True),
            "recompute": lambda prompt=prompt, mod=mod: generate(ours, prompt, mod, n, use_cache=False),
        }
        times = interleaved(fns, max(1, args.rounds - 1))
        rows.append(
            compare(
                f"ours batch {b}, {n} new tokens: KV cache vs recompute", b * n, times, "cache", "recompute"
            )
        )

    print(f"\nload average after the run: {loadavg()}")
    print("| what | ours tok/s | peer tok/s | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        a, b = ("ours", "transformers") if "ours" in r else ("cache", "recompute")
        peer = "transformers" if b == "transformers" else "ours, recompute"
        print(f"| {r['what']} | {r[a]:.0f} | {r[b]:.0f} ({peer}) | {r['ratio']:.2f}x |")
    result = {
        "settings": vars(args)
        | {
            "params": n_params,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu": platform.processor(),
            "parity_max_abs_diff": diff,
        },
        "rows": rows,
    }
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
