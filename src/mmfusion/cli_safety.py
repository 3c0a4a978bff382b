"""`mmfusion bias`: a classifier's metrics per group along sensitive axes, as an HTML report (mmfusion.eval.bias)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_scd import add_scd_command, contrastive_model


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


# ---- Z2 / Z4: `mmfusion scd`, `mmfusion filter`, `mmfusion provenance` -----------------------------------
def add_guard_commands(sub: argparse._SubParsersAction) -> None:
    """`scd calibrate`, `filter calibrate`, `provenance sign|verify` (mmfusion.safety)."""
    add_scd_command(sub)

    p = sub.add_parser("filter", help="embedding-space concept filters for `data build` / `serve --filter`")
    fsub = p.add_subparsers(dest="filter_command", required=True)
    c = fsub.add_parser(
        "calibrate",
        help="per-concept image and caption thresholds (synthetic world or a labelled JSONL), with precision / "
        "recall",
        description="Thresholds on cosine(input, concept vector) per concept and modality, set for a target "
        "recall or precision (normal and strict levels), with precision and recall reported on held-out samples. Two "
        "sources. The synthetic world (default): concepts are words of the world (a colour, shape or size), a "
        "scene shows one when an object has it; thresholds on --n samples of --split, figures on --n samples "
        "of --eval-split. A user's data (--data FILE.jsonl): rows in the data engine's manifest format "
        "(text and / or image, a path relative to the file) with a label column (default 'concepts': the list "
        "of concepts the sample shows, [] for none), e.g. "
        '{"text": "a knife on a table", "image": "img/1.png", "concepts": ["weapon"]}; a concept\'s vector is '
        "the mean embedding of its positive rows minus that of its negative rows; figures on --eval-data or "
        "on a stratified --eval-fraction of the rows (seeded by --seed).",
    )
    c.add_argument("model", help="a contrastive run directory or model folder")
    c.add_argument(
        "--concepts",
        help="comma-separated, e.g. red,cross (required for the synthetic world; with --data, default: every "
        "label in the file)",
    )
    c.add_argument(
        "--data", metavar="FILE.jsonl", help="a labelled JSONL manifest instead of the synthetic world"
    )
    c.add_argument(
        "--label-column", default="concepts", help="with --data: the field listing a row's concepts"
    )
    c.add_argument("--eval-data", metavar="FILE.jsonl", help="with --data: held-out rows to report on")
    c.add_argument(
        "--eval-fraction",
        type=float,
        help="with --data and no --eval-data: the share of each label set held out for the report (default "
        "0.25)",
    )
    c.add_argument("--n", type=int, help="synthetic samples per split (default 1000)")
    c.add_argument(
        "--split", choices=["train", "val", "test"], help="synthetic calibration split (default val)"
    )
    c.add_argument(
        "--eval-split", choices=["train", "val", "test"], help="synthetic report split (default test)"
    )
    c.add_argument("--seed", type=int, default=0, help="world seed; with --data, the split's seed")
    c.add_argument("--recall", type=float, default=0.9, help="normal level's recall target (default 0.9)")
    c.add_argument("--strict-recall", type=float, default=0.99, help="strict level's (default 0.99)")
    c.add_argument(
        "--precision",
        type=float,
        help="calibrate the normal level for this precision instead of --recall: the lowest threshold (the "
        "most recall) whose blocked calibration inputs are at least this share positive",
    )
    c.add_argument("--strict-precision", type=float, help="the same for the strict level")
    c.add_argument("--out", required=True, help="filter JSON to write")
    c.set_defaults(func=cmd_filter_calibrate)

    p = sub.add_parser("provenance", help="signed manifests (and a watermark) for generated media")
    psub = p.add_subparsers(dest="provenance_command", required=True)
    key_help = "key file (default: $MMFUSION_PROVENANCE_KEY)"
    c = psub.add_parser(
        "sign",
        help="write FILE.provenance.json: SHA-256, model id, seed, prompt, HMAC-SHA256 signature",
        description="Sign a generated file's manifest. With --watermark (PNG images) a keyed invisible mark is "
        "embedded first (the file is rewritten), so the manifest hashes the marked image.",
    )
    c.add_argument("file")
    c.add_argument("--model-id", required=True, help="the model that generated the file")
    c.add_argument("--seed", type=int, help="the sampling seed")
    c.add_argument("--prompt", help="the prompt")
    c.add_argument("--watermark", action="store_true", help="embed the keyed watermark (PNG images)")
    c.add_argument("--key-file", help=key_help)
    c.set_defaults(func=cmd_provenance_sign)
    c = psub.add_parser(
        "verify",
        help="check a file against its signed manifest (exit 1 when it does not match)",
        description="Check the manifest's signature and the file's SHA-256; for images also report the "
        "watermark's z-score (marked: >= 4). Exit 0 when the manifest verifies, 1 when not.",
    )
    c.add_argument("file")
    c.add_argument("--manifest", help="the manifest (default: FILE.provenance.json)")
    c.add_argument("--key-file", help=key_help)
    c.set_defaults(func=cmd_provenance_verify)


def cmd_filter_calibrate(args) -> int:
    from .errors import ConfigError
    from .serve.engine import model_fingerprint

    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()] if args.concepts else None
    if args.concepts is not None and not concepts:
        raise ConfigError("--concepts: name at least one concept")
    rates = (args.recall, args.strict_recall, args.precision, args.strict_precision)
    if not all(r is None or 0 < r <= 1 for r in rates):
        raise ConfigError("--recall / --strict-recall / --precision / --strict-precision: rates in (0, 1]")
    precision = {
        lv: p for lv, p in (("normal", args.precision), ("strict", args.strict_precision)) if p is not None
    }
    synthetic = {"--n": args.n, "--split": args.split, "--eval-split": args.eval_split}
    user = {"--eval-data": args.eval_data, "--eval-fraction": args.eval_fraction}
    if args.data is None:
        given = [k for k, v in user.items() if v is not None] + (
            ["--label-column"] if args.label_column != "concepts" else []
        )
        if given:
            raise ConfigError(f"{given[0]} goes with --data FILE.jsonl (a user's labelled rows)")
        if concepts is None:
            raise ConfigError("--concepts: required for the synthetic world (e.g. red,cross)")
    else:
        given = [k for k, v in synthetic.items() if v is not None]
        if given:
            raise ConfigError(
                f"{given[0]} chooses synthetic samples; with --data use --eval-data or --eval-fraction"
            )
        if args.eval_data and args.eval_fraction is not None:
            raise ConfigError("--eval-data and --eval-fraction: give one (the held-out rows)")
    model = contrastive_model(args.model)
    recall = {"normal": args.recall, "strict": args.strict_recall}
    if args.data is None:
        from .eval.concepts import calibrate_filters, filter_report

        n = 1000 if args.n is None else args.n
        if n < 1:
            raise ConfigError("--n: at least 1")
        split, eval_split = args.split or "val", args.eval_split or "test"
        filters = calibrate_filters(
            model, concepts, args.seed, split, n, recall, model_fingerprint(model), precision
        )
        filters.save(args.out)
        report = filter_report(model, filters, args.seed, eval_split, n)
        print(f"{eval_split} split, {n} samples: precision / recall per level")
    else:
        from .eval.labelled_concepts import calibrate_labelled, labelled_report, read_labelled, split_rows

        rows = read_labelled(args.data, args.label_column, concepts)
        if args.eval_data:
            cal = rows
            held = read_labelled(args.eval_data, args.label_column, rows.concepts)
            where = f"{args.eval_data}, {len(held.index)} rows"
        else:
            fraction = 0.25 if args.eval_fraction is None else args.eval_fraction
            cal_idx, eval_idx = split_rows(rows.labels, fraction, args.seed)
            if not len(eval_idx):
                raise ConfigError(
                    f"--eval-fraction {fraction} holds out no row of {args.data} ({len(rows.index)} rows; each "
                    "label set keeps floor(fraction x its rows)): raise it or give --eval-data"
                )
            cal, held = rows.subset(cal_idx), rows.subset(eval_idx)
            where = (
                f"held-out {fraction:g} of {args.data} ({len(eval_idx)} rows; calibrated on {len(cal_idx)})"
            )
        filters = calibrate_labelled(model, cal, recall, model_fingerprint(model), precision)
        filters.save(args.out)
        report = labelled_report(model, filters, held)
        print(f"{where}: precision / recall per level")
    targets = ", ".join(
        f"{lv} " + (f"precision {precision[lv]:g}" if lv in precision else f"recall {recall[lv]:g}")
        for lv in ("normal", "strict")
    )
    print(f"targets (on the calibration samples): {targets}")
    for modality, per in report.items():
        for c, lv in per.items():
            auroc = lv.pop("auroc")
            cells = "; ".join(f"{name} P={r['precision']:.3f} R={r['recall']:.3f}" for name, r in lv.items())
            tail = f", AUROC {auroc:.3f}" if auroc is not None else ""
            if not lv["normal"]["positives"]:
                tail += ": no positive held out, recall not measured"
            print(f"{modality:5s} {c}: {cells} (positives {lv['normal']['positives']}{tail})")
    print(f"wrote {args.out}")
    return 0


def cmd_provenance_sign(args) -> int:
    import io

    import numpy as np
    from PIL import Image

    from .errors import DataError
    from .safety import watermark
    from .safety.provenance import load_key, write_signed_manifest

    key = load_key(args.key_file)
    path = Path(args.file)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    extra = {}
    if args.watermark:
        try:
            img = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))
        except OSError as e:
            raise DataError(f"{path}: --watermark needs an image ({e})") from None
        Image.fromarray(watermark.embed(img, key)).save(path, format="PNG")
        extra["watermark"] = {"kind": "keyed-pm-pattern", "delta": watermark.DEFAULT_DELTA}
    out, m = write_signed_manifest(path, key, args.model_id, args.seed, args.prompt, **extra)
    print(f"{path}: sha256 {m['sha256']} signed -> {out}")
    return 0


def cmd_provenance_verify(args) -> int:
    import io
    import json

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from .errors import DataError
    from .safety import watermark
    from .safety.provenance import load_key, manifest_path, verify_manifest

    key = load_key(args.key_file)
    path = Path(args.file)
    mpath = Path(args.manifest) if args.manifest else manifest_path(path)
    try:
        data = path.read_bytes()
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} or its manifest {mpath}: {e}") from None
    result = verify_manifest(manifest, key, data)
    try:
        z = watermark.score(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), key)
        mark = f"; watermark z = {z:.1f} ({'present' if z >= watermark.DEFAULT_THRESHOLD else 'absent'})"
    except (UnidentifiedImageError, OSError):
        mark = ""
    if result.ok:
        print(f"{path}: OK (model {manifest.get('model_id')}, seed {manifest.get('seed')}){mark}")
        return 0
    print(f"{path}: FAILED: {'; '.join(result.problems)}{mark}")
    return 1
