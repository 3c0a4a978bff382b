"""`mmfusion scd calibrate`: thresholds for the opt-in adversarial-input check of `mmfusion serve --scd`
(mmfusion.safety.scd), on /v1/search captions of a two-tower model or /v1/classify images of a fusion model."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_scd_command(sub: argparse._SubParsersAction) -> None:
    """`mmfusion scd calibrate`."""
    p = sub.add_parser(
        "scd", help="adversarial-input detection (SCD): calibrate a threshold for `serve --scd`"
    )
    ssub = p.add_subparsers(dest="scd_command", required=True)
    c = ssub.add_parser(
        "calibrate",
        help="threshold of an SCD score (search captions or classify images) at a stated false-positive rate",
        description="Score clean inputs the way `mmfusion serve --scd` does and write the threshold that flags "
        "--fpr of them. --task search (a two-tower model and the --index the server searches): caption queries; "
        "distance = 1 - cosine to the top-1 image, mutation = the fraction of --mutations character mutations "
        "that change the top-1 image. --task classify (a fusion classifier): inputs with an image; mutation = "
        "the fraction of --mutations image mutations (pixel noise of std --sigma and a 1-pixel shift) that "
        "change the predicted label. Use held-out inputs: the synthetic validation split, a file of captions "
        "(--texts, search) or a JSONL manifest (--data, classify: rows in the data engine's format, e.g. "
        '{"image": "img/1.png", "text": "..."}, paths relative to the file).',
    )
    c.add_argument(
        "model", help="a run directory or model folder (two-tower for search, fusion for classify)"
    )
    c.add_argument("--task", default="search", choices=["search", "classify"], help="the route it checks")
    c.add_argument("--index", help="the index folder the server will search (--task search)")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", help="clean queries: a text file, one caption per line (--task search)")
    src.add_argument("--data", help="clean inputs: a JSONL manifest (--task classify)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N samples of the synthetic world")
    c.add_argument("--split", default="val", choices=["train", "val", "test"], help="for --synthetic")
    c.add_argument("--seed", type=int, default=0, help="world seed for --synthetic; mutation seed")
    c.add_argument("--fpr", type=float, default=0.05, help="stated false-positive rate (default 0.05)")
    c.add_argument(
        "--score",
        choices=["distance", "mutation"],
        help="default: distance for search, mutation for classify",
    )
    c.add_argument("--mutations", type=int, default=8, help="mutations per input for the mutation score")
    c.add_argument("--sigma", type=float, default=0.03, help="image mutations' noise std on [0, 1] pixels")
    c.add_argument("--out", required=True, help="calibration JSON to write")
    c.set_defaults(func=cmd_scd_calibrate)


def contrastive_model(path: str):
    from . import load_model
    from .errors import ConfigError

    model = load_model(path)
    if not hasattr(model, "encode_text") or not hasattr(model, "encode_image"):
        raise ConfigError(f"{path}: needs a contrastive (two-tower) model; this is a {type(model).__name__}")
    return model.eval()


def cmd_scd_calibrate(args) -> int:
    import torch

    from .data.synthetic import SyntheticWorld, WorldConfig
    from .errors import ConfigError, DataError
    from .safety.scd import SCDCalibration, calibrate_threshold, mutations_of, top1
    from .serve.engine import model_fingerprint
    from .serve.index import EmbeddingIndex

    score = args.score or ("mutation" if args.task == "classify" else "distance")
    if not 0 <= args.fpr < 1 or args.mutations < 1 or args.sigma <= 0:
        raise ConfigError("--fpr: a rate in [0, 1); --mutations >= 1; --sigma > 0")
    if args.task == "classify":
        if score != "mutation":
            raise ConfigError("--task classify takes --score mutation (the distance score needs an index)")
        if args.index or args.texts:
            raise ConfigError("--task classify: give --data or --synthetic, not --index / --texts")
        return _scd_calibrate_classify(args)
    if args.data:
        raise ConfigError("--data is for --task classify; search queries come from --texts or --synthetic")
    if not args.index:
        raise ConfigError("--task search needs --index INDEX_DIR (the index the server will search)")
    model = contrastive_model(args.model)
    index = EmbeddingIndex.load(args.index)
    if args.texts:
        try:
            texts = [t.strip() for t in Path(args.texts).read_text().splitlines() if t.strip()]
        except OSError as e:
            raise DataError(f"--texts {args.texts}: cannot read ({e.strerror or e})") from None
    else:
        world = SyntheticWorld(WorldConfig(seed=args.seed))
        texts = [world.sample(args.split, i, ("text",))["text"] for i in range(args.synthetic)]
    if not texts:
        raise DataError("no clean query to calibrate on")
    emb = model.encode_text(texts)
    idx, best = top1(emb, index.embeddings)
    if score == "distance":
        scores = 1.0 - best
    else:
        muts = [m for t in texts for m in mutations_of(t, args.mutations, args.seed)]
        mut_idx = top1(model.encode_text(muts), index.embeddings)[0].reshape(len(texts), args.mutations)
        scores = (mut_idx != idx[:, None]).float().mean(dim=1)
    threshold = calibrate_threshold(scores, args.fpr)
    cal = SCDCalibration(
        score, threshold, args.fpr, len(texts), model_fingerprint(model), args.mutations, args.seed
    )
    cal.save(args.out)
    flagged = float((torch.as_tensor(scores) > threshold).float().mean())
    print(
        f"{score} threshold {threshold:.4f}: flags {flagged:.3f} of {len(texts)} clean queries -> {args.out}"
    )
    return 0


def _classify_samples(args, modalities: list[str]) -> list[dict]:
    """Clean /v1/classify samples (modality -> raw input, as a request carries them) from --data or --synthetic;
    rows without an image are left out and counted."""
    import io

    import numpy as np
    from PIL import Image

    from .data.sources import JsonlDataset
    from .data.synthetic import SyntheticWorld, WorldConfig
    from .errors import DataError

    samples = []
    if args.synthetic is not None:
        world = SyntheticWorld(WorldConfig(seed=args.seed))
        mods = tuple(m for m in ("image", "text") if m in modalities)
        for i in range(args.synthetic):
            s = world.sample(args.split, i, mods)
            buf = io.BytesIO()
            Image.fromarray(np.asarray(s["image"])).save(buf, format="PNG")
            samples.append({**({"text": s["text"]} if "text" in mods else {}), "image": buf.getvalue()})
        return samples
    ds = JsonlDataset(args.data, on_error="fail")
    without_image = 0
    for n, row in ds.entries:
        if row.get("image") is None:
            without_image += 1
            continue
        sample: dict = {}
        for m in modalities:
            if row.get(m) is None:
                continue
            if m == "text":
                if not isinstance(row[m], str):
                    raise DataError(f"{args.data} line {n}: 'text' must be a string; got {row[m]!r}")
                sample[m] = row[m]
                continue
            path = ds.root / str(row[m])
            try:
                sample[m] = path.read_bytes()
            except OSError as e:
                raise DataError(f"{args.data} line {n}: {m!r} file {row[m]} ({e.strerror or e})") from None
        samples.append(sample)
    if without_image:
        print(
            f"{args.data}: {without_image} rows without an image left out (the classify check scores images)"
        )
    return samples


def _scd_calibrate_classify(args) -> int:
    from . import load_model
    from .errors import ConfigError, DataError
    from .safety.scd import SCDCalibration, calibrate_threshold
    from .serve.engine import Engine
    from .serve.http import APIError
    from .serve.safety import classify_mutation_scores, classify_mutations

    engine = Engine(load_model(args.model))
    if not engine.can_classify or "image" not in engine.modalities:
        raise ConfigError(
            f"{args.model}: --task classify needs a fusion classifier with an image encoder; this is a "
            f"{engine.model_type} model of {engine.modalities}"
        )
    cal = SCDCalibration(
        "mutation",
        0.0,
        args.fpr,
        0,
        engine.model_id,
        args.mutations,
        args.seed,
        task="classify",
        sigma=args.sigma,
    )
    samples = _classify_samples(args, engine.modalities)
    if not samples:
        raise DataError("no clean input with an image to calibrate on")

    def classify(raw: list[dict]) -> list[dict]:
        out = []
        for i in range(0, len(raw), 64):
            chunk = raw[i : i + 64]
            try:
                prepared = [
                    {m: engine.prepare(m, v, f"input {i + j}.{m}") for m, v in s.items()}
                    for j, s in enumerate(chunk)
                ]
            except APIError as e:  # the server's own input checks, as a request would meet them
                raise DataError(f"{args.data or 'synthetic inputs'}: {e.message}") from None
            out += engine.classify(prepared)
        return out

    import torch

    with torch.inference_mode():
        clean = classify(samples)
        mutated, owners = classify_mutations(samples, cal)
        scores = classify_mutation_scores(clean, classify(mutated), owners)
    cal.threshold = calibrate_threshold(scores, args.fpr)
    cal.n_calibration = len(samples)
    cal.save(args.out)
    flagged = sum(s > cal.threshold for s in scores) / len(scores)
    print(
        f"mutation threshold {cal.threshold:.4f} (classify): flags {flagged:.3f} of {len(samples)} clean inputs "
        f"-> {args.out}"
    )
    return 0
