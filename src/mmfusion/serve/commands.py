"""`mmfusion serve` and `mmfusion index build`: registered on the main CLI by `add_commands(sub)`."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

from ..errors import ConfigError, DataError
from .access import api_key, exposure_problem


def add_commands(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP inference server (embed, search, classify, generate, metrics, demo page)",
        description="Serve a saved model over HTTP (FastAPI + uvicorn): POST /v1/embed, /v1/embed/{modality}, "
        "/v1/search, /v1/classify; GET /healthz, /metrics, /openapi.json, / (demo page). Requests to each "
        "encoder are dynamically batched; embeddings are cached by content hash. A unified model folder "
        "(`mmfusion train-unified`) is served with POST /v1/generate instead (caption, vqa, image tasks; "
        "caption and vqa requests batched); so is a joint diffusion model folder or run (`model.kind: "
        "diffusion`; caption, image, joint tasks).",
    )
    p.add_argument(
        "model",
        help="a run directory, a save_pretrained model folder, a unified model folder or a diffusion model folder",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--index", help="an index folder from `mmfusion index build` (enables /v1/search)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests per model call (default 32)")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="longest wait to fill a batch (default 5)")
    p.add_argument("--queue-size", type=int, default=256, help="waiting items per encoder before 503")
    p.add_argument("--timeout-s", type=float, default=10.0, help="per-item deadline before 503 (default 10)")
    p.add_argument("--cache-size", type=int, default=4096, help="feature cache entries (default 4096)")
    p.add_argument("--no-batching", action="store_true", help="one model call per input")
    p.add_argument("--no-cache", action="store_true", help="disable the feature cache")
    p.add_argument(
        "--api-key",
        help="require this key (x-api-key header or Authorization: Bearer) on /v1/*; default $MMFUSION_API_KEY "
        "(preferred: a flag is visible to other users in `ps`)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without an API key (otherwise the server refuses to start)",
    )
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="larger bodies get 413")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument(
        "--split",
        action="store_true",
        help="run the encoder service (encoders + projections), the fusion service (fusion + head) and the "
        "front (API, index, feature cache) as three processes talking HTTP on loopback; without it, all run "
        "in this one process",
    )
    p.add_argument(
        "--prune-threshold",
        type=float,
        metavar="T",
        help="router-fusion task runs: /v1/classify skips the encoders of modalities whose estimated router gate "
        "is under T (calibrated on the run's val split; serve the run directory); predictions list them as "
        "`pruned`",
    )
    p.add_argument(
        "--scd",
        metavar="FILE",
        help="opt-in adversarial-input check: a calibration from `mmfusion scd calibrate`, of /v1/search "
        "captions (task search) or of /v1/classify images of a fusion model (task classify); answers carry an "
        "scd flag (results and predictions are still returned)",
    )
    p.add_argument(
        "--filter",
        dest="concept_filter",
        metavar="FILE",
        help="concept filters on /v1/search (a file from `mmfusion filter calibrate`): blocked queries get no "
        "results and say why, blocked result images are left out and counted; strict level when --scd flags",
    )
    p.add_argument("--role", default="all", choices=["all", "encoder", "fusion"], help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("index", help="image index for /v1/search", description="Image index tools.")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="INDEX_COMMAND")
    b = isub.add_parser(
        "build",
        help="embed images into an index folder",
        description="Embed images with a model's image encoder into INDEX_DIR (embeddings.safetensors + "
        "index.json). --images takes a folder of PNG/JPEG files or a JSONL manifest (`mmfusion data synth`); "
        "--synthetic N renders N scenes of the synthetic world (with captions) instead.",
    )
    b.add_argument("model", help="a run directory or a save_pretrained model folder")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of PNG/JPEG images, or a .jsonl manifest")
    src.add_argument("--synthetic", type=int, metavar="N", help="render N synthetic scenes and index them")
    b.add_argument("--out", required=True, help="index folder to write")
    b.add_argument("--split", default="test", choices=["train", "val", "test"], help="for --synthetic")
    b.add_argument("--seed", type=int, default=0, help="world seed for --synthetic")
    b.add_argument("--image-size", type=int, default=32, help="rendered size for --synthetic")
    b.set_defaults(func=cmd_index_build)


def _engine(model_path: str):
    from .. import load_model
    from .engine import Engine

    return Engine(load_model(model_path))


def cmd_index_build(args) -> int:
    from ..unified.image_files import list_images
    from .index import build_index, build_synthetic_index

    engine = _engine(args.model)
    if args.synthetic is not None:
        index = build_synthetic_index(
            engine, args.synthetic, args.out, args.split, args.seed, args.image_size
        )
    else:
        index = build_index(engine, list_images(args.images), args.out, progress=True)
    print(f"indexed {len(index)} images (dim {index.dim}, model {index.model_id}): {args.out}")
    return 0


def _settings(args):
    from .http import ServeSettings

    s = ServeSettings(
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        queue_size=args.queue_size,
        timeout_s=args.timeout_s,
        cache_size=args.cache_size,
        batching=not args.no_batching,
        cache=not args.no_cache,
        api_key=api_key(args.api_key),
        max_body_bytes=args.max_body_bytes,
    )
    if s.max_batch < 1 or s.queue_size < 1 or s.max_delay_ms < 0 or s.timeout_s <= 0 or s.cache_size < 0:
        raise ConfigError(
            "--max-batch, --queue-size >= 1; --max-delay-ms, --cache-size >= 0; --timeout-s > 0"
        )
    return s


def _load_index(path: str | None, info: dict):
    if path is None:
        return None
    from .index import EmbeddingIndex

    index = EmbeddingIndex.load(path)
    if index.dim != info["dim"]:
        raise DataError(f"index {path} has dim {index.dim}; the model embeds in {info['dim']}")
    if index.model_id and index.model_id != info["model_id"]:
        raise DataError(
            f"index {path} was built with model {index.model_id}, this model is {info['model_id']}: "
            "rebuild it with `mmfusion index build`"
        )
    return index


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(app, host: str, port: int, log_level: str) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def _check_exposure(args, settings) -> None:
    """Refuse (ConfigError: one line, exit 2) a non-loopback bind without an API key unless --insecure; checked
    before any model is loaded. The --split children never enforce a key, so they count as keyless."""
    key = settings.api_key if args.role == "all" else None
    problem = exposure_problem(args.host, key, args.insecure)
    if problem is not None:
        raise ConfigError(problem)
    if exposure_problem(args.host, key, False) is not None:
        print(
            f"mmfusion serve: WARNING: --insecure: {args.host} is served without an API key", file=sys.stderr
        )


def cmd_serve(args) -> int:
    settings = _settings(args)
    _check_exposure(args, settings)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.role in ("encoder", "fusion"):  # a child of `--split`: loopback only, no key, no cache
        from .. import load_model
        from .split import create_encoder_app, create_fusion_app

        make = create_encoder_app if args.role == "encoder" else create_fusion_app
        _run(make(load_model(args.model), settings), args.host, args.port, args.log_level)
        return 0
    from ..diffusion.recipe import is_diffusion_folder
    from .generate import unified_folder

    diffusion = is_diffusion_folder(args.model)
    folder = unified_folder(args.model) if diffusion is None else diffusion
    if (args.scd or args.concept_filter) and (folder is not None or args.split):
        raise ConfigError(
            "--scd / --filter check /v1/search or /v1/classify of a contrastive or fusion model folder served "
            "without --split"
        )
    if folder is not None:
        return _serve_unified(args, settings, folder, diffusion=diffusion is not None)
    if args.split:
        if args.prune_threshold is not None:
            raise ConfigError(
                "--prune-threshold with --split: pruning decides per row which encoders run, which the split "
                "front cannot ask the encoder service; serve without --split"
            )
        return _serve_split(args, settings)
    from .. import load_model
    from .app import create_app
    from .backend import LocalBackend
    from .engine import Engine

    if args.prune_threshold is not None:
        from ..evaluate import pruning_model

        model, means = pruning_model(args.model, args.prune_threshold)
        engine = Engine(model, prune_threshold=args.prune_threshold, prune_means=means)
    else:
        engine = Engine(load_model(args.model))
    backend = LocalBackend(engine, settings)
    index = _load_index(args.index, backend.info())
    app = create_app(
        backend=backend, index=index, settings=settings, safety=_safety(args, index, backend.info())
    )
    print(
        f"mmfusion serve: http://{args.host}:{args.port}/ ({backend.info()['model_type']}, "
        f"index {len(index) if index is not None else 'none'})",
        flush=True,
    )
    _run(app, args.host, args.port, args.log_level)
    return 0


def _safety(args, index, info: dict):
    """The opt-in checks of --scd / --filter (serve.safety), or None. --filter and a search calibration check
    /v1/search and need --index; a classify calibration checks /v1/classify of a fusion classifier. A file
    calibrated with another model (its model_id) is refused."""
    if args.scd is None and args.concept_filter is None:
        return None
    import numpy as np

    from ..safety.filters import ConceptFilters
    from ..safety.scd import SCDCalibration
    from .safety import ServeSafety

    scd = SCDCalibration.load(args.scd) if args.scd else None
    filters = ConceptFilters.load(args.concept_filter) if args.concept_filter else None
    if scd is not None and scd.task == "classify":
        if info["model_type"] != "multimodal":
            raise ConfigError(
                f"--scd {args.scd} checks /v1/classify (task classify); this server's model is "
                f"{info['model_type']}: serve a fusion model folder, or calibrate for /v1/search"
            )
        if scd.model_id and scd.model_id != info["model_id"]:
            raise ConfigError(
                f"--scd was calibrated with model {scd.model_id}; this model is {info['model_id']}: recalibrate "
                "with this model"
            )
    searched = {"--scd": scd} if scd is not None and scd.task == "search" else {}
    if filters is not None:
        searched["--filter"] = filters
    if searched and index is None:
        raise ConfigError(
            f"{' / '.join(searched)} check /v1/search: start the server with --index INDEX_DIR too"
        )
    for flag, made in searched.items():
        if made.model_id and index.model_id and made.model_id != index.model_id:
            raise ConfigError(
                f"{flag} was calibrated with model {made.model_id}; this index and model are {index.model_id}: "
                "recalibrate with this model"
            )
    if filters is not None:
        filters.scores(np.zeros((1, index.dim), dtype=np.float32))  # the dimension check, before serving
    return ServeSafety(scd, filters)


def _serve_unified(args, settings, folder, diffusion: bool = False) -> int:
    """A unified model folder (`mmfusion train-unified`) or a joint diffusion model folder (`diffusion`):
    /v1/generate in this one process."""
    from .app import create_app
    from .generate_api import GenerateBackend

    kind = "joint diffusion" if diffusion else "unified"
    flags = (("--split", args.split), ("--index", args.index is not None))
    for flag, given in (*flags, ("--prune-threshold", args.prune_threshold is not None)):
        if given:
            raise ConfigError(
                f"{flag} is for embedding models; {args.model} is a {kind} model folder (POST /v1/generate)"
            )
    if diffusion:
        from .generate_diffusion import DiffusionEngine, load_diffusion_model

        engine = DiffusionEngine(load_diffusion_model(folder))
    else:
        from .generate import GenerateEngine, load_unified

        engine = GenerateEngine(load_unified(folder))
    backend = GenerateBackend(engine, settings)
    app = create_app(backend=backend, settings=settings)
    print(f"mmfusion serve: http://{args.host}:{args.port}/v1/generate ({kind} model)", flush=True)
    _run(app, args.host, args.port, args.log_level)
    return 0


def _model_type(path: str) -> str:
    """model_type from the folder's config.json (as `load_model` reads it), without loading the weights."""
    import json
    from pathlib import Path

    folder = Path(path) / "model" if (Path(path) / "model").is_dir() else Path(path)
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type", "contrastive")
    except (OSError, ValueError):
        return "contrastive"  # the encoder service's load names what is wrong


def _serve_split(args, settings) -> int:
    """Start the encoder service and (multimodal models) the fusion service as child processes on free
    loopback ports, then the front (API, index, feature cache) in this process."""
    from ..process import die_with_parent
    from .app import create_app
    from .remote import RemoteBackend

    common = [sys.executable, "-m", "mmfusion.cli", "serve", args.model, "--host", "127.0.0.1"]
    common += ["--log-level", args.log_level, "--threads", str(args.threads)]
    common += ["--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms)]
    common += ["--queue-size", str(args.queue_size), "--timeout-s", str(args.timeout_s)]
    common += ["--max-body-bytes", str(args.max_body_bytes)] + (["--no-batching"] if args.no_batching else [])
    roles = ["encoder"] + (["fusion"] if _model_type(args.model) == "multimodal" else [])
    ports = {role: _free_port() for role in roles}
    children = {
        role: subprocess.Popen(
            common + ["--role", role, "--port", str(ports[role])],
            preexec_fn=die_with_parent,  # a SIGKILLed front leaves none behind
        )
        for role in roles
    }
    urls = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
    try:
        backend = RemoteBackend.connect(urls["encoder"], urls.get("fusion"), settings)
        index = _load_index(args.index, backend.info())
        app = create_app(backend=backend, index=index, settings=settings)
        where = ", ".join(f"{r} service :{ports[r]} (pid {children[r].pid})" for r in roles)
        print(f"mmfusion serve --split: front http://{args.host}:{args.port}/, {where}", flush=True)
        _run(app, args.host, args.port, args.log_level)
    finally:
        for c in children.values():
            c.terminate()
        for c in children.values():
            try:
                c.wait(timeout=10)
            except subprocess.TimeoutExpired:
                c.kill()
    return 0


__all__ = ["add_commands", "cmd_index_build", "cmd_serve"]
