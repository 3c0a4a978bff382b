"""`mmfusion train-unified`: a thin alias of a unified run on the synthetic world (`mmfusion train`).

It builds the run config `mmfusion train` takes (`run_config_tree`: model.kind unified, data.source synthetic,
the train settings of the unified recipe) and trains it through the same code (`recipe.fit_unified`, the
common Trainer). --out is the run directory: checkpoints/, metrics.jsonl, config.yaml, unified/ (the prepared
tokenizers) and model/, the unified model folder `mmfusion generate --model` and `mmfusion serve` read (they
take the run directory too).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import ConfigError

# flag -> (model key, default); the decoder and tokenizer flags of the old command, unchanged
DECODER_FLAGS: dict[str, tuple[str, Any]] = {
    "dim": ("width", 128),
    "depth": ("depth", 4),
    "heads": ("heads", 4),
    "z_loss": ("z_loss", 1e-4),
    "image_window": ("image_window", None),
    "window_layers": ("window_layers", "all"),
    "modality_aware": ("modality_aware", False),
    "hierarchical_layers": ("hierarchical_layers", 0),
    "modality_gate": ("modality_gate", False),
    "sparse_topk": ("sparse_topk", None),
    "text_vocab": ("text_vocab_size", 256),
    "temperature": ("temperature", 1.0),
    "audio_tokenizer": ("audio_tokenizer", None),
}
# the unified recipe's optimiser settings (those of the loop train-unified had before it used the Trainer)
RECIPE_TRAIN = {"weight_decay": 0.01, "betas": [0.9, 0.95], "min_lr_ratio": 0.1, "grad_clip": 1.0}


def add_train_unified_command(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train-unified",
        help="train a unified model (VQ tokenizer + BPE + decoder) on the synthetic world",
        description="A shortcut for `mmfusion train` with model.kind: unified on the synthetic world (the same "
        "run, through the same Trainer). Trains the decoder on mixed captioning, text->image and VQA sequences "
        "and writes the run directory --out, whose model/ folder `mmfusion generate --model OUT` and "
        "`mmfusion serve OUT` read. The VQ image tokenizer is trained first unless --tokenizer names one from "
        "`mmfusion tokenize train`. With --audio-tokenizer (`mmfusion tokenize train --modality audio`) the "
        "audio-captioning task joins the mixture. OUT/config.yaml is the equivalent run config.",
    )
    t.add_argument("--out", required=True, help="the run directory to write (model folder: OUT/model)")
    t.add_argument("--overwrite", action="store_true", help="start over when OUT already has checkpoints")
    t.add_argument("--tokenizer", help="an image tokenizer folder (default: train one)")
    t.add_argument("--audio-tokenizer", help="an audio tokenizer folder: adds audio captioning")
    t.add_argument("--tokenizer-kind", choices=["vq", "fsq"], default="fsq",
                   help="quantizer when training one: fsq (8,6,5 = 240 codes; default) or vq")  # fmt: skip
    t.add_argument("--tokenizer-steps", type=int, default=600, help="VQ-VAE steps (default 600)")
    t.add_argument(
        "--codebook-size", type=int, default=256, help="codes for --tokenizer-kind vq (default 256)"
    )
    t.add_argument("--image-size", type=int, help="image side (default 32 = 8x8 codes, or --tokenizer's)")
    t.add_argument("--samples", type=int, default=2048, help="synthetic training scenes (default 2048)")
    t.add_argument("--text-vocab", type=int, default=256, help="BPE vocabulary size (default 256)")
    t.add_argument("--steps", type=int, default=1000, help="decoder steps (default 1000)")
    t.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    t.add_argument("--warmup", type=int, default=50, help="warm-up steps (default 50)")
    t.add_argument("--dim", type=int, default=128)
    t.add_argument("--depth", type=int, default=4)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--no-qk-norm", action="store_true", help="disable QK-norm (the stability control)")
    t.add_argument("--image-window", type=int, help="an image query sees the last N keys")
    t.add_argument("--window-layers", default="all", choices=["all", "alternate"])
    t.add_argument("--modality-aware", action="store_true", help="attention and MLP weights per modality")
    t.add_argument("--hierarchical-layers", type=int, default=0,
                   help="the first N layers attend within each modality only (default 0)")  # fmt: skip
    t.add_argument("--modality-gate", action="store_true", help="sparse gates on other modalities' keys")
    t.add_argument("--sparse-topk", type=int, help="top-k dynamic sparse attention")
    t.add_argument("--z-loss", type=float, default=1e-4, help="z-loss weight (default 1e-4)")
    t.add_argument("--temperature", type=float, default=1.0, help="task-mixing temperature (default 1)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    t.set_defaults(func=cmd_train_unified)


def run_config_tree(args: argparse.Namespace) -> dict[str, Any]:
    """The run config (as `mmfusion train --config` reads it) that this command's flags describe."""
    out = Path(args.out)
    model: dict[str, Any] = {"kind": "unified", "qk_norm": not args.no_qk_norm}
    model.update({key: getattr(args, flag) for flag, (key, default) in DECODER_FLAGS.items()})
    tok: dict[str, Any] = {"path": args.tokenizer}
    if not args.tokenizer:
        tok.update(kind=args.tokenizer_kind, steps=args.tokenizer_steps, codebook_size=args.codebook_size)
    if args.image_size is not None or not args.tokenizer:
        tok["image_size"] = 32 if args.image_size is None else args.image_size
    model["image_tokenizer"] = tok
    train = {
        "steps": args.steps,
        "batch_size": args.batch,
        "lr": args.lr,
        "warmup_steps": min(args.warmup, args.steps - 1),
        **RECIPE_TRAIN,
        "precision": "fp32",
        "device": args.device,
        "threads": args.threads or None,
        "log_every": max(1, args.steps // 20),
        "checkpoint_every": max(1, args.steps // 4),
        "progress": True,
    }
    data = {"source": "synthetic", "synthetic": {"seed": args.seed, "n_train": args.samples}}
    return {"name": out.name, "out_dir": str(out.parent), "seed": args.seed, "data": data, "model": model,
            "train": train}  # fmt: skip


def cmd_train_unified(args: argparse.Namespace) -> int:
    from .config import config_from_dict
    from .run import train

    for name in ("samples", "steps", "batch", "tokenizer_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0; got {args.threads}")
    cfg = config_from_dict(
        run_config_tree(args), source="train-unified"
    )  # a bad option fails before any work
    last = train(cfg, overwrite=args.overwrite)["train"]
    ce = ", ".join(f"{m} {last[f'ce_{m}']:.3f}" for m in ("text", "image") if f"ce_{m}" in last)
    print(
        f"trained {cfg.train.steps} steps: loss {last['loss']:.3f} (ce {ce}); model folder {Path(args.out) / 'model'}"
    )
    return 0


__all__ = ["add_train_unified_command", "cmd_train_unified", "run_config_tree"]
