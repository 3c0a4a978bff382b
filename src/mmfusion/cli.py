"""`mmfusion <command>`: train, eval, info, data synth. Errors become one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .cli_align import add_align_commands
from .cli_clip import add_clip_commands, export_folder
from .cli_federated import add_federated_commands
from .cli_safety import add_guard_commands, add_safety_commands
from .errors import CheckpointError, ConfigError, DataError, MMFusionError

EXIT_CONFIG = 2
EXIT_ERROR = 1


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML recipe (see configs/); defaults are used when omitted")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.steps=200 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmfusion",
        description="Build, train and evaluate multimodal models. `mmfusion COMMAND --help` for more.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model from a YAML recipe",
        description="Train a model from a YAML recipe, "
        "then evaluate it on the test split. Multi-process: --nproc N (torchrun, DDP).",
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run from its newest valid checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="delete an existing run directory of the same name first"
    )
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument(
        "--nproc", type=int, default=1, help="processes on this machine (launches torchrun; default 1)"
    )
    p.add_argument(
        "--max-restarts", type=int, default=0, help="torchrun restarts after a worker dies (with --nproc)"
    )

    p = sub.add_parser(
        "eval",
        help="evaluate a run directory or a saved model",
        description="Evaluate a trained "
        "model: retrieval recall@K (scene-matched), zero-shot colour/shape accuracy; writes "
        "metrics.json and PNG plots.",
    )
    p.add_argument("path", help="a run directory (runs/NAME) or a save_pretrained model folder")
    _add_config_args(p)
    p.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="which split (default test)"
    )
    p.add_argument("--out", help="where to write metrics.json and plots (default: the run directory)")
    p.add_argument(
        "--prune-threshold",
        type=float,
        metavar="T",
        help="router-fusion task runs: also evaluate with modality pruning at router gate threshold T in [0, 1] "
        "(calibrated on the val split); adds accuracy_pruned and pruned_<modality> (share of rows skipped)",
    )

    p = sub.add_parser(
        "info",
        help="environment, or what a run / model folder holds",
        description="Without PATH: versions, devices and the precision `auto` picks. With PATH: the model's "
        "configuration, parameter count, where each tower's weights came from (+ SHA-256) and checkpoints.",
    )
    p.add_argument("path", nargs="?", help="a run directory or a model folder")

    p = sub.add_parser(
        "export",
        help="export a model's encoders (or a fusion model) to ONNX (optionally INT8)",
        description="Export the text and image encoders of a saved two-tower model to ONNX (dynamic batch "
        "and text length), or a fusion model (a MultiModalModel folder: one graph from per-modality inputs "
        "and presence masks to logits; the moe fusion cannot be exported), check against PyTorch with "
        "onnxruntime, and optionally quantize to INT8 (ONNX Runtime dynamic quantization). safetensors: "
        "save_pretrained; hf-clip / openclip: a CLIP checkpoint folder (text.arch clip models, see import-clip).",
    )
    p.add_argument("model", help="a run directory or a save_pretrained model folder")
    p.add_argument("--out", required=True, help="output folder for the .onnx files")
    p.add_argument("--format", default="onnx", choices=["onnx", "safetensors", "hf-clip", "openclip"])
    p.add_argument("--int8", action="store_true", help="also write *.int8.onnx (dynamic INT8 weights)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime vs PyTorch check")
    p.add_argument("--opset", type=int, default=18)

    p = sub.add_parser(
        "quantize",
        help="INT8-quantize a model (ONNX Runtime dynamic, or torchao weight-only)",
        description="INT8 quantization with its check against fp32 (two-tower: lowest per-row cosine of the "
        "embeddings; fusion model folder: max |logit difference|, on random inputs) and the size before/after. "
        "onnx (default): `export --int8` into --out (fp32 and int8 .onnx files). torchao: int8 weight-only on "
        "the PyTorch model, checked in memory; torchao int8 tensors cannot be saved as safetensors, so --out "
        "then gets the ONNX int8 files only.",
    )
    p.add_argument("model", help="a run directory or a save_pretrained model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", default="onnx", choices=["onnx", "torchao"], help="default onnx")

    p = sub.add_parser(
        "prune",
        help="magnitude-prune a model's Linear weights (optionally fine-tune to recover)",
        description="Global L1 unstructured pruning of every Linear weight to a target sparsity. "
        "With --finetune-steps N the masked model is then trained N steps on the run's training data "
        "with the run's train config (pruned weights stay exactly zero); the pruning is made permanent "
        "and the model saved as a new model folder.",
    )
    p.add_argument("model", help="a run directory or a save_pretrained model folder")
    p.add_argument(
        "--sparsity", type=float, required=True, help="fraction of Linear weights set to 0, in [0, 1]"
    )
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="optimizer steps of fine-tuning after pruning (default 0)",
    )
    p.add_argument(
        "--config",
        "-c",
        help="run config for the fine-tuning data and settings (default: the run directory's config.yaml; "
        "required for a bare model folder)",
    )

    p = sub.add_parser("data", help="dataset tools", description="Dataset tools.")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    s = dsub.add_parser(
        "synth",
        help="write the embedded synthetic world to disk",
        description="Render N samples of the synthetic world (image, caption, audio, video, VQA, "
        "scene record), or of one of its tasks (--task: vqa rows carry question/answer, match and "
        "classification tasks a label), as a JSONL manifest with media files, or as WebDataset shards: "
        "the format `mmfusion train` reads with data.source jsonl / webdataset.",
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, required=True, help="number of samples")
    s.add_argument("--split", default="train", choices=["train", "val", "test"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--format", default="jsonl", choices=["jsonl", "webdataset"])
    s.add_argument(
        "--modalities",
        default="image,text,audio,video,vqa",
        help="comma-separated subset of image,text,audio,video,vqa (without --task)",
    )
    s.add_argument(
        "--task", default=None, help="write this task's samples (vqa, audio_image, video_text, ...)"
    )
    s.add_argument("--task-seed", type=int, default=0, help="the task's own draws (questions, negatives)")
    # `data build|info|diff|pseudo-label|topup` (the data engine), handlers via set_defaults(func=); it gets the
    # model loader from here (data must not import models)
    from . import load_model
    from .data.engine.commands import add_data_commands

    add_data_commands(dsub, load_model)
    from .serve.commands import add_commands  # `serve`, `index build` (handlers via set_defaults(func=))

    add_commands(sub)
    from .unified.commands import add_commands as add_unified_commands  # `tokenize`, `generate`

    add_unified_commands(sub)
    from .diffusion.generate import cmd_generate  # `generate` also serves joint diffusion models

    sub.choices["generate"].set_defaults(func=cmd_generate)
    from .cli_unified import add_train_unified_command  # `train-unified`, an alias of a unified run

    add_train_unified_command(sub)
    add_clip_commands(sub)  # `import-clip` (mmfusion.cli_clip)
    add_federated_commands(sub, _add_config_args)  # `federate` (mmfusion.cli_federated)
    add_safety_commands(sub, _add_config_args)  # `bias` (mmfusion.cli_safety)
    add_guard_commands(sub)  # `scd` (mmfusion.cli_scd), `filter`, `provenance` (mmfusion.cli_safety)
    add_align_commands(sub, _add_config_args)  # `align` (mmfusion.cli_align)
    return parser


# ---- commands -------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # validated before any work, also in the launcher
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_torchrun(args)
    from . import run as run_mod

    # a worker restarted by torchrun (--max-restarts) continues from the newest valid checkpoint
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun rank: never outlive the agent that started it
        from .process import die_with_parent

        die_with_parent(signal.SIGKILL)
    if restarted:
        print(f"restart {os.environ['TORCHELASTIC_RESTART_COUNT']} (torchrun): resuming", flush=True)
    from .train import distributed as dist_utils

    try:
        result = run_mod.train(
            cfg, resume=args.resume or restarted, overwrite=args.overwrite and not restarted
        )
        main = dist_utils.rank() == 0
    finally:
        dist_utils.shutdown()
    if not main:
        return 0
    if not args.no_eval:
        from .evaluate import evaluate_run

        evaluate_run(Path(result["run_dir"]), cfg, "test", Path(result["run_dir"]))
    print(f"run directory: {result['run_dir']}")
    return 0


def _launch_torchrun(args) -> int:
    """Re-run this command as `--nproc` ranks under torchrun (standalone rendezvous, `--max-restarts`).

    torchrun runs in its own session: SIGINT / SIGTERM sent to this process are forwarded to it (it stops its
    ranks), and if this process is SIGKILLed Linux SIGTERMs torchrun, whose ranks in turn die with it
    (mmfusion.process)."""
    from .process import run_forwarding_signals

    # forward everything but the launcher's own options (torchrun would mistake --nproc for its own)
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--max-restarts=")):
            continue
        argv.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        f"--max-restarts={args.max_restarts}",
        "-m",
        "mmfusion.cli",
        *argv,
    ]
    return run_forwarding_signals(cmd)


def cmd_eval(args) -> int:
    from .config import load_config

    path = Path(args.path)
    if not path.exists():
        raise DataError(f"{path} does not exist: expected a run directory or a model folder")
    snapshot = path / "config.yaml"
    cfg = load_config(args.config or (snapshot if snapshot.is_file() else None), args.overrides)
    from .evaluate import evaluate_run

    evaluate_run(path, cfg, args.split, Path(args.out) if args.out else path, args.prune_threshold)
    return 0


def cmd_info(args) -> int:
    from . import __version__
    from .train.precision import environment_lines

    if args.path is None:
        print(f"mmfusion {__version__}", *environment_lines(), sep="\n")
        return 0
    path = Path(args.path)
    model_dir = path / "model" if (path / "model").is_dir() else path
    if (model_dir / "config.json").is_file():
        from . import load_model
        from .models.provenance import describe_folder as provenance  # where each tower's weights came from

        model = load_model(model_dir)
        n = sum(p.numel() for p in model.parameters())
        vocab = model.tokenizer.vocab_size if model.tokenizer is not None else "-"
        print(
            f"model folder {model_dir}: {type(model).__name__}, {n / 1e6:.2f}M parameters, vocabulary {vocab}"
        )
        print(json.dumps(model.config.model_dump(mode="json"), indent=2), *provenance(model_dir), sep="\n")
    from .train.checkpoint import list_checkpoints, verify

    for ck in list_checkpoints(path / "checkpoints"):
        problem = verify(ck)
        print(f"checkpoint {ck.name}: {'ok' if problem is None else 'DAMAGED: ' + problem}")
    if (path / "metrics.json").is_file():
        print(f"metrics: {(path / 'metrics.json').read_text()}")
    if not (model_dir / "config.json").is_file() and not (path / "checkpoints").is_dir():
        raise DataError(f"{path} is neither a run directory nor a model folder")
    return 0


def cmd_data(args) -> int:
    from .data.synthetic import SyntheticWorld, WorldConfig, make_split
    from .data.writers import write_jsonl, write_webdataset

    mods = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    allowed = {"image", "text", "audio", "video", "vqa"}
    bad = [m for m in mods if m not in allowed]
    if bad:
        raise ConfigError(f"--modalities: unknown {', '.join(bad)}; allowed: {', '.join(sorted(allowed))}")
    if args.n < 1:
        raise ConfigError(f"--n = {args.n}: expected a positive number of samples")
    world = SyntheticWorld(WorldConfig(seed=args.seed, image_size=args.image_size))
    if args.task is not None:
        from .data.tasks import TASKS, make_task_data

        if args.task not in TASKS:
            raise ConfigError(f"--task {args.task!r}: unknown task; allowed: {', '.join(sorted(TASKS))}")
        samples = make_task_data(args.task, world, args.split, args.n, seed=args.task_seed)
    else:
        samples = make_split(world, args.split, args.n, modalities=mods, progress=True)
    out = Path(args.out)
    if args.format == "jsonl":
        path = write_jsonl(samples, out, name=args.split)
        print(f"wrote {len(samples)} samples: {path}")
    else:
        paths = write_webdataset(samples, out, name=args.split)
        print(f"wrote {len(samples)} samples in {len(paths)} shard(s) under {out}")
    return 0


def cmd_export(args) -> int:
    from . import load_model

    model = load_model(args.model)
    if args.format != "onnx":  # safetensors (save_pretrained), hf-clip, openclip: mmfusion.cli_clip
        return export_folder(model, args)
    from .models.multimodal import MultiModalModel
    from .serve.export import export_fusion_onnx, export_onnx, verify_fusion_onnx, verify_onnx

    if isinstance(model, MultiModalModel):
        path = export_fusion_onnx(model, args.out, opset=args.opset)
        print(f"fusion model: {path}")
        if not args.no_verify:
            print(f"fusion model: max |onnxruntime - PyTorch| = {verify_fusion_onnx(model, path):.2e}")
        if args.int8:
            from .serve.quantize import quantize_onnx

            for name, p in quantize_onnx({"fusion": path}).items():
                print(f"{name} model int8: {p}")
        return 0
    paths = export_onnx(model, args.out, opset=args.opset)
    for name, path in paths.items():
        print(f"{name} encoder: {path}")
    if not args.no_verify:
        for name, diff in verify_onnx(model, paths).items():
            print(f"{name} encoder: max |onnxruntime - PyTorch| = {diff:.2e}")
    if args.int8:
        from .serve.quantize import quantize_onnx

        for name, path in quantize_onnx(paths).items():
            print(f"{name} encoder int8: {path}")
    return 0


def cmd_quantize(args) -> int:
    from . import load_model
    from .serve.export import ONNX_FILES
    from .serve.quantize import int8_path, onnx_cosine

    model = load_model(args.model)
    from .models.multimodal import MultiModalModel

    if isinstance(model, MultiModalModel):
        from .serve.fusion_quantize import quantize_fusion

        quantize_fusion(model, args.out, args.method)
        return 0
    if args.method == "torchao":
        _quantize_torchao(model)
        print(f"writing the ONNX int8 files to {args.out} instead")
    # the `export --int8` path: fp32 export, onnxruntime-vs-PyTorch check, dynamic INT8 quantization
    cmd_export(
        argparse.Namespace(
            model=args.model, out=args.out, format="onnx", int8=True, no_verify=False, opset=18
        )
    )
    fp32 = {n: Path(args.out) / f for n, f in ONNX_FILES.items()}
    for name, path in fp32.items():
        a, b = path.stat().st_size, int8_path(path).stat().st_size
        print(f"{name} encoder size: fp32 {a / 1024:.1f} KB -> int8 {b / 1024:.1f} KB ({b / a:.2f}x)")
    for name, cos in onnx_cosine(model, {n: int8_path(p) for n, p in fp32.items()}).items():
        print(f"{name} encoder int8 ONNX: min cosine to fp32 PyTorch = {cos:.4f}")
    return 0


def _quantize_torchao(model) -> None:
    """torchao int8 weight-only on a copy of `model`: in-memory size and cosine to fp32; nothing saved."""
    import copy

    import torch
    import torch.nn.functional as F

    from .serve.export import example_inputs
    from .serve.quantize import TORCHAO_SAVE_NOTE, quantize_torchao_int8, tensor_bytes

    q = quantize_torchao_int8(copy.deepcopy(model))
    before, after = tensor_bytes(model), tensor_bytes(q)
    print(f"torchao int8 weight-only: {before / 1024:.1f} KB -> {after / 1024:.1f} KB in memory")
    verbs = {"text": "embed_text_ids", "image": "embed_image_tensor"}
    with torch.no_grad():
        for name, verb in verbs.items():
            x = example_inputs(model, 5, model.text_encoder.context_length, seed=1)[name]
            cos = F.cosine_similarity(getattr(q, verb)(x), getattr(model, verb)(x), dim=1)
            print(f"{name} encoder torchao int8: min cosine to fp32 = {float(cos.min()):.4f}")
    print(f"note: {TORCHAO_SAVE_NOTE}")


def _prune_run_config(args):
    """The run config that fine-tuning uses: --config, else the run directory's config.yaml."""
    from .config import load_config

    if args.config:
        return load_config(args.config)
    path = Path(args.model)
    for candidate in (path / "config.yaml", path.parent / "config.yaml" if path.name == "model" else None):
        if candidate is not None and candidate.is_file():
            return load_config(candidate)
    raise ConfigError(
        f"--finetune-steps needs the run's config: {path} has no config.yaml (a bare model folder); "
        "pass --config RUN_CONFIG"
    )


def cmd_prune(args) -> int:
    from . import load_model
    from .serve.quantize import finetune_pruned, make_permanent, prune_model, weight_sparsity

    if args.finetune_steps < 0:
        raise ConfigError(f"--finetune-steps = {args.finetune_steps}: expected 0 or more")
    cfg = _prune_run_config(args) if args.finetune_steps else None
    model = load_model(args.model)
    achieved = prune_model(model, args.sparsity, permanent=not args.finetune_steps)
    print(f"pruned Linear weights to sparsity {achieved:.4f}")
    if args.finetune_steps:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mmfusion-prune-") as work:
            last = finetune_pruned(model, cfg, args.finetune_steps, work)
        make_permanent(model)
        achieved = weight_sparsity(model)
        print(
            f"fine-tuned {args.finetune_steps} steps (last loss {last.get('loss', float('nan')):.4f}); "
            f"sparsity {achieved:.4f}"
        )
    model.save_pretrained(args.out)
    print(f"saved {args.out}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "info": cmd_info,
    "data": cmd_data,
    "export": cmd_export,
    "quantize": cmd_quantize,
    "prune": cmd_prune,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return (getattr(args, "func", None) or COMMANDS[args.command])(args)
    except ConfigError as e:
        print(f"mmfusion: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (DataError, CheckpointError, MMFusionError) as e:
        print(f"mmfusion: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except ImportError as e:  # an optional extra (e.g. mmfusion[serve]) is not installed
        print(f"mmfusion: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("mmfusion: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
