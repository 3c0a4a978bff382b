"""`mmfusion bias`: a classifier's metrics per group along sensitive axes, as an HTML report (mmfusion.eval.bias)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_safety_commands(sub: argparse._SubParsersAction, add_config_args) -> None:
    p = sub.add_parser(
        "bias",
        help="per-group metrics of a fusion classifier along sensitive axes (HTML report, four-fifths line)",
        description="Evaluate a trained fusion model (a run directory or model folder) on a split of its data "
        "and break its metrics down by the values of each --axes field (a JSONL column, or any sample field): "
        "accuracy, and with a positive class the selection rate, true- and false-positive rates, per group "
        "(fairlearn's MetricFrame), the ratio smallest / largest group and the four-fifths line (ratio < 0.8 "
        "is flagged). Writes <out>/bias.json and a self-contained <out>/bias.html with plots.",
    )
    p.add_argument("path", help="a run directory (its config.yaml names the data) or a model folder")
    p.add_argument("--axes", required=True, help="comma-separated sample fields that name the groups")
    add_config_args(p)  # --config (default: the run's config.yaml), --set
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument(
        "--positive",
        help="the positive class for selection / true- / false-positive rates (a class name or index; a match "
        "head's is 1)",
    )
    p.add_argument("--out", help="report folder (default: <path>/bias)")
    p.set_defaults(func=cmd_bias)


def _positive(model, value: str | None):
    """The positive class index, or None (accuracy only)."""
    from .errors import ConfigError

    cfg = model.config
    if value is None:
        return 1 if cfg.head == "match" else None
    if cfg.classes and value in cfg.classes:
        return list(cfg.classes).index(value)
    n = cfg.n_classes if cfg.head == "classify" else 2
    if value.isdigit() and int(value) < n:
        return int(value)
    allowed = ", ".join(cfg.classes) if cfg.classes else f"0..{n - 1}"
    raise ConfigError(f"--positive {value!r}: not a class of this model ({allowed})")


def cmd_bias(args) -> int:
    from . import load_model
    from .config import load_config
    from .errors import ConfigError, DataError
    from .eval.bias import axis_report, predictions, write_report
    from .models.multimodal import MultiModalModel
    from .run import fusion_target, load_split

    path = Path(args.path)
    if not path.exists():
        raise DataError(f"{path} does not exist: expected a run directory or a model folder")
    snapshot = path / "config.yaml"
    if not args.config and not snapshot.is_file():
        raise ConfigError(f"{path} has no config.yaml: pass --config with the recipe whose data to use")
    cfg = load_config(args.config or snapshot, args.overrides)
    model = load_model(path)
    if not isinstance(model, MultiModalModel):
        raise ConfigError(
            f"{path}: `mmfusion bias` reports on fusion classifiers; this is a {type(model).__name__}"
        )
    axes = [a.strip() for a in args.axes.split(",") if a.strip()]
    if not axes:
        raise ConfigError("--axes: name at least one sample field")
    positive = _positive(model, args.positive)
    dataset = load_split(cfg, args.split)
    collate = model.collate(cfg.data.inputs, fusion_target(cfg, model.config))
    y_true, y_pred, groups, skipped = predictions(model, dataset, collate, axes, cfg.eval.batch_size)
    if not y_true:
        raise DataError(f"no usable sample in the {args.split} split (skipped: {skipped})")
    for a in axes:
        if all(g is None for g in groups[a]):
            raise DataError(f"--axes {a!r}: no sample of the {args.split} split has that field")
    reports = [axis_report(a, y_true, y_pred, groups[a], positive) for a in axes]
    out = Path(args.out) if args.out else path / "bias"
    extra = {"model": str(path), "split": args.split, "n": len(y_true), "positive": positive}
    if skipped:
        extra["skipped"] = skipped
    page = write_report(reports, out, f"bias report: {path.name}", extra)
    for r in reports:
        cells = ", ".join(f"{g}={r.by_group['accuracy'][g]:.3f} (n={n})" for g, n in r.counts.items())
        flag = f"  FLAGGED: {', '.join(r.flagged)}" if r.flagged else ""
        print(f"{r.axis}: accuracy {cells}; ratio {r.ratio['accuracy']:.3f}{flag}")
    print(f"report: {page}")
    return 0
