#!/usr/bin/env python
"""Size, latency and retrieval quality of a contrastive model after each compression step (I6).

Variants, all from one model folder: fp32 PyTorch (the reference), fp32 ONNX (`mmfusion.serve.export`),
int8 ONNX (ONNX Runtime dynamic quantization), 50% globally magnitude-pruned PyTorch Linear weights
(no fine-tuning), the same pruned model fine-tuned `--finetune-steps` steps with its masks kept (on the
run's training data, with the run's train config: `serve.quantize.finetune_pruned`), and with
`--torchao` torchao int8 weight-only PyTorch.

* size: bytes on disk — model.safetensors for PyTorch variants (pruned weights are stored dense, so
  pruning alone does not shrink the file), the two encoder files for ONNX. torchao has no file here.
* latency: median wall time of one batch through both towers (`--batch-size` images + as many
  captions padded to the full context length), after warm-up, on `--threads` threads.
* quality: text->image and image->text recall@1/@5 on the synthetic test split (scene-matched),
  through `eval.report.evaluate_contrastive` for PyTorch models and `eval.retrieval.embed_dataset` +
  `retrieval_metrics` for ONNX sessions.

Without `--model`, a small model is trained first (about a minute on 2 cores) with `mmfusion.run.train`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmfusion import load_model
from mmfusion.config import RunConfig, config_from_dict, load_config
from mmfusion.eval.report import evaluate_contrastive
from mmfusion.eval.retrieval import embed_dataset, retrieval_metrics
from mmfusion.run import load_split, train
from mmfusion.serve.export import OnnxEncoders, example_inputs, export_onnx
from mmfusion.serve.quantize import (
    finetune_pruned,
    make_permanent,
    prune_model,
    quantize_onnx,
    quantize_torchao_int8,
    weight_sparsity,
)

KS = (1, 5)
METRICS = ("t2i_recall@1", "t2i_recall@5", "i2t_recall@1", "i2t_recall@5")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Size, latency and recall@K of fp32 / ONNX / int8 ONNX / pruned variants of one model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", type=Path, help="saved model folder or run directory (default: train a small one)"
    )
    p.add_argument(
        "--config",
        type=Path,
        help="run config whose test split to evaluate on (default: the run's config.yaml, else the synthetic defaults)",
    )
    p.add_argument("--n-test", type=int, default=500, help="synthetic test pairs when no config gives them")
    p.add_argument(
        "--train-steps", type=int, default=150, help="steps for the small model trained without --model"
    )
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of Linear weights pruned")
    p.add_argument(
        "--finetune-steps", type=int, default=50, help="fine-tuning steps after pruning (0: no such row)"
    )
    p.add_argument("--torchao", action="store_true", help="add a torchao int8 weight-only PyTorch row")
    p.add_argument("--batch-size", type=int, default=32, help="samples per timed batch")
    p.add_argument("--repeats", type=int, default=30, help="timed batches per variant")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument(
        "--work-dir", type=Path, help="where to write the trained model and ONNX files (default: a temp dir)"
    )
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p.parse_args(argv)


def small_run_config(work: Path, steps: int, n_test: int) -> RunConfig:
    """A small synthetic run (the e2e test model, trained longer so that recall is far above chance)."""
    return config_from_dict(
        {
            "name": "compress-bench",
            "out_dir": str(work),
            "data": {
                "source": "synthetic",
                "synthetic": {"seed": 0, "n_train": 2048, "n_val": 32, "n_test": n_test},
            },
            "model": {
                "embed_dim": 32,
                "text": {"vocab_size": 200, "context_length": 32, "width": 64, "depth": 2, "heads": 2},
                "image": {"image_size": 32, "patch_size": 8, "width": 64, "depth": 2, "heads": 2},
            },
            "train": {
                "steps": steps,
                "batch_size": 64,
                "lr": 2.0e-3,
                "warmup_steps": 10,
                "precision": "fp32",
                "device": "cpu",
                "threads": 2,
                "checkpoint_every": steps,
                "keep_checkpoints": 1,
                "log_every": max(1, steps // 5),
                "progress": False,
            },
        }
    )


def eval_config(args: argparse.Namespace, model_dir: Path, model) -> RunConfig:
    """The run config that defines the test split, with the model section of the model itself."""
    run_cfg = model_dir.parent / "config.yaml" if model_dir.name == "model" else model_dir / "config.yaml"
    if args.config:
        cfg = load_config(args.config)
    elif run_cfg.is_file():
        cfg = load_config(run_cfg)
    else:
        cfg = load_config(None, [f"data.synthetic.n_test={args.n_test}"])
    return cfg.model_copy(update={"model": model.config})


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)


def measure(name: str, encoder, size: int | None, quality: dict[str, float], inputs, repeats: int) -> dict:
    """One table row: bytes, median ms per (text + image) batch and the recall metrics."""

    @torch.no_grad()
    def step():
        encoder.embed_text_ids(inputs["text"])
        encoder.embed_image_tensor(inputs["image"])

    row = {"variant": name, "bytes": size, "latency_ms": median_ms(step, repeats)}
    row.update({k: quality[k] for k in METRICS})
    return row


def print_table(rows: list[dict]) -> None:
    ref = rows[0]
    head = f"{'variant':<22}{'size KB':>9}{'x fp32':>8}{'ms/batch':>10}{'x fp32':>8}" + "".join(
        f"{k.replace('_recall', ' R'):>10}" for k in METRICS
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        size = (
            f"{r['bytes'] / 1024:9.1f}{r['bytes'] / ref['bytes']:8.2f}" if r["bytes"] else f"{'-':>9}{'-':>8}"
        )
        lat = f"{r['latency_ms']:10.2f}{r['latency_ms'] / ref['latency_ms']:8.2f}"
        print(f"{r['variant']:<22}{size}{lat}" + "".join(f"{r[k]:10.3f}" for k in METRICS))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mmfusion-compress-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        cfg = small_run_config(work, args.train_steps, args.n_test)
        print(f"training a small model for {args.train_steps} steps in {work} ...", file=sys.stderr)
        model_dir = Path(train(cfg, overwrite=True, log=lambda *a: None)["run_dir"]) / "model"
        torch.set_num_threads(args.threads)
    else:
        model_dir = args.model / "model" if (args.model / "model").is_dir() else args.model
    model = load_model(model_dir)
    cfg = eval_config(args, model_dir, model)
    test = load_split(cfg, "test")
    inputs = example_inputs(model, args.batch_size, model.text_encoder.context_length, seed=0)

    rows = []
    quality, _ = evaluate_contrastive(model, test, recall_at=KS)
    rows.append(
        measure(
            "fp32 PyTorch",
            model,
            (model_dir / "model.safetensors").stat().st_size,
            quality,
            inputs,
            args.repeats,
        )
    )

    fp32 = export_onnx(model, work / "onnx")
    int8 = quantize_onnx(fp32)
    for name, paths in (("fp32 ONNX", fp32), ("int8 ONNX (dynamic)", int8)):
        onnx = OnnxEncoders(model, paths, threads=args.threads)
        quality = retrieval_metrics(embed_dataset(onnx, test), KS)
        size = sum(p.stat().st_size for p in paths.values())
        rows.append(measure(name, onnx, size, quality, inputs, args.repeats))

    pruned = copy.deepcopy(model)
    achieved = prune_model(pruned, args.sparsity)
    pruned_dir = pruned.save_pretrained(work / "pruned")
    quality, _ = evaluate_contrastive(pruned, test, recall_at=KS)
    label = f"pruned {achieved:.0%} PyTorch"
    rows.append(
        measure(
            label, pruned, (pruned_dir / "model.safetensors").stat().st_size, quality, inputs, args.repeats
        )
    )

    if args.finetune_steps:
        tuned = copy.deepcopy(model)
        prune_model(tuned, args.sparsity, permanent=False)
        finetune_pruned(tuned, cfg, args.finetune_steps, work / "finetune", log=lambda *a: None)
        torch.set_num_threads(args.threads)
        achieved = weight_sparsity(make_permanent(tuned))  # unchanged by fine-tuning
        tuned_dir = tuned.save_pretrained(work / "pruned-finetuned")
        quality, _ = evaluate_contrastive(tuned, test, recall_at=KS)
        size = (tuned_dir / "model.safetensors").stat().st_size
        label = f"pruned {achieved:.0%} + ft {args.finetune_steps}"
        rows.append(measure(label, tuned, size, quality, inputs, args.repeats))

    if args.torchao:
        quantized = quantize_torchao_int8(copy.deepcopy(model))
        quality, _ = evaluate_contrastive(quantized, test, recall_at=KS)
        rows.append(measure("int8 torchao (w-only)", quantized, None, quality, inputs, args.repeats))

    print(f"model {model_dir}; {len(test)} test pairs; batch {args.batch_size}; {args.threads} thread(s)")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
