#!/usr/bin/env python
"""Federated vs centralised training of the same model on the same data and budget (issue 20).

For each seed and setting, `mmfusion.federated.federate.simulate` runs the recipe (configs/federated.yaml:
paired_colour, late fusion over tiny audio + image encoders) for --rounds rounds x --clients clients x
--local-steps local steps; the centralised baseline trains the same model with the same Trainer for
rounds x clients x local_steps steps on the union of the clients' data (the same samples, with the same
modalities missing), batch and peak lr the same, warm-up + cosine over its steps. Both are scored on the
400-sample test split (accuracy with every input, and with each one removed).

Settings: iid | label (Dirichlet label skew, --alpha) partitions, FedAvg and FedProx (--mu), every edge
with both sensors; and `hetero`: label skew with an audio+image, an audio-only, an image-only and an
audio+image edge (the recipe's), FedAvg, against centralised training on the same modality-masked samples.
Bytes are Flower payload bytes (numpy .npy tensors) per round, both directions, with and without fp16.

    .venv/bin/python benchmarks/federated.py --seeds 0 1 2 --out runs/bench/federated
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from torch.utils.data import ConcatDataset

from mmfusion.config import load_config
from mmfusion.federated.federate import simulate
from mmfusion.federated.server import Evaluator, prepare_server
from mmfusion.run import load_split, model_collate, train_data
from mmfusion.train.rng import seed_everything
from mmfusion.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "federated.yaml"
ALL = "federated.modalities=null"
SETTINGS = {
    "iid / FedAvg": ["federated.partition.by=iid", ALL],
    "iid / FedProx": ["federated.partition.by=iid", ALL, "federated.strategy=fedprox"],
    "label / FedAvg": ["federated.partition.by=label", ALL],
    "label / FedProx": ["federated.partition.by=label", ALL, "federated.strategy=fedprox"],
    "hetero / FedAvg": ["federated.partition.by=label"],
}


def centralised(cfg, out_name: str) -> dict:
    """The same model trained on the union of the clients' datasets for rounds x clients x local_steps steps."""
    f = cfg.federated
    steps = f.rounds * f.clients * f.local_steps
    cfg = cfg.model_copy(
        update={"name": out_name, "train": cfg.train.model_copy(update={"steps": steps, "progress": False})}
    )
    fed = prepare_server(cfg, overwrite=True, log=lambda _m: None)
    datasets, _ = fed.client_datasets(load_split(fed.cfg, "train"), range(f.clients))
    union = ConcatDataset([datasets[c] for c in range(f.clients)])
    model = fed.new_model()
    seed_everything(cfg.seed)
    data = train_data(fed.cfg, union, model_collate(fed.cfg, model), cfg.train.batch_size)
    cfg_train = fed.cfg.train.model_copy(update={"checkpoint_every": steps})
    Trainer(model, data, cfg_train, fed.out, log=lambda _m: None, checkpoints=False).fit()
    return Evaluator(fed, model).metrics()


def run(args, out: Path) -> list[dict]:
    """Train every (seed, setting) of `args`; print and return one JSON row each (and one fp16-bytes row)."""
    rows = []
    for seed in args.seeds:
        base = [
            f"out_dir={out}",
            f"seed={seed}",
            f"data.synthetic.seed={seed}",
            f"federated.rounds={args.rounds}",
            f"federated.clients={args.clients}",
            f"federated.local_steps={args.local_steps}",
            f"federated.partition.alpha={args.alpha}",
            f"federated.proximal_mu={args.mu}",
            *([f"train.threads={args.threads}"] if args.threads else []),
        ]
        central_done: dict[str, dict] = {}
        for name in args.settings:
            cfg = load_config(RECIPE, [*base, f"name=s{seed}-{name.replace(' / ', '-')}", *SETTINGS[name]])
            t0 = time.perf_counter()
            m = simulate(cfg, overwrite=True, log=lambda _m: None)
            row = {
                "setting": name,
                "seed": seed,
                **{f"fed_{k}": v for k, v in m["final"].items() if k.startswith("accuracy")},
                "bytes_per_round": m["bytes_total"] / args.rounds,
                "fed_seconds": time.perf_counter() - t0,
            }
            # centralised on the same data: the modality masks matter (hetero), the partition does not
            key = "hetero" if name.startswith("hetero") else "all"
            if key not in central_done:
                central_done[key] = centralised(cfg, f"s{seed}-central-{key}")
            row.update({f"central_{k}": v for k, v in central_done[key].items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.fp16:  # the fp16 payload of the same model (bytes only: one round of one local step)
        cfg = load_config(
            RECIPE,
            [
                f"out_dir={out}",
                "name=fp16",
                "federated.rounds=1",
                f"federated.clients={args.clients}",
                "federated.local_steps=1",
                "federated.compression=fp16",
            ],
        )
        fp16 = simulate(cfg, overwrite=True, log=lambda _m: None)["bytes_total"]
        rows.append({"fp16_bytes_per_round": fp16})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], args) -> str:
    def ms(sel, key):
        v = np.array([r[key] for r in sel])
        return f"{v.mean():.3f} ± {v.std():.3f}"

    runs = [r for r in rows if "setting" in r]
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"{args.rounds} rounds x {args.clients} clients x {args.local_steps} local steps (label skew: Dirichlet "
        f"alpha {args.alpha}; FedProx mu {args.mu}); centralised: the same steps in all; seeds {seeds}; mean ± std",
        "",
        "| setting | seeds | federated acc | centralised acc | federated acc w/o audio | centralised acc w/o audio "
        "| federated acc w/o image | centralised acc w/o image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in SETTINGS:
        sel = [r for r in runs if r["setting"] == name]
        if not sel:
            continue
        cols = [
            ms(sel, f"{side}_accuracy_{k}")
            for k in ("all", "without_audio", "without_image")
            for side in ("fed", "central")
        ]
        lines.append(f"| {name} | {len(sel)} | " + " | ".join(cols) + " |")
    fp32 = runs[0]["bytes_per_round"] if runs else float("nan")
    fp16 = next((r["fp16_bytes_per_round"] for r in rows if "fp16_bytes_per_round" in r), float("nan"))
    lines += [
        "",
        f"payload per round (down + up, {args.clients} clients): fp32 {fp32 / 1e6:.3f} MB, "
        f"fp16 {fp16 / 1e6:.3f} MB ({fp16 / fp32:.3f}x)",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--mu", type=float, default=0.01)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--threads", type=int, help="torch threads per run (train.threads); default: torch's")
    ap.add_argument("--no-fp16", dest="fp16", action="store_false", help="skip the fp16 payload run")
    ap.add_argument(
        "--from-logs",
        nargs="+",
        metavar="LOG",
        help="train nothing: build the table from the JSON rows earlier runs of this script printed (a "
        "benchmark split over several processes, e.g. one per seed)",
    )
    ap.add_argument("--out", default="runs/bench/federated")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.from_logs:
        rows = []
        for log in args.from_logs:
            for line in Path(log).read_text().splitlines():
                if line.startswith("{"):
                    row = json.loads(line)
                    rows.append(row)
    else:
        rows = run(args, out)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print("\n" + table(rows, args))


if __name__ == "__main__":
    main()
