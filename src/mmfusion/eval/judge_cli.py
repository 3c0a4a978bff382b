"""`python -m mmfusion.eval.judge_cli`: train the SyntheticJudge, report its held-out accuracy and reference
FID / IS values (kept apart from judge.py so that the judge and the metrics built on it import one way)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.synthetic import SyntheticWorld
from .judge import SyntheticJudge, as_unit_images, soft_blur


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mmfusion.eval.judge_cli`: train a judge, report held-out accuracy and reference FID/IS values
    (real vs real / noise / blank images), optionally save it and the numbers."""
    import argparse
    import sys
    import time

    from ..data.synthetic import BACKGROUND, WorldConfig
    from ..errors import MMFusionError
    from .generation import attribute_accuracy, fid, inception_score

    ap = argparse.ArgumentParser(
        prog="python -m mmfusion.eval.judge_cli",
        description="Train the SyntheticJudge on the synthetic world; print its held-out accuracy (test split, "
        "mixed 1-3 object scenes and one-object scenes) and FID/IS under the judge for reference image sets.",
    )
    ap.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="judge seed (init and training samples)")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--eval-n", type=int, default=1000, help="held-out images per evaluation (default 1000)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", help="folder to save the trained judge to (judge.safetensors + judge.json)")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.eval_n < 20:
        ap.error(f"--eval-n must be >= 20 (FID needs 2+ images per set, IS 10 splits), got {args.eval_n}")
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        world = SyntheticWorld(WorldConfig(seed=args.world_seed, image_size=args.image_size))
        single = SyntheticWorld(
            WorldConfig(seed=args.world_seed, image_size=args.image_size, object_count_probs=(1.0, 0.0, 0.0))
        )
        t0 = time.process_time()
        judge = SyntheticJudge.train_on_world(
            world, args.steps, args.seed, args.image_size, args.batch_size, progress=True
        )
        train_cpu_s = time.process_time() - t0
        results: dict[str, Any] = {"args": vars(args), "train_cpu_s": round(train_cpu_s, 1)}
        results["accuracy_mixed"] = judge.evaluate(world, "test", args.eval_n)
        results["accuracy_single"] = judge.evaluate(single, "test", args.eval_n)
        n = args.eval_n // 2
        samples = [world.sample("test", i, ("image",)) for i in range(2 * n)]
        real = np.stack([s["image"] for s in samples])
        scenes = [s["scene"] for s in samples[n:]]
        sharp = as_unit_images(real[n:])
        blurred = {lv: soft_blur(sharp, torch.full((n,), float(lv))) for lv in (1, 2)}
        rng = np.random.default_rng(0)
        noise = rng.integers(0, 256, real[n:].shape, dtype=np.uint8)
        blank = np.clip(
            np.array(BACKGROUND, dtype=np.int16) + rng.integers(-8, 9, real[n:].shape, dtype=np.int16), 0, 255
        ).astype(np.uint8)
        results["fid"] = {
            "real_vs_real": fid(real[:n], real[n:], judge),
            "real_vs_noise": fid(real[:n], noise, judge),
            "real_vs_blank": fid(real[:n], blank, judge),
            **{f"real_vs_blur{lv}": fid(real[:n], b, judge) for lv, b in blurred.items()},
        }
        results["attribute_accuracy"] = {
            "sharp": attribute_accuracy(sharp, scenes, judge),
            **{f"blur{lv}": attribute_accuracy(b, scenes, judge) for lv, b in blurred.items()},
        }
        results["inception_score"] = {
            "real": inception_score(real, judge),
            "one_image_repeated": inception_score(np.repeat(real[:1], 2 * n, axis=0), judge),
        }
    except MMFusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"judge: {args.steps} steps x {args.batch_size}, seed {args.seed}, {train_cpu_s:.1f} s CPU")
    print(f"{'held-out accuracy (test split)':34s} {'shape':>7s} {'colour':>7s} {'size':>7s} {'all':>7s}")
    for name in ("mixed", "single"):
        a = results[f"accuracy_{name}"]
        label = f"{name} ({args.eval_n} images)"
        print(f"{label:34s} {a['shape']:7.3f} {a['colour']:7.3f} {a['size']:7.3f} {a['all']:7.3f}")
    acc = ", ".join(f"{k} {v:.3f}" for k, v in results["attribute_accuracy"].items())
    print(f"attribute accuracy (shape+colour, {n} test images): {acc}  (blurN: soft_blur level N)")
    for k, v in results["fid"].items():
        print(f"FID under judge, {k:22s} {v:10.3f}  ({n} vs {n} images)")
    for k, (m, sd) in results["inception_score"].items():
        print(f"IS under judge, {k:23s} {m:7.2f} +- {sd:.2f}  ({2 * n} images, 10 splits)")
    if args.out:
        print(f"saved judge to {judge.save_pretrained(args.out)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
