#!/usr/bin/env python
"""Loader throughput of mmfusion's streaming loader vs plain `webdataset`; the trainer's data-wait fraction.

1. Shards: `--n` synthetic image+text samples (`--image-size` px, `--samples-per-shard` each) written with
   `sources.write_webdataset` into a temporary folder (or `--shards DIR` to reuse existing ones).
2. Loader throughput (samples/s delivered): both loaders read the same shards through a `DataLoader`
   (batch_size=None, `--workers` processes) with a shuffle buffer of `--shuffle` samples and decode images to
   (H, W, 3) uint8 and captions to str:
     * plain:   ``wds.WebDataset(urls, shardshuffle=False).shuffle(N).decode("rgb8")``
     * mmfusion: ``StreamingDataset(urls, shuffle=N)`` (exactly-once split, typed errors, augmentation hook)
   Rounds alternate (plain, mmfusion, plain, ...) after one warm-up pass each; reported: the median
   samples/s and the ratio mmfusion / plain of the medians ("ratio") and of the best rounds ("best"); with
   0 workers also the ratio of samples per CPU-second of this process ("cpu ratio"), which a busy shared
   machine disturbs least.
3. Data-wait fraction of the quickstart training (configs/quickstart.yaml, `--train-steps` steps, global
   batch `--batch-size`): the real `Trainer` is run with its data wrapped in `TimedData`, which times
   every `next()` on the step iterator (what the training loop waits for) against the wall time of
   `Trainer.fit`. Two data paths: the quickstart's own (in-memory synthetic samples, `MapData`) and the
   streaming loader over the shards (`StreamData`). "1st s" is the wait for the first step (worker
   start-up, shuffle-buffer fill); "steady %" is the fraction without it.

Writes `<out>/data_throughput.json` and `<out>/data_throughput.png` and prints a table.
Example: ``python benchmarks/data_throughput.py --threads 1`` (about 1-2 minutes on one core).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Samples/s of mmfusion's streaming loader vs plain webdataset, and the quickstart "
        "training's data-wait fraction.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--n", type=int, default=4000, help="synthetic samples to write as shards")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument(
        "--shards", default=None, help="use these shards (folder / pattern) instead of writing new ones"
    )
    p.add_argument("--shuffle", type=int, default=1000, help="shuffle-buffer size for both loaders")
    p.add_argument("--workers", default="0", help="comma-separated DataLoader worker counts to measure")
    p.add_argument("--rounds", type=int, default=5, help="timed passes per loader and worker count")
    p.add_argument(
        "--train-steps", type=int, default=30, help="training steps for the data-wait fraction (0: skip)"
    )
    p.add_argument("--batch-size", type=int, default=128, help="global batch of the timed training")
    p.add_argument("--train-workers", type=int, default=0, help="DataLoader workers of the timed training")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--config", default="configs/quickstart.yaml", help="training config")
    p.add_argument("--out", default="runs/data_throughput", help="folder for the JSON and the plot")
    args = p.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        p.error(f"--workers {args.workers!r}: expected comma-separated integers")
    if args.n < 1 or args.rounds < 1 or args.train_steps < 0 or any(w < 0 for w in args.workers):
        p.error("--n and --rounds must be >= 1, --train-steps and --workers >= 0")
    return args


# ---- shards -----------------------------------------------------------------------------------------------
def write_shards(args: argparse.Namespace, folder: Path) -> list[str]:
    from mmfusion.data.synthetic import SyntheticWorld, WorldConfig, make_split
    from mmfusion.data.writers import write_webdataset

    world = SyntheticWorld(WorldConfig(seed=0, image_size=args.image_size))
    samples = make_split(world, "train", args.n, ("image", "text"), progress=True)
    return [str(p) for p in write_webdataset(samples, folder, "bench", args.samples_per_shard)]


# ---- loader throughput -------------------------------------------------------------------------------------
def plain_wds(urls: list[str], shuffle: int):
    import webdataset as wds

    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    if shuffle > 1:
        ds = ds.shuffle(shuffle)
    return ds.decode("rgb8")


def ours(urls: list[str], shuffle: int):
    from mmfusion.data.engine.stream import StreamingDataset

    return StreamingDataset(urls, shuffle=shuffle, seed=0)


def _identity(x):
    return x


def one_pass(dataset, workers: int) -> tuple[int, float, float]:
    """(samples delivered, wall seconds, this process's CPU seconds) of one full pass through a DataLoader."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity)
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for sample in loader:
        n += 1
        assert sample is not None
    return n, time.perf_counter() - t0, time.process_time() - c0


def loader_throughput(urls: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for workers in args.workers:
        makers = {
            "webdataset": lambda: plain_wds(urls, args.shuffle),
            "mmfusion": lambda: ours(urls, args.shuffle),
        }
        rates: dict[str, list[float]] = {k: [] for k in makers}
        cpu_rates: dict[str, list[float]] = {k: [] for k in makers}
        counts: dict[str, int] = {}
        for name, make in makers.items():  # warm-up: page cache, imports, worker start-up code paths
            counts[name] = one_pass(make(), workers)[0]
        for _ in range(args.rounds):
            for name, make in makers.items():
                n, s, cpu = one_pass(make(), workers)
                rates[name].append(n / s)
                cpu_rates[name].append(n / max(cpu, 1e-9))
        if counts["webdataset"] != counts["mmfusion"]:
            raise SystemExit(f"the loaders delivered different sample counts: {counts}")
        plain, mine = statistics.median(rates["webdataset"]), statistics.median(rates["mmfusion"])
        best_plain, best_mine = max(rates["webdataset"]), max(rates["mmfusion"])
        row = {
            "workers": workers,
            "samples": counts["mmfusion"],
            "webdataset_samples_per_s": plain,
            "mmfusion_samples_per_s": mine,
            "ratio": mine / plain,
            "best_ratio": best_mine / best_plain,
            "rounds": rates,
        }
        if workers == 0:  # all decoding happens in this process: CPU time is robust to a busy machine
            cpu_plain, cpu_mine = (
                statistics.median(cpu_rates["webdataset"]),
                statistics.median(cpu_rates["mmfusion"]),
            )
            row.update(
                webdataset_samples_per_cpu_s=cpu_plain,
                mmfusion_samples_per_cpu_s=cpu_mine,
                cpu_ratio=cpu_mine / cpu_plain,
            )
        rows.append(row)
    return rows


# ---- data-wait fraction ----------------------------------------------------------------------------------
class TimedData:
    """Wraps a TrainData (MapData / StreamData) and times every next() on its step iterator."""

    def __init__(self, data):
        self.data, self.wait_s, self.steps, self.first_wait_s = data, 0.0, 0, None

    def steps_per_epoch(self) -> int:
        return self.data.steps_per_epoch()

    def step_batches(self, *args):
        it = self.data.step_batches(*args)
        while True:
            t0 = time.perf_counter()
            try:
                group = next(it)
            except StopIteration:
                self.wait_s += time.perf_counter() - t0
                return
            waited = time.perf_counter() - t0
            self.wait_s += waited
            if self.first_wait_s is None:  # start-up: workers, shuffle-buffer fill, first batch
                self.first_wait_s = waited
            self.steps += 1
            yield group


def data_wait(urls: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    from mmfusion.config import load_config
    from mmfusion.data.collate import Collate, Input
    from mmfusion.data.engine.stream import StreamingDataset
    from mmfusion.data.loader import ListDataset, MapData, StreamData
    from mmfusion.data.synthetic import SyntheticWorld, WorldConfig, make_split
    from mmfusion.modalities.image import SPEC as IMAGE
    from mmfusion.modalities.text import SPEC as TEXT
    from mmfusion.modalities.text import TextTokenizer
    from mmfusion.models.contrastive import ContrastiveModel
    from mmfusion.train.trainer import Trainer

    n_train = args.train_steps * args.batch_size
    cfg = load_config(
        args.config,
        [
            f"train.steps={args.train_steps}",
            f"train.batch_size={args.batch_size}",
            f"train.threads={args.threads}",
            f"train.checkpoint_every={10**6}",
            f"train.log_every={10**6}",
            "train.progress=false",
            f"data.num_workers={args.train_workers}",
        ],
    )
    world = SyntheticWorld(WorldConfig(seed=cfg.data.synthetic.seed, image_size=cfg.model.image.image_size))
    memory = make_split(world, "train", n_train, ("image", "text"), progress=True)
    tok = TextTokenizer.train(
        [s["text"] for s in memory], cfg.model.text.vocab_size, cfg.model.text.context_length
    )
    inputs = {
        "image": Input(IMAGE, IMAGE.config(image_size=cfg.model.image.image_size)),
        "text": Input(TEXT, TEXT.config()),
    }
    collate = Collate(inputs, tok, required=("image", "text"), meta=("id", "text", "scene_key", "scene"))
    stream = StreamingDataset(urls, shuffle=1000, seed=cfg.seed)
    paths = {
        "quickstart (in-memory synthetic, MapData)": lambda: MapData(
            ListDataset(memory), collate, args.batch_size, cfg.seed, args.train_workers
        ),
        "streaming shards (StreamingDataset, StreamData)": lambda: StreamData(
            stream, collate, args.batch_size, stream.num_samples(), args.train_workers
        ),
    }
    rows = []
    for name, make in paths.items():
        torch.manual_seed(cfg.seed)
        model = ContrastiveModel(cfg.model, tok)
        data = TimedData(make())
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(model, data, cfg.train, run_dir, log=lambda m: None)
            t0 = time.perf_counter()
            trainer.fit()
            total = time.perf_counter() - t0
        rows.append(
            {
                "data": name,
                "steps": data.steps,
                "train_s": total,
                "data_wait_s": data.wait_s,
                "data_wait_fraction": data.wait_s / total,
                "first_step_wait_s": data.first_wait_s,
                # after the first step: the steady state, with start-up left out of both sides
                "steady_wait_fraction": (data.wait_s - data.first_wait_s) / (total - data.first_wait_s),
                "steps_per_s": data.steps / total,
            }
        )
    return rows


# ---- report ------------------------------------------------------------------------------------------------
def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'workers':>7} {'samples':>8} {'webdataset/s':>13} {'mmfusion/s':>11} {'ratio':>6} {'best':>5} "
        f"{'cpu ratio':>9}",
        *(
            f"{r['workers']:>7} {r['samples']:>8} {r['webdataset_samples_per_s']:>13.0f} "
            f"{r['mmfusion_samples_per_s']:>11.0f} {r['ratio']:>6.2f} {r['best_ratio']:>5.2f} "
            f"{r.get('cpu_ratio', float('nan')):>9.2f}"
            for r in result["loader"]
        ),
    ]
    if result["data_wait"]:
        lines += [
            "",
            f"{'training data':<50} {'steps':>5} {'train s':>8} {'wait s':>7} {'wait %':>7} {'1st s':>6} "
            f"{'steady %':>8}",
        ]
        lines += [
            f"{r['data']:<50} {r['steps']:>5} {r['train_s']:>8.2f} {r['data_wait_s']:>7.2f} "
            f"{100 * r['data_wait_fraction']:>6.1f}% {r['first_step_wait_s']:>6.2f} "
            f"{100 * r['steady_wait_fraction']:>7.1f}%"
            for r in result["data_wait"]
        ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    rows = result["loader"]
    xs = range(len(rows))
    ax.bar(
        [x - 0.2 for x in xs], [r["webdataset_samples_per_s"] for r in rows], 0.4, label="plain webdataset"
    )
    ax.bar([x + 0.2 for x in xs], [r["mmfusion_samples_per_s"] for r in rows], 0.4, label="mmfusion stream")
    ax.set_xticks(list(xs), [f"{r['workers']} workers" for r in rows])
    ax.set_ylabel("samples / s delivered")
    ax.legend(fontsize=8)
    if result["data_wait"]:
        ax2 = fig.add_subplot(1, 2, 2)
        waits = result["data_wait"]
        ax2.bar(range(len(waits)), [100 * r["data_wait_fraction"] for r in waits])
        ax2.set_xticks(range(len(waits)), [r["data"].split(" (")[0] for r in waits], fontsize=8)
        ax2.set_ylabel("training time waiting for data (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            from mmfusion.data.sources import shard_list

            urls = shard_list(args.shards)
        else:
            urls = write_shards(args, Path(tmp))
        result: dict[str, Any] = {
            "command": " ".join(["python", "benchmarks/data_throughput.py", *(argv or sys.argv[1:])]),
            "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
            "shards": len(urls),
            "args": {k: v for k, v in vars(args).items()},
            "loader": loader_throughput(urls, args),
            "data_wait": data_wait(urls, args) if args.train_steps else [],
        }
    (out / "data_throughput.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "data_throughput.png")
    print(table(result))
    print(f"wrote {out / 'data_throughput.json'} and {out / 'data_throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
