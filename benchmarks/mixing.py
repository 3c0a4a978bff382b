#!/usr/bin/env python
"""Realised vs target mixtures of MixtureSampler on three toy sources: MAS, temperature and curriculum.

Sources (synthetic-world "train" samples; sizes configurable):
  captions    text only ("text": a caption)
  audio_text  audio + caption ("audio" 0.5 s at 16 kHz + "text")
  video_text  video + motion caption ("video" 8 frames + "text": the world's video caption)

Complexities are measured from the data with `source_complexity` (mean per sample of tokens + frames +
seconds, each times its unit; --audio-unit sets the weight of one audio second). Then:
  MAS          p ∝ c^alpha (--alpha)
  temperature  p ∝ n^(1/T) (--temperature)
  curriculum   linear from proportional-to-size (T = 1) at step 0 to the MAS mixture at --steps / 2,
               MAS afterwards
Each sampler draws --steps batches of --batch-size; the script prints target vs realised shares (whole run,
and the largest deviation over logging windows of --log-every steps) and writes one plot per sampler
(plot_mixture) under --out (default runs/, which git ignores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mmfusion.data.samplers import (
    CurriculumSchedule,
    MixtureSampler,
    mas_weights,
    plot_mixture,
    source_complexity,
    temperature_weights,
)
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="MAS / temperature / curriculum: realised vs target mixtures on three toy sources.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes", default="600,200,100", help="sizes of captions, audio_text, video_text")
    p.add_argument("--alpha", type=float, default=1.0, help="MAS exponent")
    p.add_argument("--audio-unit", type=float, default=1.0, help="complexity of one second of audio")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs", help="folder for the plots")
    return p.parse_args(argv)


def make_sources(sizes: list[int]) -> dict[str, list[dict]]:
    world = SyntheticWorld(WorldConfig(seed=0, image_size=32))
    captions = [world.sample("train", i, ("text",)) for i in range(sizes[0])]
    audio = [world.sample("train", 10_000 + i, ("audio", "text")) for i in range(sizes[1])]
    video = []
    for i in range(sizes[2]):
        s = world.sample("train", 20_000 + i, ("video",))
        video.append({"id": s["id"], "video": s["video"], "text": s["video_text"]})
    return {"captions": captions, "audio_text": audio, "video_text": video}


def report(name: str, sampler: MixtureSampler, names: list[str], out: Path) -> None:
    m = sampler.mixture()
    worst = 0.0
    for h in sampler.history:
        d = sum(h["window_counts"])
        worst = max(worst, *(abs(c - e) / d for c, e in zip(h["window_counts"], h["window_expected"])))
    print(f"\n{name}: {m['draws']} draws in {m['step']} steps; final target {fmt(m['target'])}")
    print("| source | expected share | realised share | draws |")
    print("|---|---:|---:|---:|")
    for i, n in enumerate(names):
        print(f"| {n} | {m['expected_shares'][i]:.4f} | {m['shares'][i]:.4f} | {m['counts'][i]} |")
    print(f"largest |realised - expected| share in a {sampler.log_every}-step window: {worst:.4f}")
    path = plot_mixture(sampler.history, out / f"mixing_{name}.png", names)
    print(f"plot: {path}")


def fmt(p: list[float]) -> str:
    return "[" + ", ".join(f"{x:.4f}" for x in p) + "]"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) != 3:
        raise SystemExit(f"--sizes needs 3 comma-separated sizes, got {args.sizes!r}")
    sources = make_sources(sizes)
    names = list(sources)
    data = list(sources.values())
    units = {"text": 1.0, "image": 1.0, "video": 1.0, "audio": args.audio_unit}
    complexities = [source_complexity(s, units) for s in data]
    print(f"sources built in {time.perf_counter() - t0:.1f} s")
    print("| source | size | complexity (tokens + frames + audio_unit * seconds, mean per sample) |")
    print("|---|---:|---:|")
    for n, s, c in zip(names, data, complexities):
        print(f"| {n} | {len(s)} | {c:.3f} |")
    mas = mas_weights(complexities, args.alpha)
    temp = temperature_weights(sizes, args.temperature)
    prop = temperature_weights(sizes, 1.0)
    print(f"MAS alpha={args.alpha}: {fmt(mas)}")
    print(f"temperature T={args.temperature}: {fmt(temp)}")
    print(f"curriculum: {fmt(prop)} (T=1) at step 0 -> MAS at step {args.steps // 2}")
    common = dict(
        seed=args.seed,
        batch_size=args.batch_size,
        num_samples=args.steps * args.batch_size,
        log_every=args.log_every,
    )
    out = Path(args.out)
    samplers = {
        "mas": MixtureSampler.with_mas(data, args.alpha, complexities=complexities, **common),
        "temperature": MixtureSampler.with_temperature(data, args.temperature, **common),
        "curriculum": MixtureSampler(data, CurriculumSchedule.linear(prop, mas, args.steps // 2), **common),
    }
    for name, sampler in samplers.items():
        for _ in sampler:
            pass
        report(name, sampler, names, out)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
