"""`mmfusion generate` with a vlm model folder (image tower -> projector -> HF causal LM; mmfusion.models.vlm):
--task caption and --task vqa, the same arguments and output lines as with a unified model."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def questions_per_image(questions: list[str] | None, n_images: int) -> list[str]:
    """`--question` once for every image, or one per image; ConfigError otherwise."""
    questions = list(questions or [])
    if len(questions) == 1:
        questions = questions * n_images
    if len(questions) != n_images:
        raise ConfigError(
            f"--task vqa: {len(questions)} --question for {n_images} images; give one, or one per image"
        )
    return questions


def generate_vlm(args) -> int:
    """Print `path<TAB>caption` (or answer) per image; --json also writes them."""
    import torch

    from ..models.vlm import VLMModel, is_vlm_folder
    from .tokenize_cli import list_image_inputs, load_images

    if args.task not in ("caption", "vqa"):
        raise ConfigError(f"--task {args.task}: a vlm model generates text only; use --task caption or vqa")
    if not args.image:
        raise ConfigError(f"--task {args.task} needs --image X.png")
    model = VLMModel.from_pretrained(
        is_vlm_folder(args.model), map_location="cuda" if torch.cuda.is_available() else "cpu"
    )
    inputs = list_image_inputs(args.image)
    images = load_images(inputs, model.image_size)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        strategy=args.strategy or "greedy",
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    if args.task == "caption":
        texts = model.caption(images, **options)
        results = [{"image": str(p), "caption": c} for (_, p), c in zip(inputs, texts)]
    else:
        questions = questions_per_image(args.question, len(inputs))
        texts = model.answer(images, questions, **options)
        results = [
            {"image": str(p), "question": q, "answer": a} for (_, p), q, a in zip(inputs, questions, texts)
        ]
    for (_, p), text in zip(inputs, texts):
        print(f"{p}\t{text}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


__all__ = ["generate_vlm"]
