"""`mmfusion data build|info|diff|pseudo-label|topup` argument parsing (imports stay light: handlers import
lazily)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable
from typing import Any


def add_data_commands(dsub: argparse._SubParsersAction, load_model: Callable[[str], Any]) -> None:
    """Register the data-engine subcommands under `mmfusion data`. `load_model` (model folder -> model;
    mmfusion.load_model) loads `--model` for build and pseudo-label: the data engine does not import the
    models, the CLI hands it the loader."""
    from .quality import REASONS

    s = dsub.add_parser(
        "build",
        help="build a clean, de-duplicated, sharded dataset from a folder, JSONL manifest or shards",
        description=(
            "Detect modalities from content, decode and normalise, pair and score, check quality, "
            "de-duplicate, and write accepted samples as WebDataset shards + manifest.json; rejected ones "
            "go to rejected.jsonl, report.html and report.png. Re-running resumes an interrupted build. "
            "Rejection reasons: " + ", ".join(REASONS)
        ),
    )
    s.add_argument(
        "src",
        help="a folder tree of media files with same-stem .txt captions, a .jsonl manifest, "
        "or WebDataset shards (a .tar or a folder of them)",
    )
    s.add_argument("--out", required=True, help="output dataset folder")
    s.add_argument(
        "--model",
        default=None,
        help="trained contrastive model folder: CLIP-style pair scoring and embedding de-duplication",
    )
    s.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    s.add_argument(
        "--engine", default="local", choices=["local", "ray"], help="run the stages locally or on Ray Data"
    )
    s.add_argument("--chunk-size", type=int, default=256, help="inputs per resumable work unit (default 256)")
    from .build_config import FIELD_HELP, BuildConfig  # no heavy imports at parse time

    s.add_argument(
        "--filter",
        dest="concept_filter",
        default=None,
        help="a concept-filter file from `mmfusion filter calibrate` (needs --model): samples whose image or "
        "caption is blocked for a concept are rejected as `filtered` and counted in the report",
    )
    for f in dataclasses.fields(BuildConfig):
        if f.name in ("model", "concept_filter"):
            continue
        s.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f"{FIELD_HELP[f.name]} (default {f.default})",
        )
    s.set_defaults(func=functools.partial(cmd_build, load_model=load_model))

    s = dsub.add_parser(
        "info",
        help="print a built dataset's build id and counts",
        description="Print the build id and counts per modality / combination of a built dataset.",
    )
    s.add_argument("dir", help="a folder written by `mmfusion data build`")
    s.set_defaults(func=cmd_info)

    s = dsub.add_parser(
        "diff",
        help="list samples added / removed / changed between two builds",
        description="Compare two built datasets by sample id and content hash: "
        "'+ id' added in B, '- id' removed from A, '~ id' changed.",
    )
    s.add_argument("a", help="the older built dataset folder")
    s.add_argument("b", help="the newer built dataset folder")
    s.set_defaults(func=cmd_diff)
    from . import pseudo, topup  # light imports: torch and the synthetic world load in the handlers

    s = dsub.add_parser(
        "pseudo-label",
        help="label unlabelled images by cross-modal similarity with a trained model",
        description="Score each image against class prototypes (the mean caption embedding of the labelled "
        "samples of each label) and keep labels with probability >= --threshold; writes pseudo-*.tar and "
        "pseudo_report.json (precision per threshold when the images carry true labels).",
    )
    pseudo.add_arguments(s)
    s.set_defaults(func=functools.partial(pseudo.pseudo_label_main, load_model=load_model))
    s = dsub.add_parser(
        "topup",
        help="render synthetic samples for modality combinations below a target count",
        description="Count the modality combinations of a shard set and write synthetic paired samples "
        "(SyntheticWorld) for each combination below --target as topup-<combination>-*.tar shards.",
    )
    topup.add_arguments(s)
    s.set_defaults(func=topup.topup_main)


def cmd_build(args: argparse.Namespace, load_model: Callable[[str], Any]) -> int:
    import sys

    from .build_config import BuildConfig
    from .pipeline import build
    from .report import summary_table

    fields = {f.name for f in dataclasses.fields(BuildConfig)}
    cfg = BuildConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = build(
        args.src,
        args.out,
        cfg,
        workers=args.workers,
        engine=args.engine,
        chunk_size=args.chunk_size,
        progress=sys.stderr.isatty(),
        load_model=load_model,
    )
    print(summary_table(result))
    print(f"wrote {args.out}/manifest.json, {len(result.shards)} shards, rejected.jsonl, report.html")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .version import format_info, info

    print(format_info(info(args.dir)))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from .version import diff, format_diff

    print(format_diff(diff(args.a, args.b)))
    return 0
