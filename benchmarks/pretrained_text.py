#!/usr/bin/env python
"""Does a pretrained text tower help? The quickstart two-tower model with sentence-transformers'
all-MiniLM-L6-v2 text tower (frozen, and fine-tuned) against the same model with its text tower trained from
scratch, evaluated on the synthetic world's test split with its own captions and with paraphrased captions
(words the training captions never use: mmfusion.data.synthetic.paraphrase).

Arms (each an ordinary `mmfusion.run.train` run; the same steps, batch size, data and image tower):
  scratch   configs/quickstart.yaml: BPE tokenizer trained on the training captions + a 3-layer text tower
  frozen    configs/quickstart_minilm.yaml: MiniLM frozen, its projection trains (freeze: true)
  unfrozen  the same with the top --unfrozen-layers of MiniLM's 6 layers trainable (freeze: n; 0 = freeze: false,
            everything trains); the MiniLM weights get --encoder-lr (the rest the recipe's lr) through one
            training stage's lr_groups, as is usual when fine-tuning a pretrained encoder
Each arm runs for every --seeds (model init and data order; the synthetic world is the same).
Metrics: text->image and image->text recall@K and zero-shot colour / shape accuracy, plain and paraphrased
(zero-shot prompts paraphrased too). Prints a Markdown table (mean and min-max over seeds) and writes
<out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("scratch", "frozen", "unfrozen")
COLUMNS = (
    ("t2i_recall@1", "t2i R@1"),
    ("t2i_recall@5", "t2i R@5"),
    ("i2t_recall@1", "i2t R@1"),
    ("zero_shot_colour_acc", "0-shot colour"),
    ("zero_shot_shape_acc", "0-shot shape"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=90, help="optimizer steps of every run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (of everything but the MiniLM)")
    p.add_argument(
        "--unfrozen-layers", type=int, default=2, help="unfrozen arm: top MiniLM layers that train (0: all)"
    )
    p.add_argument("--warmup-steps", type=int, default=None, help="default: a tenth of --steps")
    p.add_argument("--encoder-lr", type=float, default=1e-4, help="the unfrozen MiniLM's learning rate")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on cores shared with other jobs, 2 threads ran 4-5x slower than 1)",
    )
    p.add_argument("--n-test", type=int, default=500, help="test pairs (plain and paraphrased)")
    p.add_argument("--out", default="runs/pretrained_text", help="run directories and results.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    return p.parse_args(argv)


def arm_config(arm: str, seed: int, args: argparse.Namespace):
    from mmfusion.config import load_config

    recipe = "quickstart.yaml" if arm == "scratch" else "quickstart_minilm.yaml"
    overrides = [
        f"name={arm}-seed{seed}",
        f"out_dir={args.out}",
        f"seed={seed}",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}",
        f"train.warmup_steps={args.steps // 10 if args.warmup_steps is None else args.warmup_steps}",
        f"train.checkpoint_every={args.steps}",
        "train.keep_checkpoints=1",
        "train.progress=false",
        f"train.threads={args.threads}",
        f"data.synthetic.n_train={args.steps * args.batch_size}",  # every training pair seen once
        f"data.synthetic.n_test={args.n_test}",
    ]
    if arm == "unfrozen":
        stage = {
            "name": "finetune",
            "steps": args.steps,
            "lr_groups": {"text_encoder.model.*": args.encoder_lr},
        }
        freeze = "false" if args.unfrozen_layers == 0 else str(args.unfrozen_layers)
        overrides += [f"model.text.freeze={freeze}", f"train.stages={json.dumps([stage])}"]
    return load_config(ROOT / "configs" / recipe, [*overrides, *args.overrides])


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict:
    from mmfusion import load_model
    from mmfusion.eval.paraphrase import evaluate_plain_and_paraphrased
    from mmfusion.run import load_split, train

    cfg = arm_config(arm, seed, args)
    start = time.perf_counter()
    result = train(cfg, overwrite=True, log=lambda *a: None)
    train_s = time.perf_counter() - start
    model = load_model(Path(result["run_dir"]) / "model")
    test = load_split(cfg, "test")
    metrics = evaluate_plain_and_paraphrased(model, test, (1, 5, 10), 500)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "arm": arm,
        "seed": seed,
        "train_s": train_s,
        "eval_s": time.perf_counter() - start - train_s,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_at_load": trainable,
        "metrics": metrics,
    }


def summarise(rows: list[dict]) -> str:
    """Markdown: one line per arm and caption set, mean (min-max) over seeds."""
    head = ["arm", "captions", *(name for _, name in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in ARMS:
        runs = [r for r in rows if r["arm"] == arm]
        if not runs:
            continue
        for prefix, label in (("", "plain"), ("para_", "paraphrased")):
            cells = []
            for key, _ in COLUMNS:
                vals = [r["metrics"][prefix + key] for r in runs]
                cells.append(f"{statistics.mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})")
            lines.append(f"| {arm} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)  # the evaluation too
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    for seed in args.seeds:
        for arm in args.arms:
            row = run_arm(arm, seed, args)
            rows.append(row)
            m = row["metrics"]
            print(
                f"{arm} seed {seed}: train {row['train_s']:.0f} s, eval {row['eval_s']:.0f} s; t2i R@1 plain "
                f"{m['t2i_recall@1']:.3f} paraphrased {m['para_t2i_recall@1']:.3f}",
                flush=True,
            )
            (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2))
    table = summarise(rows)
    total = time.perf_counter() - start
    result = {
        "args": vars(args),
        "cpu": cpu_model(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "total_s": total,
        "table": table,
        "runs": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(table)
    print(f"{len(rows)} runs in {total / 60:.1f} min on {result['cpu']}; {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
