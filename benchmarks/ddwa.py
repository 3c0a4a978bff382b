#!/usr/bin/env python
"""Does DDWA (dynamic data weighting) help? Uniform sampling vs DDWA, on clean and on corrupted labels.

Task: shape classification (5 classes) of single-object synthetic-world images (WorldConfig with
object_count_probs=(1, 0, 0), 32 px, box-downsampled to 16 px, scaled to [-1, 1]) with a tiny CNN
(conv 3->C, max-pool, conv C->2C, global max-pool, linear). Train: samples 0..n_train-1 of the "train" split;
test: samples 0..n_test-1 of the "test" split (disjoint scenes). Labels are always clean on the test set.

Corruption: with --noise f, a seeded fraction f of the training labels is replaced by a uniformly drawn
*different* class (the same corrupted set for uniform and DDWA within a seed).

Both arms use `mmfusion.data.samplers.DDWASampler` with the same seed, so their random streams are the
same: the uniform arm has boost=1.0 (weights stay uniform), the DDWA arm boost=--boost (default 1.3) on the
top --top-fraction of seen samples by mean score, every --update-every steps after --warmup steps. Scores:
the per-sample gradient norm of the loss w.r.t. the logits, ||softmax(z) - onehot(y)||, from the training
forward pass (no extra backward), averaged over the times the sample was seen. Model init and label
corruption depend on the seed only; every cell is run for each of --seeds.

Reported per cell: test accuracy mean ± std (sample std over seeds), the DDWA - uniform difference per seed
(paired) with its mean ± std, and for DDWA on corrupted labels the fraction of boosted samples (at the last
reweight, and averaged over all reweights) whose label is corrupted, against the corrupted fraction of the
training set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch import nn

from mmfusion.data.samplers import DDWASampler
from mmfusion.data.synthetic import SHAPES, SyntheticWorld, WorldConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Test accuracy with uniform sampling vs DDWA, on clean and corrupted labels.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.3, help="fraction of corrupted training labels")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=8, help="channels of the first conv (the second has 2x)")
    p.add_argument("--warmup", type=int, default=200, help="DDWA uniform warm-up steps")
    p.add_argument("--update-every", type=int, default=100, help="DDWA reweighting period K (steps)")
    p.add_argument("--boost", type=float, default=1.3)
    p.add_argument("--top-fraction", type=float, default=0.25)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def make_data(world_seed: int, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    world = SyntheticWorld(WorldConfig(seed=world_seed, image_size=32, object_count_probs=(1.0, 0.0, 0.0)))
    samples = [world.sample(split, i, ("image",)) for i in range(n)]
    x = np.stack([s["image"] for s in samples]).astype(np.float32) / 255.0
    x = x.reshape(n, 16, 2, 16, 2, 3).mean(axis=(2, 4)) * 2 - 1
    y = [SHAPES.index(s["scene"]["objects"][0]["shape"]) for s in samples]
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.tensor(y)


def corrupt(y: torch.Tensor, fraction: float, seed: int, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy labels, bool mask of corrupted samples): round(fraction * n) samples get a different class."""
    g = torch.Generator().manual_seed(10_000 + seed)
    n = y.shape[0]
    which = torch.randperm(n, generator=g)[: round(fraction * n)]
    shift = torch.randint(1, n_classes, (which.numel(),), generator=g)
    noisy = y.clone()
    noisy[which] = (y[which] + shift) % n_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[which] = True
    return noisy, mask


def model(width: int, n_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, n_classes),
    )


def run_cell(args, data, seed: int, noisy: bool, ddwa: bool) -> dict:
    xtr, ytr_clean, xte, yte = data
    n_classes = len(SHAPES)
    if noisy:
        ytr, corrupted = corrupt(ytr_clean, args.noise, seed, n_classes)
    else:
        ytr, corrupted = ytr_clean, torch.zeros(len(ytr_clean), dtype=torch.bool)
    torch.manual_seed(seed)
    net = model(args.width, n_classes)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sampler = DDWASampler(
        len(ytr),
        args.batch_size,
        warmup=args.warmup,
        update_every=args.update_every,
        boost=args.boost if ddwa else 1.0,
        top_fraction=args.top_fraction,
        seed=seed,
    )
    boosted_corrupt = []
    for _ in range(args.steps):
        reweights = sampler.reweights
        idx = torch.tensor(sampler.next_batch())
        if ddwa and sampler.reweights > reweights and sampler.boosted.any():
            boosted_corrupt.append(corrupted[sampler.boosted].float().mean().item())
        logits = net(xtr[idx])
        loss = nn.functional.cross_entropy(logits, ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sampler.update(idx, logits=logits, labels=ytr[idx])
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean().item()
    out = {"seed": seed, "noisy": noisy, "ddwa": ddwa, "test_acc": acc}
    if ddwa:
        out["boosted_corrupt_last"] = boosted_corrupt[-1] if boosted_corrupt else float("nan")
        out["boosted_corrupt_mean"] = statistics.fmean(boosted_corrupt) if boosted_corrupt else float("nan")
        out["reweights"] = sampler.reweights
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    data = (
        *make_data(args.world_seed, "train", args.n_train),
        *make_data(args.world_seed, "test", args.n_test),
    )
    print(f"data: {args.n_train} train / {args.n_test} test images in {time.perf_counter() - t0:.1f} s")
    results = []
    for noisy in (False, True):
        for ddwa in (False, True):
            for seed in seeds:
                r = run_cell(args, data, seed, noisy, ddwa)
                results.append(r)
                print(json.dumps(r))
    print(f"\ntotal {time.perf_counter() - t0:.1f} s; {len(seeds)} seeds; noise {args.noise:.0%}\n")
    print(
        "| labels | uniform acc | DDWA acc | DDWA - uniform (paired) | boosted that are corrupted (last / mean) |"
    )
    print("|---|---:|---:|---:|---:|")
    summary = {}
    for noisy in (False, True):
        uni = [r["test_acc"] for r in results if r["noisy"] == noisy and not r["ddwa"]]
        dd = [r for r in results if r["noisy"] == noisy and r["ddwa"]]
        dacc = [r["test_acc"] for r in dd]
        diff = [b - a for a, b in zip(uni, dacc)]
        (mu, su), (md, sd), (mf, sf) = mean_std(uni), mean_std(dacc), mean_std(diff)
        label = f"{args.noise:.0%} corrupted" if noisy else "clean"
        corr = "–"
        if noisy:
            last = mean_std([r["boosted_corrupt_last"] for r in dd])
            avg = mean_std([r["boosted_corrupt_mean"] for r in dd])
            corr = f"{last[0]:.1%} / {avg[0]:.1%} (train set: {args.noise:.0%})"
        print(f"| {label} | {mu:.4f} ± {su:.4f} | {md:.4f} ± {sd:.4f} | {mf:+.4f} ± {sf:.4f} | {corr} |")
        summary[label] = {"uniform": [mu, su], "ddwa": [md, sd], "diff": [mf, sf]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
