#!/usr/bin/env python
"""PPO-CS on a user's own text (`mmfusion align` with data.sft / data.prompts / data.labels; issue 17, Z1),
checked against the exact judges by writing the alignment world out as a user's files.

Per seed, the files a user would bring (align.userdata), made from the alignment world (configs/ppo_cs.yaml's
world): SFT demonstrations (the world's SFT captions of --n-sft scenes), PPO prompts (--n-prompts scenes),
held-out evaluation prompts (--n-eval scenes) and --n-labels labelled pairs: per scene one of the complete
caption naming every colour, the caption withholding the forbidden colour, or the caption of another scene,
labelled by the world's annotator (reward 1 / 0.5 / 0; cost 1 when it names the forbidden colour). The run
sees only these files; it reports the learned models' figures (reward-model mean, the share the cost model
scores harmful). Because the prompts are scenes, the same sampled responses (same prompts, same seed) can also
be judged exactly here: harmful and complete rates before / after, and how often the cost model's verdict
agrees with the exact one.

    .venv/bin/python benchmarks/ppo_cs_user.py --seeds 0 1 2 --mechanisms none lagrangian
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mmfusion.align.pipeline import evaluate, load_align_config, prepare, run_ppo
from mmfusion.align.world import AlignWorld


def write_user_files(world: AlignWorld, seed: int, args, root: Path) -> dict[str, Path]:
    """The alignment world as a user's JSONL files (see the module docstring); disjoint scene seeds."""
    rng = np.random.default_rng(seed * 1000 + 1)
    files = {
        "sft": [
            {"prompt": world.prompt(x), "response": world.sft_caption(x, rng)}
            for x in world.scenes(args.n_sft, seed * 1000 + 2)
        ],
        "prompts": [{"prompt": world.prompt(x)} for x in world.scenes(args.n_prompts, seed * 1000 + 3)],
        "eval_prompts": [{"prompt": world.prompt(x)} for x in world.scenes(args.n_eval, seed * 1000 + 4)],
        "labels": [],
    }
    scenes = world.scenes(args.n_labels + 1, seed * 1000 + 5)
    for i, x in enumerate(scenes[:-1]):
        kind = rng.integers(3)
        t = rng.integers(world.n_templates)
        response = world.caption(scenes[i + 1], t, False) if kind == 2 else world.caption(x, t, bool(kind))
        files["labels"].append(
            {
                "prompt": world.prompt(x),
                "response": response,
                "reward": world.reward_label(x, response),
                "cost": world.cost_label(response),
            }
        )
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, rows in files.items():
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def exact(prep, decoder, world: AlignWorld, max_new_tokens: int) -> dict[str, float]:
    """The exact judges on the responses the learned-judge evaluation sampled (same prompts, same seed)."""
    scenes = [AlignWorld.parse_prompt(p) for p in prep.eval_prompts]
    seed = prep.cfg.seed * 10 + 8
    return evaluate(decoder, prep.vocab, world, scenes, max_new_tokens, seed, prep.cost_model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ppo_cs.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--mechanisms", nargs="+", default=["none", "lagrangian"])
    ap.add_argument("--n-sft", type=int, default=2000)
    ap.add_argument("--n-prompts", type=int, default=1000)
    ap.add_argument("--n-eval", type=int, default=400)
    ap.add_argument("--n-labels", type=int, default=1500)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--out", default="runs/bench/ppo_cs_user")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        world_cfg = load_align_config(args.config, [*args.overrides, f"seed={seed}"])
        world = AlignWorld(**world_cfg.world.model_dump())
        f = write_user_files(world, seed, args, out / f"s{seed}")
        cfg = load_align_config(
            args.config,
            [*args.overrides, f"seed={seed}", *(f"data.{k}={v}" for k, v in f.items())],
        )
        t0 = time.time()
        prep = prepare(cfg, log=lambda s, seed=seed: print(f"[seed {seed}] {s}", flush=True))
        mnt = cfg.ppo.max_new_tokens
        rows.append(
            {"seed": seed, "policy": "sft (before)", **prep.before, **exact(prep, prep.sft, world, mnt)}
        )
        rows[-1]["seconds"] = time.time() - t0
        for mech in args.mechanisms:
            t0 = time.time()
            policy, history, after = run_ppo(prep, cfg.ppo.model_copy(update={"mechanism": mech}))
            rows.append({"seed": seed, "policy": mech, **after, **exact(prep, policy.decoder, world, mnt)})
            rows[-1].update(dropped=history[-1]["dropped_total"], seconds=time.time() - t0)
            print(
                f"[seed {seed}] {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()})}",
                flush=True,
            )
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    cols = (
        "harmful_by_cost_model",
        "reward_model_mean",
        "harmful",
        "complete",
        "harmful_on_forbidden_scenes",
        "cost_model_agreement",
    )
    print(f"\nseeds {args.seeds}, mean ± std; {args.n_eval} held-out prompts, one sampled response each")
    print("| policy | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for pol in ("sft (before)", *args.mechanisms):
        sel = [r for r in rows if r["policy"] == pol]
        cells = [f"{np.mean([r[k] for r in sel]):.3f} ± {np.std([r[k] for r in sel]):.3f}" for k in cols]
        print(f"| {pol} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
