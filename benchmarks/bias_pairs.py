#!/usr/bin/env python
"""A planted attribute-pair skew, measured by `mmfusion bias`, and re-weighted training (issue 17, Z3).

The task: an attribute (--label) of a single-object synthetic-world scene from its image. Each value of the
label has "paired" colours: size (the default, 2 classes): small-{red, green, blue, yellow}, large-{purple,
orange, white, cyan}; shape (5 classes): circle-red, square-green, triangle-blue, diamond-yellow, cross-purple.
The training set is skewed: --aligned scenes whose object has a colour paired with its label and
--conflicting ones (default 950 / 50, 5 %) with another colour, so colour predicts the label in 95 % of
training scenes. The test set holds --n-test of each group. Both are written as JSONL manifests with PNG images
and the columns label, pair ("aligned" / "conflicting") and colour: the user-data path (`data.source: jsonl`).

Arms, each the same fusion model (--encoder: the tiny image encoder with a conv stem, late fusion, dim 32)
for --steps steps of batch 32:
  shuffle    the skewed set as collected (an epoch permutation)
  ddwa       the same set through `data.sampler: ddwa` (dynamic data weighting: samples with large logit
             gradients, the ones the colour shortcut gets wrong, are drawn more often;
             boost 3 on the top 10 % every 20 steps after steps/5 uniform ones)
  balanced   the two groups as two mixture sources (`data.mixture`, weighting uniform): each batch half
             aligned, half conflicting (the group labels are used; DDWA does not need them)
Every model is scored by `mmfusion bias <run> --axes pair,colour` on the test manifest: accuracy per group,
ratio conflicting / aligned and the four-fifths flag. Seeds change the scenes, the model init and the order.

    .venv/bin/python benchmarks/bias_pairs.py --label size --seeds 0 1 2 --out runs/bench/bias_pairs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmfusion.cli import main as mmfusion
from mmfusion.config import config_from_dict
from mmfusion.data.synthetic import SHAPES, SIZES, SyntheticWorld, WorldConfig
from mmfusion.data.writers import write_jsonl
from mmfusion.run import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bias_skew import print_table  # noqa: E402  (a sibling script, not a package)

PAIRED = {  # label -> its value -> the colours paired with it
    "shape": {
        "circle": {"red"},
        "square": {"green"},
        "triangle": {"blue"},
        "diamond": {"yellow"},
        "cross": {"purple"},
    },
    "size": {"small": {"red", "green", "blue", "yellow"}, "large": {"purple", "orange", "white", "cyan"}},
}
CLASSES = {"shape": list(SHAPES), "size": list(SIZES)}
ARMS = ("shuffle", "ddwa", "balanced")


def planted(world: SyntheticWorld, split: str, label: str, aligned: int, conflicting: int) -> list[dict]:
    """The first `aligned` scenes of `split` whose object has a colour paired with its `label` value and the
    first `conflicting` ones whose object does not, in split order."""
    want = {"aligned": aligned, "conflicting": conflicting}
    out, i = [], 0
    while any(want.values()):
        obj = world.scene(split, i).objects[0]
        value = getattr(obj, label)
        group = "aligned" if obj.colour in PAIRED[label][value] else "conflicting"
        if want[group]:
            want[group] -= 1
            s = world.sample(split, i, ("image",))
            del s["scene"], s["scene_key"]
            out.append({**s, "label": value, "pair": group, "colour": obj.colour})
        i += 1
    return out


def write_data(
    seed: int, out: Path, label: str, aligned: int, conflicting: int, n_test: int
) -> dict[str, Path]:
    world = SyntheticWorld(WorldConfig(seed=seed, object_count_probs=(1.0, 0.0, 0.0)))
    train_rows = planted(world, "train", label, aligned, conflicting)
    groups = {g: [r for r in train_rows if r["pair"] == g] for g in ("aligned", "conflicting")}
    return {
        "train": write_jsonl(train_rows, out, "train"),
        "aligned": write_jsonl(groups["aligned"], out, "train_aligned"),
        "conflicting": write_jsonl(groups["conflicting"], out, "train_conflicting"),
        "test": write_jsonl(planted(world, "test", label, n_test, n_test), out, "test"),
    }


def recipe(
    seed: int, arm: str, data: dict[str, Path], out: Path, steps: int, encoder: dict, label: str
) -> dict:
    d: dict = {"source": "jsonl", "train": str(data["train"]), "test": str(data["test"])}
    d["target"] = {"field": "label", "classes": CLASSES[label]}
    if arm == "ddwa":
        d["sampler"] = "ddwa"
        d["ddwa"] = {"warmup": steps // 5, "update_every": 20, "boost": 3.0, "top_fraction": 0.1}
    if arm == "balanced":
        d["mixture"] = {
            "sources": [{"name": g, "train": str(data[g])} for g in ("aligned", "conflicting")],
            "weighting": "uniform",
        }
    return {
        "name": f"s{seed}-{arm}",
        "out_dir": str(out),
        "seed": seed,
        "data": d,
        "model": {"kind": "fusion", "encoders": {"image": encoder}, "dim": 32, "fusion": "late"},
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--label", choices=sorted(PAIRED), default="size", help="the attribute to predict")
    ap.add_argument("--aligned", type=int, default=950)
    ap.add_argument("--conflicting", type=int, default=50)
    ap.add_argument("--n-test", type=int, default=200, help="test scenes per group")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument(
        "--encoder",
        type=json.loads,
        default={"kind": "image", "size": "tiny", "stem": "conv"},
        help="the image encoder (JSON, as model.encoders.image)",
    )
    ap.add_argument("--out", default="runs/bench/bias_pairs")
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        data = write_data(
            seed, out / f"data-s{seed}-{args.label}", args.label, args.aligned, args.conflicting, args.n_test
        )
        for arm in args.arms:
            cfg = config_from_dict(recipe(seed, arm, data, out, args.steps, args.encoder, args.label))
            run = Path(train(cfg, overwrite=True, log=lambda _m: None)["run_dir"])
            assert mmfusion(["bias", str(run), "--axes", "pair,colour"]) == 0
            rep = {r["axis"]: r for r in json.loads((run / "bias" / "bias.json").read_text())["axes"]}
            acc = rep["pair"]["by_group"]["accuracy"]
            row = {
                "seed": seed,
                "arm": arm,
                "acc_aligned": acc["aligned"],
                "acc_conflicting": acc["conflicting"],
                "ratio": rep["pair"]["ratio"]["accuracy"],
                "flagged": bool(rep["pair"]["flagged"]),
                "colour_ratio": rep["colour"]["ratio"]["accuracy"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    share = args.conflicting / (args.aligned + args.conflicting)
    print(f"\n{args.steps} steps, seeds {args.seeds}, conflicting share of training {share:.1%}")
    print_table(
        rows,
        "arm",
        args.arms,
        {
            "training": None,
            "accuracy aligned": "acc_aligned",
            "accuracy conflicting": "acc_conflicting",
            "ratio": "ratio",
            "under 4/5": "flagged",
            "worst colour / best": "colour_ratio",
        },
    )


if __name__ == "__main__":
    main()
