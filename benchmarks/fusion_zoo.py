"""The fusion benchmark: every fusion strategy x every synthetic task, several seeds (issue 3, part 7).

For each (task, fusion, seed) a MultiModalModel with tiny encoders is trained for a fixed number of steps on
pre-collated batches (so the figures compare models, not data loading), then evaluated on the test split:
accuracy with every modality and with each one removed, parameters, training samples/s, inference latency per
sample (batch 1, median) and throughput (batch 64), MoE expert load (CV of assignments per expert over the test
set) and, for the router, its mean gates and inference-time modality pruning at several thresholds (speed-up and
accuracy change). Single-modality baselines (one encoder, same budget) give the reference for the acceptance
figures: accuracy with a modality missing vs a model trained on the remaining modality alone.

    .venv/bin/python benchmarks/fusion_zoo.py                       # everything, 3 seeds (~40 min on 2 cores)
    .venv/bin/python benchmarks/fusion_zoo.py --tasks vqa --seeds 0 --fusions late router
    .venv/bin/python benchmarks/fusion_zoo.py --tasks video_text --fusions cross_attention --seeds 0 \
        --no-baselines --align-loss 0 --out runs/fusion_zoo_no_align     # ablations: use their own --out

Each run writes runs/fusion_zoo/runs/<task>-<fusion>-<seed>.json and is skipped when that file exists (delete
it or pass --fresh to redo). The summary (table.md, results.json, fusion_zoo.png) is rebuilt from all run files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

FUSIONS = ("early", "late", "cross_attention", "router", "moe")
TASK_NAMES = ("vqa", "audio_image", "video_text", "audio_visual")
# Per-task budget, calibrated on this CPU with tiny encoders (dim 32): samples, steps of `batch`, AdamW lr,
# align_loss (ALBEF-style alignment for the two-modality match tasks; without it they stay at chance). Every
# multimodal model trains with modality dropout 0.3: on the match tasks a sample left with one modality carries
# no label information, so they get twice the steps they need without dropout (800 vs 400).
SETTINGS: dict[str, dict[str, Any]] = {
    "vqa": {"n_train": 4000, "steps": 1500, "batch": 64, "lr": 2e-3, "align_loss": 0.0},
    "audio_image": {"n_train": 1600, "steps": 800, "batch": 64, "lr": 3e-3, "align_loss": 1.0},
    "video_text": {"n_train": 1200, "steps": 800, "batch": 64, "lr": 2e-3, "align_loss": 1.0},
    "audio_visual": {"n_train": 1600, "steps": 800, "batch": 64, "lr": 3e-3, "align_loss": 1.0},
}
N_TEST = 400
DIM = 32
MODALITY_DROPOUT = 0.3
FUSION_KWARGS: dict[str, dict[str, Any]] = {
    "moe": {"num_experts": 8, "top_k": 2, "load_balance_coef": 0.1},
}
PRUNE_THRESHOLDS = (0.1, 0.2, 0.3, 0.4)
LEARNED = 0.6  # a match-task run "learned" when its accuracy with every modality reaches this (chance 0.5)
MATCH_TASKS = ("audio_image", "video_text", "audio_visual")


def _data(task: str, n_train: int):
    """(train Batch, test Batch, tokenizer) for `task`; the same data for every fusion and seed."""
    from mmfusion.data.synthetic import SyntheticWorld
    from mmfusion.data.tasks import TASKS, collate, make_task_data, task_tokenizer

    world = SyntheticWorld()
    train = make_task_data(task, world, "train", n_train, seed=0)
    test = make_task_data(task, world, "test", N_TEST, seed=1)
    tok = task_tokenizer(train) if "text" in TASKS[task].modalities else None
    return collate(train, tok), collate(test, tok), tok


def _rows(batch, idx):
    from mmfusion.batch import Batch

    return Batch({k: v[idx] for k, v in batch.data.items()}, {k: v[idx] for k, v in batch.mask.items()})


def _chunks(batch, size: int):
    import torch

    return [_rows(batch, torch.arange(i, min(i + size, len(batch)))) for i in range(0, len(batch), size)]


def _best_time(fn, repeats: int = 3) -> tuple[float, Any]:
    """(fastest of `repeats` timed calls after one untimed warm-up, in seconds; the warm-up call's result)."""
    result = fn()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def run_one(
    task: str,
    fusion: str,
    seed: int,
    modalities: tuple[str, ...] | None = None,
    overrides: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Train and measure one (task, fusion, seed); `modalities` restricts the encoders (single-modality
    baselines, fusion "late"); `overrides` may replace "align_loss" (two-modality tasks) and
    "modality_dropout" (multimodal models)."""
    import torch

    from mmfusion.data.tasks import TASKS
    from mmfusion.eval.missing import missing_modality_eval
    from mmfusion.eval.pruning import calibrate_pruning, predict_pruned
    from mmfusion.models.multimodal import MultiModalModel

    torch.set_num_threads(1)
    spec, cfg = TASKS[task], {**SETTINGS[task], "modality_dropout": MODALITY_DROPOUT, **(overrides or {})}
    train, test, tok = _data(task, cfg["n_train"])
    mods = modalities or spec.modalities
    torch.manual_seed(seed)
    model = MultiModalModel(
        encoders={m: "tiny" for m in mods},
        fusion=fusion,
        head=spec.head,
        n_classes=spec.n_classes,
        dim=DIM,
        fusion_kwargs=FUSION_KWARGS.get(fusion, {}),
        modality_dropout=cfg["modality_dropout"] if len(mods) > 1 else 0.0,
        tokenizer=tok,
        align_loss=cfg["align_loss"] if len(mods) == 2 else 0.0,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        out = model(_rows(train, torch.randint(len(train), (cfg["batch"],), generator=g)))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    batches = _chunks(test, 64)
    result: dict[str, Any] = {
        "task": task,
        "fusion": fusion,
        "seed": seed,
        "modalities": list(mods),
        "overrides": overrides or {},
        "params": sum(p.numel() for p in model.parameters()),
        "train_samples_per_s": cfg["steps"] * cfg["batch"] / train_s,
        "accuracy": missing_modality_eval(model, batches),
    }
    with torch.no_grad():
        single = [_rows(test, torch.tensor([i])) for i in range(40)]
        model.predict(single[0])
        times = []
        for b in single:
            t = time.perf_counter()
            model.predict(b)
            times.append(time.perf_counter() - t)
        result["latency_ms_batch1"] = 1e3 * statistics.median(times[5:])
        full_s, _ = _best_time(lambda: [model.predict(b) for b in batches])
        result["infer_samples_per_s_batch64"] = len(test) / full_s
        if fusion == "moe":
            load = sum(model.encode(b).info["tokens_per_expert"] for b in batches)
            result["moe_load"] = load.tolist()
            result["moe_cv"] = float(load.std(unbiased=False) / load.mean())
            result["moe_max_over_mean"] = float(load.max() / load.mean())
        if fusion == "router" and len(mods) > 1:
            gates = torch.cat([model.encode(b).info["gates"] for b in batches])
            result["router_mean_gates"] = dict(zip(model.fusion.modalities, gates.mean(0).tolist()))
            means = calibrate_pruning(model, _chunks(_rows(train, torch.arange(min(256, len(train)))), 64))
            labels = test.data["label"]
            prune = []
            for candidate in mods:
                for thr in PRUNE_THRESHOLDS:
                    pruned_s, outs = _best_time(
                        lambda thr=thr, c=candidate: [
                            predict_pruned(model, means, b, thr, [c]) for b in batches
                        ]
                    )
                    preds, skipped = zip(*outs)
                    acc = float((torch.cat(preds) == labels).float().mean())
                    frac = float(torch.cat([s[candidate] for s in skipped]).float().mean())
                    prune.append(
                        {
                            "skip": candidate,
                            "threshold": thr,
                            "skipped_fraction": frac,
                            "accuracy": acc,
                            "speedup": full_s / pruned_s,
                        }
                    )
            result["pruning"] = prune
    result["wall_s"] = time.perf_counter() - t0
    return result


def _jobs(tasks, fusions, seeds, baselines: bool) -> list[tuple[str, str, int, tuple[str, ...] | None]]:
    from mmfusion.data.tasks import TASKS

    jobs = [(t, f, s, None) for t in tasks for f in fusions for s in seeds]
    if baselines:
        jobs += [(t, "late", s, (m,)) for t in tasks for m in TASKS[t].modalities for s in seeds]
    return jobs


def _name(task, fusion, seed, mods) -> str:
    return f"{task}-{'only_' + mods[0] if mods else fusion}-{seed}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(out: Path) -> dict[str, Any]:
    """Aggregate every run file under out/runs into results.json, table.md and fusion_zoo.png."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        key = r["fusion"] if len(r["modalities"]) > 1 else f"only_{r['modalities'][0]}"
        groups.setdefault((r["task"], key), []).append(r)
    summary: dict[str, Any] = {}
    for (task, key), rs in sorted(groups.items()):
        row: dict[str, Any] = {"seeds": len(rs), "params": rs[0]["params"]}
        # match tasks (chance 0.5) either learn or stay on the plateau: count the seeds that left it
        row["seeds_learned"] = sum(r["accuracy"]["all"] >= LEARNED for r in rs)
        for metric in rs[0]["accuracy"]:
            row[f"acc_{metric}"] = _mean_std([r["accuracy"][metric] for r in rs])
        for metric in ("train_samples_per_s", "latency_ms_batch1", "infer_samples_per_s_batch64"):
            row[metric] = _mean_std([r[metric] for r in rs])
        if "moe_cv" in rs[0]:
            row["moe_cv"] = _mean_std([r["moe_cv"] for r in rs])
            row["moe_max_over_mean"] = _mean_std([r["moe_max_over_mean"] for r in rs])
        if "router_mean_gates" in rs[0]:
            row["router_mean_gates"] = {
                m: statistics.fmean(r["router_mean_gates"][m] for r in rs) for m in rs[0]["router_mean_gates"]
            }
            row["pruning"] = [
                {
                    **{k: p[k] for k in ("skip", "threshold")},
                    **{
                        k: statistics.fmean(r["pruning"][i][k] for r in rs)
                        for k in ("skipped_fraction", "accuracy", "speedup")
                    },
                }
                for i, p in enumerate(rs[0]["pruning"])
            ]
        summary.setdefault(task, {})[key] = row
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(render_markdown(summary))
    plot(summary, out / "fusion_zoo.png")
    return summary


def _fmt(ms: tuple[float, float], digits: int = 3) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def render_markdown(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    for task, rows in summary.items():
        fused = [k for k in FUSIONS if k in rows]
        singles = sorted(k for k in rows if k.startswith("only_"))
        mods = [m.removeprefix("acc_without_") for m in rows[fused[0]] if m.startswith("acc_without_")]
        match = task in MATCH_TASKS
        lines += [
            f"### {task}",
            "",
            "| model | all | "
            + (f"seeds ≥ {LEARNED} | " if match else "")
            + " | ".join(f"without {m}" for m in mods)
            + " | params | train samples/s | latency ms (batch 1) | infer samples/s (batch 64) | MoE load CV |",
            "|---" * (len(mods) + 7 + match) + "|",
        ]
        for k in fused:
            r = rows[k]
            cv = _fmt(r["moe_cv"]) if "moe_cv" in r else ""
            learned = f"{r['seeds_learned']}/{r['seeds']} | " if match else ""
            lines.append(
                f"| {k} | {_fmt(r['acc_all'])} | {learned}"
                + " | ".join(_fmt(r[f"acc_without_{m}"]) for m in mods)
                + f" | {r['params']:,} | {r['train_samples_per_s'][0]:.0f} | {r['latency_ms_batch1'][0]:.2f} "
                f"| {r['infer_samples_per_s_batch64'][0]:.0f} | {cv} |"
            )
        for k in singles:
            r = rows[k]
            lines.append(
                f"| {k.replace('_', ' ')} (single-modality baseline) | {_fmt(r['acc_all'])} | "
                + (f"{r['seeds_learned']}/{r['seeds']} | " if match else "")
                + " | ".join("" for _ in mods)
                + f" | {r['params']:,} | {r['train_samples_per_s'][0]:.0f} | {r['latency_ms_batch1'][0]:.2f} "
                f"| {r['infer_samples_per_s_batch64'][0]:.0f} | |"
            )
        if "router" in rows and "pruning" in rows["router"]:
            r = rows["router"]
            gates = ", ".join(f"{m} {g:.2f}" for m, g in r["router_mean_gates"].items())
            lines += [
                "",
                f"Router mean gates on the test set: {gates}. Inference-time pruning (batch 64, mean over seeds; "
                f"accuracy with every modality encoded: {r['acc_all'][0]:.3f}):",
                "",
                "| skip | gate threshold | rows skipped | accuracy | speed-up |",
                "|---|---:|---:|---:|---:|",
            ]
            for p in r["pruning"]:
                lines.append(
                    f"| {p['skip']} | {p['threshold']} | {p['skipped_fraction']:.2f} | {p['accuracy']:.3f} "
                    f"| {p['speedup']:.2f}× |"
                )
        lines.append("")
    checks = expectation_checks(summary)
    lines += ["### Expectations checked", ""] + [f"- {c}" for c in checks] + [""]
    return "\n".join(lines)


def expectation_checks(summary: dict[str, Any]) -> list[str]:
    """The issue's expectations and acceptance figures, each stated with the measured numbers."""
    out = []
    for task in ("vqa", "audio_visual", "audio_image", "video_text"):
        rows = summary.get(task)
        if not rows or "late" not in rows:
            continue
        late = rows["late"]["acc_all"][0]
        better = {k: rows[k]["acc_all"][0] for k in ("early", "cross_attention", "router") if k in rows}
        verdict = all(v > late + 0.02 for v in better.values())
        out.append(
            f"{task}: early / cross_attention / router beat late by > 2 points: {'yes' if verdict else 'NO'} "
            f"(late {late:.3f}; " + ", ".join(f"{k} {v:.3f}" for k, v in better.items()) + ")"
        )
    for task, rows in summary.items():
        fused = [k for k in FUSIONS if k in rows]
        if not fused:
            continue
        mods = [m.removeprefix("acc_without_") for m in rows[fused[0]] if m.startswith("acc_without_")]

        if (
            task not in MATCH_TASKS
        ):  # on a match task a model that never learned "loses" nothing: not comparable
            drops = {
                k: statistics.fmean(rows[k]["acc_all"][0] - rows[k][f"acc_without_{m}"][0] for m in mods)
                for k in fused
            }
            best = min(fused, key=drops.__getitem__)
            router = f"; router {drops['router']:.3f}" if "router" in rows else ""
            out.append(
                f"{task}: smallest mean accuracy loss when a modality is missing: {best} ({drops[best]:.3f}{router})"
            )
        for m in mods if task not in MATCH_TASKS else ():  # match tasks: both sides are at chance by design
            remaining = [o for o in mods if o != m]
            base = rows.get(f"only_{remaining[0]}") if len(remaining) == 1 else None
            if base is None:
                continue
            ref = base["acc_all"][0]
            verdicts = ", ".join(
                f"{k} {rows[k][f'acc_without_{m}'][0]:.3f} {'yes' if rows[k][f'acc_without_{m}'][0] >= 0.97 * ref else 'NO'}"
                for k in fused
            )
            out.append(
                f"{task}, without {m}: ≥ 0.97 × the {remaining[0]}-only model ({ref:.3f} → {0.97 * ref:.3f}): "
                f"{verdicts}"
            )
        singles = [rows[k]["acc_all"][0] for k in rows if k.startswith("only_")]
        if task == "audio_visual" and singles:
            lo = min(fused, key=lambda k: rows[k]["acc_all"][0])
            v = rows[lo]["acc_all"][0]
            out.append(
                f"audio_visual: every fusion ≥ best single modality + 5 points ({max(singles):.3f} + 0.05): "
                f"{'yes' if v >= max(singles) + 0.05 else 'NO'} (lowest: {lo} {v:.3f})"
            )
        if "moe" in rows:
            cv = rows["moe"]["moe_cv"][0]
            out.append(f"{task}: MoE load CV < 0.2: {'yes' if cv < 0.2 else 'NO'} ({cv:.3f})")
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = summary[task]
        fused = [k for k in FUSIONS if k in rows]
        mods = [m.removeprefix("acc_without_") for m in rows[fused[0]] if m.startswith("acc_without_")]
        settings = ["all"] + [f"without_{m}" for m in mods]
        width = 0.8 / len(settings)
        for j, s in enumerate(settings):
            xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(fused))]
            ax.bar(
                xs,
                [rows[k][f"acc_{s}"][0] for k in fused],
                width,
                yerr=[rows[k][f"acc_{s}"][1] for k in fused],
                label=s.replace("_", " "),
            )
        for k in rows:
            if k.startswith("only_"):
                ax.axhline(rows[k]["acc_all"][0], ls="--", lw=1, color="grey")
        ax.set_xticks(range(len(fused)))
        ax.set_xticklabels([k.replace("cross_attention", "cross") for k in fused], rotation=30)
        ax.set_ylim(0, 1)
        ax.set_title(task)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("test accuracy (dashed: single-modality models)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _worker(job) -> tuple[str, dict[str, Any]]:
    task, fusion, seed, mods, overrides = job
    return _name(task, fusion, seed, mods), run_one(task, fusion, seed, mods, overrides)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    p.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=FUSIONS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--no-baselines", action="store_true", help="skip the single-modality baselines")
    p.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs (1 thread each)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/fusion_zoo"))
    p.add_argument("--fresh", action="store_true", help="redo runs whose result file exists")
    p.add_argument(
        "--align-loss", type=float, help="replace every task's align_loss (ablation; give it its own --out)"
    )
    p.add_argument(
        "--modality-dropout",
        type=float,
        help=f"replace the modality dropout {MODALITY_DROPOUT} (ablation; give it its own --out)",
    )
    args = p.parse_args(argv)
    overrides = {
        k: v
        for k, v in (("align_loss", args.align_loss), ("modality_dropout", args.modality_dropout))
        if v is not None
    }
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    jobs = [(*j, overrides) for j in _jobs(args.tasks, args.fusions, args.seeds, not args.no_baselines)]
    todo = [j for j in jobs if args.fresh or not (args.out / "runs" / f"{_name(*j[:4])}.json").exists()]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done; {args.jobs} in parallel", flush=True)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_worker, j) for j in todo]
        bar = tqdm(total=len(futures), desc="fusion zoo", file=sys.stdout) if tqdm else None
        for fut in as_completed(futures):
            name, result = fut.result()
            (args.out / "runs" / f"{name}.json").write_text(json.dumps(result, indent=1))
            msg = f"{name}: acc {result['accuracy']} ({result['wall_s']:.0f} s)"
            if bar:
                bar.write(msg)
                bar.update()
            else:
                print(msg, flush=True)
        if bar:
            bar.close()
    summarise(args.out)
    print((args.out / "table.md").read_text())
    print(f"written: {args.out / 'table.md'}, {args.out / 'results.json'}, {args.out / 'fusion_zoo.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
