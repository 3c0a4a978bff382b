#!/usr/bin/env python
"""Does contrastive pre-training help with few labels? CL-FT against the same model trained from scratch.

CL-FT (configs/clft.yaml): stage 1 trains the two-tower model with image–text InfoNCE on --n-pairs
unlabelled image–caption pairs of the synthetic world; stage 2 freezes both towers and trains the
classification probe (linear, on the image embedding) on the first --n-labels training images with
their label (configs/clft.yaml: the shape of the one object in the image, 5 classes).

Scratch: the same model (same towers, same probe head), randomly initialised, every parameter trained
on the same --n-labels images and labels with the probe's cross-entropy, for --scratch-steps steps of
the same batch size; the head has the CL-FT probe's learning rate, the towers the pre-training one.

Both arms are ordinary `mmfusion.run.train` runs of the recipe with overrides. Learning curves: the
probe's val-split accuracy every --eval-every fine-tuning steps (from metrics.jsonl); final: accuracy
on the test split (disjoint scenes). Every arm runs for each of --seeds (model init and data order).
Writes <out>/results.json and <out>/clft_curves.png, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "clft.yaml"), help="the CL-FT recipe")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n-pairs", type=int, default=None, help="unlabelled pairs (default: the recipe's)")
    p.add_argument("--n-labels", type=int, default=500, help="labelled images for fine-tuning / scratch")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--finetune-steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--scratch-steps", type=int, default=None, help="default: the fine-tuning steps")
    p.add_argument("--eval-every", type=int, default=25, help="val accuracy every N fine-tuning steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/clft_benchmark", help="run directories, results.json and the plot")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    p.add_argument(
        "--pretrained-runs",
        help="a previous --out: take each seed's pre-training stage from its clft-seed<k> run (the "
        "end-of-pretrain checkpoint, with the head of this config freshly initialised) and run only the "
        "fine-tuning stage; pre-training never touches the frozen head or the global RNG, so this equals "
        "an uninterrupted run with the same tokenizer",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse finished arms under --out (their test accuracy and curve) instead of training them again",
    )
    return p.parse_args(argv)


def curve(run_dir: Path) -> list[tuple[int, float]]:
    """(fine-tuning step, val probe accuracy) from metrics.jsonl."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val/probe_accuracy" in rec:
            out.append((rec["stage_step"], rec["val/probe_accuracy"]))
    return out


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict:
    import torch

    from mmfusion.config import load_config
    from mmfusion.run import evaluate_probe, train

    base = load_config(args.config, args.overrides)
    stages = base.train.stages
    pre, ft = stages[0], stages[1]
    pre_steps = args.pretrain_steps or pre.steps
    ft_steps = args.finetune_steps or ft.steps
    common = [
        f"name={arm}-seed{seed}",
        f"out_dir={args.out}",
        f"seed={seed}",
        f"data.synthetic.n_train={(args.n_pairs or base.data.synthetic.n_train) if arm == 'clft' else args.n_labels}",
        "train.progress=false",
        f"train.threads={args.threads}",
        *args.overrides,
    ]
    if arm == "clft":
        overrides = [
            *common,
            f"train.stages.0.steps={pre_steps}",
            f"train.stages.1.steps={ft_steps}",
            f"train.stages.1.n_train={args.n_labels}",
            f"train.stages.1.eval_every={args.eval_every}",
        ]
    else:
        scratch = {
            "name": "scratch",
            "steps": args.scratch_steps or ft_steps,
            "objective": "probe",
            "n_train": args.n_labels,
            "batch_size": ft.batch_size,
            "lr": base.train.lr,
            "lr_groups": {"head.*": ft.lr or base.train.lr},
            "warmup_steps": ft.warmup_steps if ft.warmup_steps is not None else base.train.warmup_steps,
            "weight_decay": base.train.weight_decay,
            "eval_every": args.eval_every,
        }
        overrides = [*common, f"train.stages={json.dumps([scratch])}"]
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.out) / cfg.name
    if args.reuse and (run_dir / "bench.json").is_file():
        return json.loads((run_dir / "bench.json").read_text())
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    resume = False
    if arm == "clft" and args.pretrained_runs:
        graft_pretraining(Path(args.pretrained_runs) / cfg.name, run_dir, cfg, pre_steps)
        resume = True
    log = lambda m: print(f"  [{arm} seed {seed}] {m}", flush=True)  # noqa: E731
    train(cfg, resume=resume, overwrite=not resume, log=log)
    seconds = time.perf_counter() - t0
    test = evaluate_probe(cfg, run_dir / "model", "test")
    result = {
        "arm": arm,
        "seed": seed,
        "test_accuracy": test["probe_accuracy"],
        "chance": test["probe_chance"],
        "label": test["probe_label"],
        "n_test": test["probe_n"],
        "curve": curve(run_dir),
        "train_seconds": seconds,
        "steps": [(s.name, s.steps) for s in cfg.train.stages],
    }
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    return result


def graft_pretraining(src: Path, dst: Path, cfg, pre_steps: int) -> None:
    """dst = src's run up to the end of pre-training, its head replaced by the init of `cfg`'s head."""
    import shutil

    from mmfusion.config import dump_config
    from mmfusion.modalities.text import TextTokenizer
    from mmfusion.train.checkpoint import Checkpoint, save_checkpoint
    from mmfusion.train.rng import seed_everything
    from mmfusion.train.stages import ContrastiveProbe

    ckpt = Checkpoint(src / "checkpoints" / f"step-{pre_steps:08d}", pre_steps)
    model_state, optim_state, state = ckpt.load()
    assert state["stage"]["index"] == 0 and state["stage"]["step"] == pre_steps, state["stage"]
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    dump_config(cfg, dst / "config.yaml")
    logs = [x for x in (src / "metrics.jsonl").read_text().splitlines() if '"stage": "pretrain"' in x]
    (dst / "metrics.jsonl").write_text("\n".join(logs) + "\n")
    seed_everything(cfg.seed)  # the head's init exactly as a fresh run of cfg draws it
    fresh = ContrastiveProbe(cfg.model, TextTokenizer.load(dst, cfg.model.text.context_length)).state_dict()
    model_state = {k: v for k, v in model_state.items() if not k.startswith("head.")}
    model_state.update({k: v for k, v in fresh.items() if k.startswith("head.")})
    state.pop("optimizer")
    save_checkpoint(dst / "checkpoints", pre_steps, model_state, optim_state, state, keep=2)


def mean_std(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {"clft": "tab:blue", "scratch": "tab:orange"}
    for r in results:
        steps, acc = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(steps, acc, color=colours[r["arm"]], marker="o", ms=3, label=f"{r['arm']} seed {r['seed']}")
    ax.axhline(results[0]["chance"], color="grey", ls=":", label="chance")
    ax.set_xlabel("fine-tuning step (labelled batches)")
    ax.set_ylabel(f"val accuracy ({results[0]['label']} of the leftmost object)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    results = []
    for seed in args.seeds:
        for arm in ("clft", "scratch"):
            r = run_arm(arm, seed, args)
            print(f"{arm} seed {seed}: test accuracy {r['test_accuracy']:.4f} ({r['train_seconds']:.0f} s)")
            results.append(r)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "clft_curves.png")
    by = {arm: [r for r in results if r["arm"] == arm] for arm in ("clft", "scratch")}
    print(
        f"\nlabel: {results[0]['label']} (chance {results[0]['chance']:.2f}), {args.n_labels} labels, "
        f"test n = {results[0]['n_test']}, seeds {args.seeds}"
    )
    print("| arm | steps | test accuracy per seed | mean ± std | train s (mean) |")
    print("|---|---|---|---:|---:|")
    for arm, rs in by.items():
        steps = " + ".join(f"{n} {s}" for n, s in rs[0]["steps"])
        per_seed = ", ".join(f"{r['test_accuracy']:.4f}" for r in rs)
        secs = statistics.mean(r["train_seconds"] for r in rs)
        print(f"| {arm} | {steps} | {per_seed} | {mean_std([r['test_accuracy'] for r in rs])} | {secs:.0f} |")
    diffs = [c["test_accuracy"] - s["test_accuracy"] for c, s in zip(by["clft"], by["scratch"])]
    print(f"CL-FT - scratch (paired by seed): {mean_std(diffs)}")
    print(f"results: {out / 'results.json'}; plot: {out / 'clft_curves.png'}")


if __name__ == "__main__":
    main()
