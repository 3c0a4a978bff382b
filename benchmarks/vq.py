#!/usr/bin/env python
"""VQ tokenizer calibration (issue 6 part 1, A8): VQ-VAEs on 32x32 SyntheticWorld images (CPU, seeded).

Data: --train-pool "train" images and --eval-images held-out "test" images of SyntheticWorld(seed=--seed),
preprocessed to [-1, 1]. Every setting of one seed starts from the same initial weights (torch.manual_seed
before building) and sees the same batch sequence. Adam (--lr), loss = MSE + commitment, --steps steps of
--batch images; threads = --threads.

Settings:
  vq        VectorQuantizer K=--codebook-size, EMA (decay 0.99) + k-means init + dead-code replacement
            (EMA count < --dead-threshold, default 3.0). Also the RVQ depth-1 row (identical model).
  control   the same without dead-code replacement (negative control).
  rvq2/rvq4 ResidualVQ with 2 / 4 levels of K codes each (same settings as vq).
  fsq       FSQ levels --fsq-levels (implicit codebook prod(levels)).

Measured at the end on the held-out images, eval mode: codebook usage (fraction of codes hit at least
once; RVQ: mean over levels), normalised perplexity (perplexity / K), PSNR (dB, [0, 1] pixel scale), tokens
per image.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mmfusion.data.synthetic import SyntheticWorld, WorldConfig
from mmfusion.models.vq import VQVAE, psnr

SETTINGS = ("vq", "control", "rvq2", "rvq4", "fsq")
TARGETS = "usage >= 0.90, norm. perplexity >= 0.35, PSNR >= 17.5 dB; control usage <= 0.30; rvq4 - vq >= 1 dB; fsq usage >= 0.75"


def images(world: SyntheticWorld, split: str, n: int) -> torch.Tensor:
    arr = np.stack([world.sample(split, i, ("image",))["image"] for i in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def build(setting: str, args: argparse.Namespace) -> VQVAE:
    kw = dict(
        image_size=32,
        channels=args.channels,
        codebook_size=args.codebook_size,
        code_dim=args.code_dim,
        dead_code_threshold=args.dead_threshold,
    )
    if setting == "control":
        kw["dead_code_threshold"] = 0.0
    if setting.startswith("rvq"):
        kw.update(quantizer="rvq", rvq_levels=int(setting[3:]))
    elif setting == "fsq":
        kw.update(quantizer="fsq", fsq_levels=args.fsq_levels)
    return VQVAE(**kw)


def run(setting: str, seed: int, train: torch.Tensor, held: torch.Tensor, args) -> dict:
    torch.manual_seed(seed)
    model = build(setting, args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    first_psnr = None
    for step in range(args.steps):
        batch = train[torch.randint(0, train.shape[0], (args.batch,), generator=gen)]
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if step == 0:
            first_psnr = psnr(out.recon.detach(), batch)
    model.eval()
    with torch.no_grad():
        recons, idx = [], []
        for chunk in held.split(128):
            o = model(chunk)
            recons.append(o.recon)
            idx.append(o.indices)
        recon, indices = torch.cat(recons), torch.cat(idx)
    stats = model.quantizer.usage_stats(indices)
    return {
        "setting": setting,
        "seed": seed,
        "K": model.codebook_size,
        "usage": stats["usage"],
        "norm_perplexity": stats["normalized_perplexity"],
        "psnr": psnr(recon, held),
        "psnr_step0": first_psnr,
        "tokens_per_image": model.tokens_per_image,
        "seconds": time.perf_counter() - t0,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--code-dim", type=int, default=32)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--dead-threshold", type=float, default=3.0)
    p.add_argument("--fsq-levels", type=int, nargs="+", default=[8, 6, 5])
    p.add_argument("--train-pool", type=int, default=2048)
    p.add_argument("--eval-images", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        world = SyntheticWorld(WorldConfig(seed=seed))
        train, held = images(world, "train", args.train_pool), images(world, "test", args.eval_images)
        for setting in args.settings:
            row = run(setting, seed, train, held, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\ntargets: {TARGETS}")
    print("| setting | seed | K | usage | norm. perplexity | PSNR (dB) | PSNR step 0 | tokens/img | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['seed']} | {r['K']} | {r['usage']:.3f} | {r['norm_perplexity']:.3f} | "
            f"{r['psnr']:.2f} | {r['psnr_step0']:.2f} | {r['tokens_per_image']} | {r['seconds']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
