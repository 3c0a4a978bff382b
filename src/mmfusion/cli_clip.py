"""`mmfusion import-clip` and the folder formats of `mmfusion export` (safetensors, hf-clip, openclip)."""

from __future__ import annotations

import argparse


def add_clip_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-clip",
        help="import an HF CLIPModel folder or an OpenCLIP state dict as an mmfusion model folder",
        description="Convert a CLIP checkpoint into a two-tower mmfusion model folder (text.arch clip) with the "
        "same embeddings: an HF CLIPModel folder (config.json, model.safetensors or pytorch_model.bin, a CLIP "
        "tokenizer, preprocessor_config.json) or an OpenCLIP state dict (.safetensors; .bin / .pt read with "
        "torch.load(weights_only=True)) or OpenCLIP folder (open_clip_model.safetensors + open_clip_config.json). "
        "Supported: CLIP ViT image towers with the causal CLIP text transformer (gelu / quick_gelu). Nothing is "
        "downloaded. Export back with `mmfusion export MODEL --format hf-clip|openclip --out DIR`.",
    )
    p.add_argument(
        "source", help="an HF CLIPModel folder, an OpenCLIP folder, or an OpenCLIP state-dict file"
    )
    p.add_argument("--out", required=True, help="the mmfusion model folder to write")
    p.add_argument("--format", choices=["hf", "openclip"], help="the source's format (default: detected)")
    p.add_argument(
        "--config",
        help="OpenCLIP: its model config JSON (open_clip_config.json, or a model config such as ViT-B-32.json); "
        "default: open_clip_config.json beside the weights, else OpenCLIP's defaults (head width 64, "
        "quick_gelu false)",
    )
    p.add_argument(
        "--tokenizer",
        help="OpenCLIP: a folder with the CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt); default: "
        "the folder of the weights",
    )
    p.set_defaults(func=cmd_import_clip)


def cmd_import_clip(args) -> int:
    from .models.clip_io import import_clip

    model, assumed = import_clip(args.source, args.format, args.config, args.tokenizer)
    if assumed:
        print(f"no OpenCLIP config said otherwise, so assumed: {'; '.join(assumed)}")
    t, i = model.config.text, model.config.image
    print(
        f"imported CLIP: image {i.image_size}px/{i.patch_size} width {i.width} x{i.depth} ({i.act}), text width "
        f"{t.width} x{t.depth} ({t.act}), vocabulary {model.tokenizer.vocab_size}, embed_dim {model.config.embed_dim}"
    )
    print(f"wrote {model.save_pretrained(args.out)}")
    return 0


def export_folder(model, args) -> int:
    """`mmfusion export --format safetensors|hf-clip|openclip`: a folder of weights, no graph."""
    if args.format == "safetensors":
        print(f"wrote {model.save_pretrained(args.out)}")
        return 0
    from .errors import ConfigError
    from .models.clip_io import export_hf_clip, export_openclip
    from .models.contrastive import ContrastiveModel

    if not isinstance(model, ContrastiveModel):
        raise ConfigError(f"--format {args.format} exports two-tower models only, not {type(model).__name__}")
    out = export_hf_clip(model, args.out) if args.format == "hf-clip" else export_openclip(model, args.out)
    print(f"wrote {out} ({'HF CLIPModel' if args.format == 'hf-clip' else 'OpenCLIP'} folder)")
    return 0
