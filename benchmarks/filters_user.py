#!/usr/bin/env python
"""Concept filters on a user's labelled JSONL (`mmfusion filter calibrate --data`) against the synthetic
world's prompt vectors, on the same scenes (issue 17, Z4).

Per seed: the SCD benchmark's two-tower model (benchmarks/scd.py; --reuse takes the one it left in --models);
--n validation and --n test scenes of the world written as a user would write them (a PNG per image, a JSONL
row {"image", "text", "concepts"}: the concepts among --concepts the scene shows). Two ways to build and
calibrate the filters, both on the validation file, both measured on the test file:
- prompts: the world's concept prompts minus negative prompts (mmfusion.eval.concepts, the synthetic path);
- data: the mean embedding of the rows that show the concept minus that of the rows that do not, per
  modality (mmfusion.eval.labelled_concepts, the user path: what `filter calibrate --data val.jsonl --eval-data
  test.jsonl` computes).

    .venv/bin/python benchmarks/filters_user.py --seeds 0 1 2 --reuse
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from mmfusion.data.synthetic import Scene, SyntheticWorld, WorldConfig
from mmfusion.eval.concepts import calibrate_filters, filter_report, shows
from mmfusion.eval.labelled_concepts import calibrate_labelled, labelled_report, read_labelled

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scd import ms, trained_model  # noqa: E402  (a sibling script, not a package)


def write_jsonl(world: SyntheticWorld, split: str, n: int, concepts: list[str], root: Path) -> Path:
    """n scenes of `split` as a user's labelled JSONL with PNG images beside it."""
    (root / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        s = world.sample(split, i)
        Image.fromarray(s["image"]).save(root / split / f"{i}.png")
        scene = Scene.from_dict(s["scene"])
        rows.append(
            {
                "image": f"{split}/{i}.png",
                "text": s["text"],
                "concepts": [c for c in concepts if shows(scene, c)],
            }
        )
    path = root / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_seed(seed: int, args) -> dict:
    model, _ = trained_model(seed, args, Path(args.models))
    recall = {"normal": args.recall, "strict": args.strict_recall}
    prompts = calibrate_filters(model, args.concepts, seed, "val", args.n, recall)
    res = {"seed": seed, "prompts": filter_report(model, prompts, seed, "test", args.n)}
    world, root = SyntheticWorld(WorldConfig(seed=seed)), Path(args.out) / f"s{seed}"
    val = read_labelled(write_jsonl(world, "val", args.n, args.concepts, root), concepts=args.concepts)
    test = read_labelled(write_jsonl(world, "test", args.n, args.concepts, root), concepts=args.concepts)
    data = calibrate_labelled(model, val, recall)
    res["data"] = labelled_report(model, data, test)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--concepts", nargs="+", default=["red", "large", "circle"])
    ap.add_argument("--n", type=int, default=1000, help="validation (calibration) and test scenes")
    ap.add_argument("--recall", type=float, default=0.9)
    ap.add_argument("--strict-recall", type=float, default=0.99)
    ap.add_argument("--steps", type=int, default=500, help="training steps of a model that is not reused")
    ap.add_argument("--models", default="runs/bench/scd", help="where the SCD benchmark's models are")
    ap.add_argument("--reuse", action="store_true", help="use the models a previous run trained in --models")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench/filters_user")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\nseeds {args.seeds}: calibrated on {args.n} val scenes, measured on {args.n} test scenes")
    print(
        "| modality | concept | vector | AUROC | normal precision | normal recall | strict precision | strict recall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mod in ("image", "text"):
        for c in args.concepts:
            for kind in ("prompts", "data"):
                r = [row[kind][mod][c] for row in rows]
                cells = [ms([x["auroc"] for x in r])] + [
                    ms([x[lv][k] for x in r]) for lv in ("normal", "strict") for k in ("precision", "recall")
                ]
                print(f"| {mod} | {c} | {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
