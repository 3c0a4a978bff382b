#!/usr/bin/env python
"""Attention variants of the unified decoder on the same data and budget (issue 6 part 2; A7, seed 003:
modality-aware attention, sparse gating, hierarchical attention).

For each seed: a VQ-VAE (16x16 synthetic images, K=--codebook, 16 codes per image, 100 steps), a BPE text
tokenizer, and the task mixture (caption, text->image, VQA) of --samples scenes. Every variant trains the same
decoder size (--dim/--depth/--heads) from the same seed for --steps steps of --batch sequences (lr 3e-3,
cosine, the default recipe), then is scored on a fixed held-out batch of 48 sequences per task:

  dense           plain causal attention
  modality-aware  separate q/k/v, output and MLP weights per modality (MoMa-lite)
  hierarchical    the first depth/2 layers attend within the query's modality, the rest across modalities
  gated           a sparse modality gate in every layer (hard-sigmoid gates on the other modalities' keys)
  hier + gated    both

Reports per variant: held-out cross-entropy of each task's targets (caption text, image codes, VQA answers),
parameters, training seconds per step, and for gated variants the mean gate value and fraction of closed
(exactly zero) gates per query->key modality pair on the held-out batch. Writes --out/results.json and
--out/unified_variants.png (held-out ce per task, one bar group per variant, mean over seeds with each seed
as a dot). Seeds can run as separate processes (--seeds 1 --out A, --seeds 2 --out B) and be merged with
--merge A/results.json B/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mmfusion.unified.model import UnifiedConfig, UnifiedDecoder, unified_loss
from mmfusion.unified.sequences import UnifiedVocab, collate
from mmfusion.unified.train import UnifiedTrainConfig, synthetic_setup, train_unified, world_task_data

TASKS = ("caption", "image", "vqa")


def variants(depth: int) -> dict[str, dict]:
    half = max(1, depth // 2)
    return {
        "dense": {},
        "modality-aware": {"modality_aware": True},
        "hierarchical": {"hierarchical_layers": half},
        "gated": {"modality_gate": True},
        "hier + gated": {"hierarchical_layers": half, "modality_gate": True},
    }


def data(seed: int, samples: int, codebook: int):
    st = synthetic_setup(seed, 16, samples, dict(channels=16, codebook_size=codebook, code_dim=16), 100, 128)
    train = world_task_data(st.world, "train", samples, st.vqvae, st.builder)
    held = world_task_data(st.world, "test", 48, st.vqvae, st.builder, uncond_every=0)
    return st.vocab, train, held


@torch.no_grad()
def held_out_ce(model: UnifiedDecoder, held, vocab: UnifiedVocab) -> dict[str, float]:
    out = {}
    for task in TASKS:
        ids, mod, mask = collate(held.examples[task][:48], vocab.pad)
        out[task] = unified_loss(model(ids, mod).logits, ids, mod, mask, 0.0)["ce"].item()
    return out


def run(args) -> list[dict]:
    rows = []
    for seed in args.seeds:
        vocab, train, held = data(seed, args.samples, args.codebook)
        longest = max(len(s.ids) for t in train.examples.values() for s in t)
        mixed_ids, mixed_mod, _ = collate([s for t in TASKS for s in held.examples[t][:16]], vocab.pad)
        for name, kw in variants(args.depth).items():
            if args.variants and name not in args.variants:
                continue
            torch.manual_seed(seed)
            cfg = UnifiedConfig(
                vocab.size, dim=args.dim, depth=args.depth, heads=args.heads, max_len=longest + 8, **kw
            )
            model = UnifiedDecoder(cfg)
            tcfg = UnifiedTrainConfig(
                steps=args.steps, batch_size=args.batch, lr=3e-3, warmup_steps=args.steps // 20,
                log_every=max(1, args.steps // 10), seed=seed, device="cpu",
            )  # fmt: skip
            t0 = time.perf_counter()
            res = train_unified(model, train.examples, vocab, tcfg)
            seconds = time.perf_counter() - t0
            model.eval()
            row = {
                "variant": name,
                "seed": seed,
                "params": sum(p.numel() for p in model.parameters()),
                "s_per_step": seconds / args.steps,
                "train_ce": res.last["ce"],
                "held_ce": held_out_ce(model, held, vocab),
            }
            if cfg.modality_gate:
                row["gates"] = model.gate_openness(mixed_ids, mixed_mod)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["variant"] for r in rows))
    fig = Figure(figsize=(9, 3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(TASKS))
    for ax, task in zip(axes, TASKS):
        for i, name in enumerate(names):
            vals = [r["held_ce"][task] for r in rows if r["variant"] == name]
            ax.bar(i, np.mean(vals), color=f"C{i}")
            ax.plot([i] * len(vals), vals, "k.", ms=4)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"held-out ce: {task}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default 0 1 2")
    p.add_argument("--variants", nargs="+", help="only these variants (default: all five)")
    p.add_argument("--samples", type=int, default=512, help="training scenes (default 512)")
    p.add_argument("--codebook", type=int, default=64, help="VQ codes (default 64)")
    p.add_argument("--steps", type=int, default=600, help="decoder steps (default 600)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/unified_variants", help="folder for results.json and the plot")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="RESULTS_JSON",
        help="train nothing: merge the rows of these results.json files (e.g. one run per seed) into --out",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        rows = [r for path in args.merge for r in json.loads(Path(path).read_text())["rows"]]
    else:
        rows = run(args)
    plot(rows, out / "unified_variants.png")
    print("\n| variant | params | s/step | held-out ce caption / image / vqa (mean over seeds) |")
    print("|---|---|---|---|")
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        ce = " / ".join(f"{np.mean([r['held_ce'][t] for r in rs]):.3f}" for t in TASKS)
        print(f"| {name} | {rs[0]['params']:,} | {np.mean([r['s_per_step'] for r in rs]):.3f} | {ce} |")
    gated = [r for r in rows if "gates" in r]
    if gated:
        print("\n| variant | seed | " + " | ".join(k for k in gated[0]["gates"]) + " |")
        print("|---|---|" + "---|" * len(gated[0]["gates"]))
        for r in gated:
            print(
                f"| {r['variant']} | {r['seed']} | "
                + " | ".join(f"{v:.3f}" for v in r["gates"].values())
                + " |"
            )
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
