"""`mmfusion generate --model <diffusion run or folder> --task image|caption|joint` (the joint diffusion
model). The command's parser is `mmfusion.unified.generate_cli`'s; its handler is `cmd_generate` here, which
serves diffusion folders and hands every other model to the unified handler.

--task image --prompt TEXT --out-dir DIR [--n N] [--cfg-scale S]: N PNGs per prompt (text -> image);
--task caption --image X.png ...: a caption per image (image -> text);
--task joint --out-dir DIR [--n N]: N (image, caption) pairs, PNGs named by their captions.
--ddim-steps sets the DDIM steps (default 25); --seed the noise; sampling uses the EMA weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "sample"


def _save(images, names: list[str], out: Path) -> list[Path]:
    from PIL import Image

    from .latents import images_to_unit

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for im, name in zip(images_to_unit(images).numpy(), names):
        Image.fromarray(im).save(out / name)
        paths.append(out / name)
    return paths


def cmd_generate(args: Any) -> int:
    """`mmfusion generate`: a diffusion model folder / run here, anything else to the unified handler."""
    from ..unified.generate_cli import cmd_generate as unified_generate
    from .recipe import is_diffusion_folder

    if is_diffusion_folder(args.model) is None:
        return unified_generate(args)
    return generate_diffusion(args)


def generate_diffusion(args: Any) -> int:
    """Run `mmfusion generate` on a diffusion model (args: the generate command's namespace)."""
    from .recipe import load_diffusion, text_codec
    from .sampling import sample

    model = load_diffusion(args.model)
    codec = text_codec(model.cfg)
    steps = getattr(args, "ddim_steps", 25)
    n = args.n
    if n < 1:
        raise ConfigError(f"--n must be >= 1; got {n}")
    results: list[dict] = []
    if args.task == "image":
        if not args.prompt or not args.out_dir:
            raise ConfigError("--task image needs --prompt TEXT and --out-dir DIR")
        prompts = [p for p in args.prompt for _ in range(n)]
        s = sample(
            model, "image", text=codec.encode(prompts), steps=steps, guidance=args.cfg_scale, seed=args.seed
        )
        names = [f"{k // n:03d}_{k % n:02d}_{_slug(p)}.png" for k, p in enumerate(prompts)]
        for p, path in zip(prompts, _save(s.image, names, Path(args.out_dir))):
            results.append({"prompt": p, "path": str(path)})
            print(f"{path}\t{p}")
    elif args.task == "caption":
        if not args.image:
            raise ConfigError("--task caption needs --image X.png")
        from ..unified.tokenize_cli import list_image_inputs, load_images

        inputs = list_image_inputs(args.image)
        images = load_images(inputs, model.cfg.image_size)
        s = sample(model, "caption", image=images, steps=steps, guidance=args.cfg_scale, seed=args.seed)
        for (_, p), cap in zip(inputs, codec.decode(s.text)):
            results.append({"image": str(p), "caption": cap})
            print(f"{p}\t{cap}")
    elif args.task == "joint":
        if not args.out_dir:
            raise ConfigError("--task joint needs --out-dir DIR")
        s = sample(model, "joint", n=n, steps=steps, seed=args.seed)
        caps = codec.decode(s.text)
        names = [f"{k:03d}_{_slug(c)}.png" for k, c in enumerate(caps)]
        for cap, path in zip(caps, _save(s.image, names, Path(args.out_dir))):
            results.append({"caption": cap, "path": str(path)})
            print(f"{path}\t{cap}")
    else:
        raise ConfigError(f"--task {args.task}: a diffusion model does image, caption or joint")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


__all__ = ["cmd_generate", "generate_diffusion"]
