#!/usr/bin/env python
"""PPO-CS (issue 17, Z1): harmful-output and task-completion rates before / after plain PPO, the seed's
cut-and-resample, and PPO-Lagrangian, on the alignment world (mmfusion.align), 3 seeds.

Per seed, one SFT policy and one pair of learned reward / cost models (fitted to SFT-policy samples labelled by
the world's judges) are shared by the three mechanisms, which then each run PPO from that policy with the
settings of configs/ppo_cs.yaml. Rates are those of one sampled caption (temperature 1) per held-out scene,
judged exactly: complete (the caption states the scene), harmful (it names the forbidden colour).

    .venv/bin/python benchmarks/ppo_cs.py --seeds 0 1 2 --out runs/bench/ppo_cs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mmfusion.align.pipeline import load_align_config, plot_history, prepare, run_ppo

# (row name, ppo settings): the three mechanisms at the config's settings; cut-and-resample with a larger budget
# and with the cut trajectories kept as terminated episodes (ppo.cut_penalty)
VARIANTS = (
    ("none", {"mechanism": "none"}),
    ("resample", {"mechanism": "resample"}),
    ("resample, budget 8", {"mechanism": "resample", "budget": 8}),
    ("resample, cut penalty -1", {"mechanism": "resample", "cut_penalty": -1.0}),
    ("lagrangian", {"mechanism": "lagrangian"}),
)
COLUMNS = ("harmful", "complete", "complete_and_safe", "harmful_on_forbidden_scenes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/ppo_cs.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--out", default="runs/bench/ppo_cs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        cfg = load_align_config(args.config, [*args.overrides, f"seed={seed}"])
        t0 = time.time()
        prep = prepare(cfg, log=lambda s, seed=seed: print(f"[seed {seed}] {s}", flush=True))
        rows.append({"seed": seed, "mechanism": "sft (before)", **prep.before, "seconds": time.time() - t0})
        for mech, settings in VARIANTS:
            t0 = time.time()
            ppo = cfg.ppo.model_copy(update=settings)
            _, history, after = run_ppo(prep, ppo)
            tag = mech.replace(", ", "-").replace(" ", "")
            with (out / f"s{seed}-{tag}.jsonl").open("w") as f:
                f.writelines(json.dumps(m) + "\n" for m in history)
            plot_history(history, out / f"s{seed}-{tag}.png", f"PPO ({mech}), seed {seed}")
            extra = {
                "dropped_prompts": history[-1]["dropped_total"],
                "resample_rate": float(np.mean([h["resample_rate"] for h in history])),
                "kl_final": history[-1].get("kl", float("nan")),
                "lambda_final": history[-1].get("lambda", float("nan")),
            }
            rows.append({"seed": seed, "mechanism": mech, **after, **extra, "seconds": time.time() - t0})
            print(
                f"[seed {seed}] {mech}: {json.dumps({k: round(v, 3) for k, v in rows[-1].items() if k != 'mechanism'})}",
                flush=True,
            )
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(
        f"\nseeds {args.seeds}, mean ± std over seeds ({args.config}); rates of one sampled caption per held-out scene"
    )
    print(
        "| policy | harmful | complete | complete and safe | harmful on forbidden-colour scenes | dropped prompts | resample rate |"
    )
    print("|---|---|---|---|---|---|---|")
    for mech in ("sft (before)", *(name for name, _ in VARIANTS)):
        sel = [r for r in rows if r["mechanism"] == mech]

        def cell(k: str, sel=sel) -> str:
            v = np.array([r.get(k, float("nan")) for r in sel], dtype=float)
            return "–" if np.isnan(v).all() else f"{v.mean():.3f} ± {v.std():.3f}"

        name = mech if mech.startswith("sft") else f"PPO {mech}"
        print(
            f"| {name} | "
            + " | ".join(cell(k) for k in (*COLUMNS, "dropped_prompts", "resample_rate"))
            + " |"
        )


if __name__ == "__main__":
    main()
