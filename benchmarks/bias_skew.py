#!/usr/bin/env python
"""A group under-represented in training, measured by the bias report, and re-weighting (issue 17, Z3).

The paired_colour task (a scene's image and sound -> the leftmost object's colour, 8 classes; each modality
alone carries it). Training data: 1140 scenes with both sensors and 60 with one sensor only (--rare: image,
the default, or audio; the other input absent), mixed by `data.mixture` with weighting proportional (the skew
as collected: 5 % one-sensor samples),
uniform (50 / 50) or mas (the modality-aware sampler). Model: late fusion over tiny audio + image encoders,
no modality dropout, 300 steps of batch 32. Each model is scored by `mmfusion.eval.bias` on the 400 test
scenes twice, as two groups of the axis "sensors": with both inputs ("image+audio") and with only the rare
sensor ("image only" / "audio only"): accuracy per group, the ratio and the four-fifths flag. 3 seeds.

    .venv/bin/python benchmarks/bias_skew.py --seeds 0 1 2 --rare image --out runs/bench/bias_skew_image
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mmfusion.config import config_from_dict
from mmfusion.eval.bias import axis_report, predictions, write_report
from mmfusion.federated.partition import ClientDataset
from mmfusion.models.multimodal import MultiModalModel
from mmfusion.run import fusion_target, load_split, train

WEIGHTINGS = ("proportional", "uniform", "mas")


def recipe(seed: int, weighting: str, out: Path, steps: int, rare: str) -> dict:
    return {
        "name": f"s{seed}-{weighting}",
        "out_dir": str(out),
        "seed": seed,
        "data": {
            "source": "synthetic",
            "synthetic": {"task": "paired_colour", "seed": seed, "n_test": 400},
            "mixture": {
                "sources": [
                    {"name": "image_audio", "n": 1140},
                    {"name": f"{rare}_only", "n": 60, "modalities": [rare]},
                ],
                "weighting": weighting,
            },
        },
        "model": {
            "kind": "fusion",
            "encoders": {"audio": "tiny", "image": "tiny"},
            "dim": 32,
            "fusion": "late",
            "modality_dropout": 0.0,
        },
        "train": {
            "steps": steps,
            "batch_size": 32,
            "lr": 3.0e-3,
            "warmup_steps": 20,
            "checkpoint_every": steps,
            "progress": False,
        },
        "eval": {"batch_size": 200},
    }


def score(cfg, run: Path, rare: str):
    model = MultiModalModel.from_pretrained(run / "model")
    test = load_split(cfg, "test")
    collate = model.collate(cfg.data.inputs, fusion_target(cfg, model.config))
    y_true, y_pred, groups = [], [], []
    other = "image" if rare == "audio" else "audio"
    rare_only = ClientDataset(test, range(len(test)), {other})
    for name, data in (("image+audio", test), (f"{rare} only", rare_only)):
        t, p, _, skipped = predictions(model, data, collate, (), cfg.eval.batch_size)
        assert not skipped, skipped
        y_true += t
        y_pred += p
        groups += [name] * len(t)
    return axis_report("sensors", y_true, y_pred, groups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--weightings", nargs="+", default=list(WEIGHTINGS), choices=WEIGHTINGS)
    ap.add_argument(
        "--rare",
        choices=["image", "audio"],
        default="image",
        help="the sensor of the under-represented group (image: the one the model learns slower)",
    )
    ap.add_argument("--out", default="runs/bench/bias_skew")
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        for w in args.weightings:
            cfg = config_from_dict(recipe(seed, w, out, args.steps, args.rare))
            run = Path(train(cfg, overwrite=True, log=lambda _m: None)["run_dir"])
            r = score(cfg, run, args.rare)
            if seed == args.seeds[0]:
                write_report([r], run / "bias", f"bias report: {w} mixture, seed {seed}", {"weighting": w})
            row = {
                "seed": seed,
                "weighting": w,
                "acc_both": r.by_group["accuracy"]["image+audio"],
                "acc_rare_only": r.by_group["accuracy"][f"{args.rare} only"],
                "ratio": r.ratio["accuracy"],
                "flagged": bool(r.flagged),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\n{args.steps} steps, seeds {args.seeds}")
    print_table(
        rows,
        "weighting",
        args.weightings,
        {
            "training mixture": None,
            "accuracy image+audio": "acc_both",
            f"accuracy {args.rare} only": "acc_rare_only",
            "ratio": "ratio",
            "under 4/5": "flagged",
        },
    )


def print_table(rows: list[dict], arm_key: str, arms: list[str], columns: dict[str, str | None]) -> None:
    """A markdown table, a line per arm: mean ± std over its rows of each column's field; `flagged` columns
    print how many rows were flagged; the column mapped to None is the arm's name."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for arm in arms:
        sel = [r for r in rows if r[arm_key] == arm]
        cells = []
        for field in columns.values():
            if field is None:
                cells.append(arm)
            elif field == "flagged":
                cells.append(f"{sum(r['flagged'] for r in sel)}/{len(sel)}")
            else:
                v = np.array([r[field] for r in sel])
                cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
