#!/usr/bin/env python
"""The unified model's two training paths compared (issue 15): the benchmarks' own loop
(`mmfusion.unified.loop.train_unified`) against a run through the common Trainer (`mmfusion.unified.recipe.
fit_unified`, what `mmfusion train` with model.kind: unified and `mmfusion train-unified` do), per seed.

Both get the same tokenizers (the quality benchmark's: an FSQ VQ-VAE trained --vq-steps steps and a 256-id BPE,
from `synthetic_setup`; the Trainer path is handed them as folders), the same decoder (dim/depth/heads, max_len
= the longest training sequence + 48, initialised after torch.manual_seed(seed)) and the same recipe (AdamW
0.9/0.95, weight decay 0.01 on matrices, warm-up --steps/20 then cosine to 0.1x, clip 1, batch --batch,
temperature-1 task mixing, fp32, one thread). What differs: AdamW eps (1e-8 in the loop, the Trainer's 1e-6)
and the draws of the task mixture (one sequential stream in the loop; a stream seeded per step in the
Trainer's data, which makes resume exact). Each model is scored by `mmfusion.unified.evaluate.evaluate_unified`
on --eval held-out test scenes: captioning BLEU / ROUGE-L / CIDEr (greedy; references: all templates of the
scene) and VQA exact match, as benchmarks/unified.py --part quality scores them.

    .venv/bin/python benchmarks/unified_recipe.py --seeds 0 1 2 --out runs/unified_recipe
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mmfusion.config import TrainConfig
from mmfusion.data.loader import ListDataset
from mmfusion.data.synthetic import make_split
from mmfusion.unified.config import UnifiedModelConfig
from mmfusion.unified.evaluate import evaluate_unified
from mmfusion.unified.model import UnifiedConfig, UnifiedDecoder
from mmfusion.unified.recipe import fit_unified
from mmfusion.unified.train import (
    UnifiedBundle,
    UnifiedTrainConfig,
    synthetic_setup,
    train_unified,
    world_task_data,
)

METRICS = ("caption_bleu", "caption_rouge_l", "caption_cider", "vqa_exact_match")


def run_seed(seed: int, args: argparse.Namespace, out: Path) -> list[dict]:
    vq_kw = dict(channels=32, quantizer="fsq", codebook_size=256, code_dim=32)
    st = synthetic_setup(seed, 32, args.samples, vq_kw, args.vq_steps, 256)
    train = world_task_data(st.world, "train", args.samples, st.vqvae, st.builder)
    test = ListDataset(make_split(st.world, "test", args.eval, ("image", "text", "vqa")))
    max_len = max(len(s.ids) for t in train.examples.values() for s in t) + 48
    warmup, log_every = args.steps // 20, max(1, args.steps // 20)
    rows = []

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    decoder = UnifiedDecoder(
        UnifiedConfig(st.vocab.size, dim=args.dim, depth=args.depth, heads=args.heads, max_len=max_len)
    )
    cfg = UnifiedTrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=warmup,
                             log_every=log_every, seed=seed, device="cpu")  # fmt: skip
    res = train_unified(decoder, train.examples, st.vocab, cfg)
    bundle = UnifiedBundle(decoder.eval(), st.vocab, st.text_tokenizer, st.vqvae)
    rows.append(
        {"path": "loop", "seed": seed, "final_ce": res.last["ce"], "train_s": time.perf_counter() - t0}
    )
    rows[-1].update(evaluate_unified(bundle, test))

    t0 = time.perf_counter()
    folder = out / f"seed{seed}"
    bundle.save(folder / "tokenizers")  # the same VQ-VAE and BPE, as folders
    model = UnifiedModelConfig(
        width=args.dim, depth=args.depth, heads=args.heads, max_len=max_len,
        image_tokenizer={"path": str(folder / "tokenizers" / "image_tokenizer")},
        text_tokenizer=str(folder / "tokenizers" / "text"),
    )  # fmt: skip
    tcfg = TrainConfig(
        steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=warmup, log_every=log_every,
        weight_decay=0.01, betas=(0.9, 0.95), min_lr_ratio=0.1, grad_clip=1.0, precision="fp32",
        device="cpu", checkpoint_every=args.steps, progress=False,
    )  # fmt: skip
    last = fit_unified(model, tcfg, ListDataset(st.samples), folder / "run", seed=seed, log=lambda m: None)
    trained = UnifiedBundle.load(folder / "run")
    rows.append(
        {"path": "trainer", "seed": seed, "final_ce": last["ce"], "train_s": time.perf_counter() - t0}
    )
    rows[-1].update(evaluate_unified(trained, test))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=2048, help="training scenes (default 2048)")
    p.add_argument("--vq-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=600, help="decoder steps (default 600)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--eval", type=int, default=200, help="held-out test scenes (default 200)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/unified_recipe")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        rows += run_seed(seed, args, out)
        for r in rows[-2:]:
            print(
                json.dumps({k: r[k] for k in ("path", "seed", "final_ce", "train_s", *METRICS)}), flush=True
            )
        (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print("\n| path | seed | final train ce | BLEU | ROUGE-L | CIDEr | VQA exact match |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['seed']} | {r['final_ce']:.3f} | {r['caption_bleu']:.1f} | "
              f"{r['caption_rouge_l']:.3f} | {r['caption_cider']:.3f} | {r['vqa_exact_match']:.3f} |")  # fmt: skip
    for path in ("loop", "trainer"):
        sel = [r for r in rows if r["path"] == path]
        means = {m: float(np.mean([r[m] for r in sel])) for m in METRICS}
        print(f"| {path} | mean | | {means['caption_bleu']:.1f} | {means['caption_rouge_l']:.3f} | "
              f"{means['caption_cider']:.3f} | {means['vqa_exact_match']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
