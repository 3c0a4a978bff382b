#!/usr/bin/env python
"""Does knowledge distillation help a student? Two comparisons against the student trained alone (T5).

Data: paired scenes of the synthetic world (`mmfusion.data.tasks.paired_samples`): each scene's image and
audio, labelled with an attribute of the leftmost object (--label, default its colour: 8 classes). The
audio carries it too: the leftmost object sounds first, its colour as the pitch.

cross-modal (seeds 001, 004): an IMAGE teacher, trained on all --pairs labelled images, teaches an AUDIO
  student. Student alone: the audio model on the first --labels labelled clips. Distilled: the same audio
  model on all --pairs clips, of which only the first --labels keep their label; the teacher sees each
  clip's paired image and its soft targets (alpha on labelled rows, 1 on unlabelled ones) train the student.
same-modality: a bigger image teacher (--teacher-size, trained on all --pairs labels) teaches a smaller
  image student (--student-size): KL on logits + feature matching (--beta, through a trained projection),
  against the small student alone. Both students have --same-labels labels (default: all --pairs, i.e. the
  teacher's own data, so only soft targets and hints differ); the distilled one also gets the rest unlabelled.

Every model is a MultiModalModel (late fusion) trained by the ordinary Trainer for the stated steps (the
distilled student runs as a DistillationModel). Test accuracy on --test held-out scenes (test split);
learning curves every --eval-every steps on the same test set. Each comparison runs for each of --seeds
(model init, data order and teacher). Writes <out>/results.json, the plot (--plot) and prints Markdown tables.
Default: both comparisons, 3 seeds: 8.7 min wall on one thread of the shared 2-core machine under load ~10.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--label", default="colour", choices=["colour", "shape", "size"])
    p.add_argument("--pairs", type=int, default=2048, help="paired training scenes (teachers see all labels)")
    p.add_argument("--labels", type=int, default=16, help="labelled scenes for the cross-modal students")
    p.add_argument(
        "--same-labels",
        type=int,
        default=None,
        help="labelled scenes for the same-modality students (default: --pairs, the teacher's own data)",
    )
    p.add_argument("--test", type=int, default=1024, help="held-out test scenes")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--student-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64, help="teachers' batch size")
    p.add_argument("--student-batch-size", type=int, default=32, help="students' batch size (both arms)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight on labelled rows")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--beta", type=float, default=1.0, help="feature matching weight (same-modality)")
    p.add_argument("--cross-beta", type=float, default=0.0, help="feature matching weight (cross-modal)")
    p.add_argument("--feature-loss", default="cosine", choices=["mse", "cosine"])
    p.add_argument("--teacher-size", default="small", choices=["tiny", "small", "base"])
    p.add_argument("--student-size", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--comparisons", nargs="+", default=["cross_modal", "same_modality"])
    p.add_argument("--out", default="runs/distill_benchmark", help="results.json goes here")
    p.add_argument("--plot", default=str(ROOT / "docs" / "img" / "distill.png"))
    p.add_argument("--replot", metavar="RESULTS_JSON", help="only redraw --plot from an earlier results.json")
    return p.parse_args(argv)


class TensorData:
    """The Trainer's TrainData over one pre-collated Batch (every step slices rows of it; drop last)."""

    def __init__(self, batch, batch_size: int, seed: int):
        self.batch, self.batch_size, self.seed = batch, batch_size, seed

    def steps_per_epoch(self) -> int:
        return len(self.batch) // self.batch_size

    def step_batches(self, epoch, start_step, rank, world, accumulation):
        from mmfusion.batch import Batch
        from mmfusion.data.loader import epoch_permutation

        perm = epoch_permutation(len(self.batch), self.seed, epoch)
        b = self.batch
        for step in range(start_step, self.steps_per_epoch()):
            idx = perm[step * self.batch_size : (step + 1) * self.batch_size]
            yield [Batch({k: v[idx] for k, v in b.data.items()}, {k: v[idx] for k, v in b.mask.items()})]


def fit(
    model, batch, steps: int, args, seed: int, test, batch_size: int
) -> tuple[list[tuple[int, float]], float]:
    """Train `model` with the Trainer on `batch`; returns the test-accuracy curve and the train seconds."""
    from mmfusion.config import TrainConfig
    from mmfusion.train.distill import accuracy
    from mmfusion.train.trainer import Trainer

    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=args.lr,
        warmup_steps=min(50, steps // 10),
        weight_decay=0.01,
        device="cpu",
        threads=args.threads,
        log_every=steps,
        eval_every=args.eval_every,
        checkpoint_every=10**9,
        progress=False,
    )
    curve: list[tuple[int, float]] = []

    def on_eval(module, step):
        curve.append((step, accuracy(module, test)))
        return {"test_accuracy": curve[-1][1]}

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(
            model, TensorData(batch, batch_size, seed), cfg, tmp, log=lambda m: None, on_eval=on_eval
        ).fit()
    return curve, time.perf_counter() - t0


def build(modality: str, size: str, n_classes: int):
    from mmfusion.models.multimodal import MultiModalModel

    return MultiModalModel({modality: size}, fusion="late", n_classes=n_classes)


def take_rows(batch, start: int, stop: int):
    """Rows start:stop of a Batch."""
    from mmfusion.batch import Batch

    return Batch(
        {k: v[start:stop] for k, v in batch.data.items()}, {k: v[start:stop] for k, v in batch.mask.items()}
    )


def unlabel_after(batch, n: int):
    from mmfusion.batch import Batch
    from mmfusion.train.distill import UNLABELLED

    label = batch.data["label"].clone()
    label[n:] = UNLABELLED
    return Batch({**batch.data, "label": label}, batch.mask)


def student_labels(name: str, args) -> int:
    """How many labelled scenes the students of comparison `name` get."""
    return args.labels if name == "cross_modal" else (args.same_labels or args.pairs)


def compare(name: str, seed: int, data, args) -> list[dict]:
    """One comparison for one seed: teacher, student alone, distilled student."""
    import torch

    from mmfusion.data.tasks import label_classes
    from mmfusion.train.distill import DistillationModel

    train, test = data
    n_cls = len(label_classes(args.label))
    if name == "cross_modal":
        t_mod, t_size, s_mod, s_size, beta = "image", "tiny", "audio", "tiny", args.cross_beta
    else:
        t_mod, t_size, s_mod, s_size, beta = "image", args.teacher_size, "image", args.student_size, args.beta
    n_lab = student_labels(name, args)
    sbs = min(args.student_batch_size, n_lab)  # the alone arm needs a full batch of labelled samples
    rows = []

    def record(arm, model, curve, secs, steps):
        params = sum(p.numel() for p in model.parameters())
        acc = curve[-1][1]
        rows.append(
            {"comparison": name, "arm": arm, "seed": seed, "test_accuracy": acc, "curve": curve,
             "train_seconds": secs, "steps": steps, "params": params}
        )  # fmt: skip
        print(f"  [{name} seed {seed}] {arm}: test accuracy {acc:.4f} ({secs:.0f} s)", flush=True)

    torch.manual_seed(1000 + seed)
    teacher = build(t_mod, t_size, n_cls)
    curve, secs = fit(teacher, train, args.teacher_steps, args, seed, test, args.batch_size)
    record(f"teacher ({t_mod} {t_size})", teacher, curve, secs, args.teacher_steps)

    torch.manual_seed(seed)
    alone = build(s_mod, s_size, n_cls)
    curve, secs = fit(alone, take_rows(train, 0, n_lab), args.student_steps, args, seed, test, sbs)
    record("student alone", alone, curve, secs, args.student_steps)

    torch.manual_seed(seed)  # the same student init as the alone arm
    student = build(s_mod, s_size, n_cls)
    wrapped = DistillationModel(student, teacher, args.alpha, args.temperature, beta, args.feature_loss)
    curve, secs = fit(wrapped, unlabel_after(train, n_lab), args.student_steps, args, seed, test, sbs)
    record("student distilled", student, curve, secs, args.student_steps)
    return rows


def mean_std(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def plot(results: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparisons = args.comparisons
    fig, axes = plt.subplots(1, len(comparisons), figsize=(5.5 * len(comparisons), 4), squeeze=False)
    colours = {"student alone": "tab:orange", "student distilled": "tab:blue"}
    for ax, name in zip(axes[0], comparisons):
        for r in results:
            if r["comparison"] != name or r["arm"] not in colours:
                continue
            steps, acc = zip(*r["curve"])
            label = r["arm"] if r["seed"] == results[0]["seed"] else None
            ax.plot(steps, acc, color=colours[r["arm"]], marker="o", ms=2, alpha=0.8, label=label)
        teachers = [
            r["test_accuracy"] for r in results if r["comparison"] == name and r["arm"].startswith("teacher")
        ]
        ax.axhline(statistics.mean(teachers), color="grey", ls="--", label="teacher (mean)")
        ax.set_title(f"{name.replace('_', '-')}: students with {student_labels(name, args)} labels")
        ax.set_xlabel("student step")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(saved["results"], argparse.Namespace(**saved["args"]), Path(args.plot))
        print(f"plot: {args.plot}")
        return
    import torch

    from mmfusion.data.synthetic import SyntheticWorld, WorldConfig
    from mmfusion.data.tasks import collate, paired_samples

    torch.set_num_threads(args.threads)
    world = SyntheticWorld(WorldConfig(seed=0))
    train = collate(paired_samples(world, "train", args.pairs, args.label))
    test_batch = collate(paired_samples(world, "test", args.test, args.label))
    test = [take_rows(test_batch, i, i + 256) for i in range(0, args.test, 256)]
    results = []
    for name in args.comparisons:
        for seed in args.seeds:
            results.extend(compare(name, seed, (train, test), args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    plot(results, args, Path(args.plot))
    print(f"\nlabel: {args.label} of the leftmost object, test n = {args.test}, seeds {args.seeds}")
    for name in args.comparisons:
        rs = [r for r in results if r["comparison"] == name]
        n_lab = student_labels(name, args)
        print(f"\n{name}: students have {n_lab} labels of {args.pairs} pairs (teacher: all {args.pairs})")
        print("| arm | params | steps | test accuracy per seed | mean ± std | train s (mean) |")
        print("|---|---:|---:|---|---:|---:|")
        for arm in dict.fromkeys(r["arm"] for r in rs):
            a = [r for r in rs if r["arm"] == arm]
            per_seed = ", ".join(f"{r['test_accuracy']:.4f}" for r in a)
            secs = statistics.mean(r["train_seconds"] for r in a)
            print(
                f"| {arm} | {a[0]['params']:,} | {a[0]['steps']} | {per_seed} | "
                f"{mean_std([r['test_accuracy'] for r in a])} | {secs:.0f} |"
            )
        alone = [r["test_accuracy"] for r in rs if r["arm"] == "student alone"]
        dist = [r["test_accuracy"] for r in rs if r["arm"] == "student distilled"]
        print(f"distilled - alone (paired by seed): {mean_std([d - a for d, a in zip(dist, alone)])}")
    print(f"\nresults: {out / 'results.json'}; plot: {args.plot}")


if __name__ == "__main__":
    main()
