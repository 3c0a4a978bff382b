"""`mmfusion generate`: caption / text->image / VQA / audio caption with a unified model folder (or the run
directory holding it as model/).

The task-level functions here (`caption_images`, `generate_images`, `answer_questions`, `caption_audio`) wrap
`mmfusion.unified.generation.generate` with the task's prompt and span constraint; the benchmark uses them too.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, DataError
from .vlm_generate import questions_per_image

if TYPE_CHECKING:
    import torch

    from .generation import SamplingConfig
    from .sequences import TokenSequence
    from .train import UnifiedBundle


# ---- task-level generation -------------------------------------------------------------------------------


def _run_grouped(
    bundle: UnifiedBundle,
    prompts: Sequence[TokenSequence],
    max_new_tokens: int,
    constraint,
    sampling: SamplingConfig,
    uncond: Sequence[TokenSequence] | None = None,
    cfg_scale: float = 1.0,
) -> list[list[int]]:
    """Generate after each prompt; prompts of equal length run as one batch (generate needs equal lengths).
    Each row's ids are cut after the first <eos>."""
    import torch

    from .generation import generate

    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p.ids)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    eos = bundle.vocab["<eos>"]
    for rows in groups.values():
        ids = torch.stack([prompts[i].ids for i in rows])
        mod = torch.stack([prompts[i].modality for i in rows])
        kw = {}
        if uncond is not None and cfg_scale != 1.0:
            kw = dict(
                cfg_scale=cfg_scale,
                uncond_ids=torch.stack([uncond[i].ids for i in rows]),
                uncond_modality=torch.stack([uncond[i].modality for i in rows]),
            )
        room = bundle.decoder.cfg.max_len + 1 - ids.shape[1]  # generate's limit: prompt + new - 1 <= max_len
        if room < 1:
            raise DataError(
                f"a prompt of {ids.shape[1]} tokens leaves no room in max_len {bundle.decoder.cfg.max_len}"
            )
        new = generate(
            bundle.decoder, ids, mod, min(max_new_tokens, room), sampling, constraint, stop_ids=(eos,), **kw
        )
        for i, row in zip(rows, new.tolist()):
            out[i] = row[: row.index(eos)] if eos in row else row
    return out


def _text_ids(bundle: UnifiedBundle) -> list[int]:
    """Ids a text span may use: the BPE vocabulary without its own [PAD]/[UNK]/[EOT], plus <eos>."""
    from ..modalities.text import SPECIAL_TOKENS as BPE_SPECIALS

    return [*range(len(BPE_SPECIALS), bundle.vocab.n_text), bundle.vocab["<eos>"]]


def _span_constraint(bundle: UnifiedBundle, **kw):
    """An ImageSpanConstraint over this bundle's vocabulary (kw: allow_images, start_in_image, max_images)."""
    from .generation import ImageSpanConstraint

    v = bundle.vocab
    ids = (_text_ids(bundle), range(*v.image_range), v["<boi>"], v["<eoi>"], v.tokens_per_image)
    return ImageSpanConstraint(v.size, *ids, **kw)


def _text_constraint(bundle: UnifiedBundle):
    return _span_constraint(bundle, allow_images=False)


def _captions(
    bundle: UnifiedBundle, prompts, sampling: SamplingConfig | None, max_new_tokens: int
) -> list[str]:
    """Text-only constrained decoding of caption prompts (greedy by default) -> the decoded captions."""
    from .generation import SamplingConfig

    rows = _run_grouped(
        bundle, prompts, max_new_tokens, _text_constraint(bundle), sampling or SamplingConfig()
    )
    return [bundle.text_tokenizer.decode(r) for r in rows]


def caption_images(
    bundle: UnifiedBundle,
    codes: torch.Tensor,
    sampling: SamplingConfig | None = None,
    max_new_tokens: int = 40,
) -> list[str]:
    """VQ codes (N, ...) -> one caption each (text-only constrained decoding, greedy by default)."""
    return _captions(bundle, [bundle.builder.caption(c) for c in codes], sampling, max_new_tokens)


def caption_audio(
    bundle: UnifiedBundle,
    audio_codes: torch.Tensor,
    sampling: SamplingConfig | None = None,
    max_new_tokens: int = 40,
) -> list[str]:
    """Audio VQ codes (N, ...) -> one caption each (text-only constrained decoding, greedy by default)."""
    return _captions(bundle, [bundle.builder.audio_caption(c) for c in audio_codes], sampling, max_new_tokens)


def answer_questions(
    bundle: UnifiedBundle,
    codes: torch.Tensor,
    questions: Sequence[str],
    sampling: SamplingConfig | None = None,
    max_new_tokens: int = 8,
) -> list[str]:
    """VQ codes (N, ...) and N questions -> N answers (text-only constrained decoding, greedy by default)."""
    from .generation import SamplingConfig

    if len(questions) != len(codes):
        raise DataError(f"{len(questions)} questions for {len(codes)} images: give one question per image")
    prompts = [bundle.builder.vqa(c, q) for c, q in zip(codes, questions)]
    rows = _run_grouped(
        bundle, prompts, max_new_tokens, _text_constraint(bundle), sampling or SamplingConfig()
    )
    return [bundle.text_tokenizer.decode(r) for r in rows]


def code_grid(bundle: UnifiedBundle) -> tuple[int, ...]:
    """The VQ code shape of one image: (h, w) or (h, w, levels) for residual VQ."""
    vq = bundle.vqvae
    return (vq.grid, vq.grid, vq.config["rvq_levels"]) if vq.quantizer_type == "rvq" else (vq.grid, vq.grid)


def generate_images(
    bundle: UnifiedBundle,
    prompts: Sequence[str],
    n: int = 1,
    cfg_scale: float = 1.0,
    sampling: SamplingConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text prompts -> (images uint8 (len(prompts) * n, S, S, 3), codes (len(prompts) * n, *code_grid)).

    Rows are prompt-major (prompt 0's n images first). Decoding is constrained to exactly one image's codes
    (then <eoi>); cfg_scale != 1 mixes in the caption-less prompt's logits (classifier-free guidance).
    Sampling defaults to sampling at temperature 1 (seed 0), so the n images of a prompt differ.
    """
    import torch

    from .generation import SamplingConfig
    from .train import tensor_to_images

    if n < 1:
        raise ConfigError(f"n (images per prompt) must be >= 1; got {n}")
    if not prompts:
        raise DataError("no prompts given")
    v, b = bundle.vocab, bundle.builder
    seqs = [b.image(p) for p in prompts for _ in range(n)]
    uncond = [b.image(None) for _ in seqs]
    constraint = _span_constraint(bundle, start_in_image=True, max_images=1)
    sampling = sampling or SamplingConfig(strategy="sample")
    rows = _run_grouped(bundle, seqs, v.tokens_per_image + 1, constraint, sampling, uncond, cfg_scale)
    codes = torch.stack([v.codes_from_ids(torch.tensor(r[: v.tokens_per_image])) for r in rows])
    codes = codes.reshape(len(rows), *code_grid(bundle))
    images = bundle.vqvae.decode(codes.to(next(bundle.vqvae.parameters()).device))
    return torch.from_numpy(tensor_to_images(images)), codes


# ---- the CLI ---------------------------------------------------------------------------------------------


def add_generate_commands(sub: argparse._SubParsersAction) -> None:
    """Register `mmfusion generate`."""
    p = sub.add_parser(
        "generate",
        help="caption an image or an audio clip, generate images from text, or answer a question (unified / vlm model)",
        description="Generate with a unified model folder, or a unified run directory (`mmfusion train` with "
        "model.kind: unified, or `mmfusion train-unified`), or a vlm model folder / run (model.kind: vlm: "
        "--task caption and --task vqa). "
        "--task caption --image X.png [Y.png ...]: print a caption per image. "
        '--task image --prompt "a red circle" --out-dir DIR [--n N] [--cfg-scale S]: write N PNGs per prompt. '
        '--task vqa --image X.png --question "...": print the answer. '
        "--task audio-caption --audio X.wav [Y.flac ...]: print a caption per clip (needs a model trained with "
        "an audio tokenizer). A joint diffusion model (model.kind: diffusion) does --task image, caption and "
        "joint (--out-dir DIR --n N: N image-caption pairs), with --ddim-steps. Decoding is constrained: captions and answers contain only text tokens, an image "
        "exactly one image's codes.",
    )
    p.add_argument("--model", required=True, help="a unified model folder or run directory")
    p.add_argument("--task", required=True, choices=["caption", "image", "vqa", "audio-caption", "joint"])
    p.add_argument("--image", nargs="+", help="input image(s) for caption / vqa (PNG/JPEG)")
    p.add_argument(
        "--audio",
        nargs="+",
        help="input clip(s) or folders for audio-caption (WAV/FLAC/OGG; any rate, mono/stereo)",
    )
    p.add_argument(
        "--question", action="append", help="question for --task vqa (one per --image, repeatable)"
    )
    p.add_argument("--prompt", action="append", help="text prompt for --task image (repeatable)")
    p.add_argument("--out-dir", help="folder for the PNGs of --task image")
    p.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument(
        "--strategy",
        choices=["greedy", "sample"],
        help="default: greedy for caption / vqa / audio-caption, sample for image",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens when sampling")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="longest caption / answer (default 40)")
    p.add_argument("--ddim-steps", type=int, default=25, help="DDIM steps of a diffusion model (default 25)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument(
        "--provenance",
        action="store_true",
        help="--task image: write a signed manifest per PNG (<png>.provenance.json: SHA-256, model id, seed, "
        "prompt; HMAC-SHA256 keyed by --key-file or $MMFUSION_PROVENANCE_KEY; `mmfusion provenance verify`)",
    )
    p.add_argument(
        "--watermark", action="store_true", help="--task image: embed the keyed invisible watermark"
    )
    p.add_argument("--key-file", help="provenance / watermark key file (default: $MMFUSION_PROVENANCE_KEY)")
    p.set_defaults(func=cmd_generate)


def _sampling(args, default: str):
    from .generation import SamplingConfig

    return SamplingConfig(args.strategy or default, args.temperature, args.top_k, args.top_p, args.seed)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "prompt"


def _provenance_key(args) -> bytes | None:
    if not (args.provenance or args.watermark):
        return None
    from ..safety.provenance import load_key

    return load_key(args.key_file)


def _mark(image, key):
    from ..safety import watermark

    return watermark.embed(image, key)


def _sign(path: Path, key, args, prompt: str, k: int):
    """The signed manifest of one generated PNG: model id = digest of the model folder's files."""
    from ..safety.provenance import folder_id, write_signed_manifest

    folder = Path(args.model) / "model" if (Path(args.model) / "model").is_dir() else Path(args.model)
    extra = {"index": k % args.n, "cfg_scale": args.cfg_scale, "watermark": bool(args.watermark)}
    return write_signed_manifest(path, key, folder_id(folder), args.seed, prompt, **extra)


def cmd_generate(args) -> int:
    from ..models.vlm import is_vlm_folder
    from .tokenize_cli import list_audio_inputs, list_image_inputs, load_audios, load_images
    from .train import UnifiedBundle, encode_images

    if args.task == "joint":  # (mmfusion.diffusion.generate handles diffusion folders before this)
        raise ConfigError("--task joint needs a joint diffusion model (model.kind: diffusion)")
    if is_vlm_folder(args.model) is not None:  # an image tower -> projector -> HF causal LM folder
        from .vlm_generate import generate_vlm

        return generate_vlm(args)
    if (args.provenance or args.watermark) and args.task != "image":
        raise ConfigError(
            f"--provenance / --watermark mark generated images (--task image), not --task {args.task}"
        )
    bundle = UnifiedBundle.load(args.model)
    results: list[dict] = []
    if args.task == "audio-caption":
        if not args.audio:
            raise ConfigError("--task audio-caption needs --audio X.wav")
        if bundle.audio_vqvae is None:
            raise DataError(
                f"{args.model} has no audio tokenizer (audio_tokenizer/): train the model with "
                "model.audio_tokenizer (`mmfusion train-unified --audio-tokenizer DIR`) to caption audio"
            )
        inputs = list_audio_inputs(args.audio)
        codes = encode_images(bundle.audio_vqvae, load_audios(inputs, bundle.audio_frontend))
        texts = caption_audio(bundle, codes, _sampling(args, "greedy"), args.max_new_tokens)
        results = [{"audio": str(p), "caption": c} for (_, p), c in zip(inputs, texts)]
        for (_, p), text in zip(inputs, texts):
            print(f"{p}\t{text}")
    elif args.task == "image":
        if not args.prompt or not args.out_dir:
            raise ConfigError("--task image needs --prompt TEXT and --out-dir DIR")
        from PIL import Image

        key = _provenance_key(args)  # before generating: a missing key is a config error, not lost work
        images, _ = generate_images(bundle, args.prompt, args.n, args.cfg_scale, _sampling(args, "sample"))
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for k, im in enumerate(images.numpy()):
            prompt = args.prompt[k // args.n]
            path = out / f"{k // args.n:03d}_{k % args.n:02d}_{_slug(prompt)}.png"
            Image.fromarray(_mark(im, key) if args.watermark else im).save(path)
            results.append({"prompt": prompt, "path": str(path)})
            if args.provenance:
                manifest, _ = _sign(path, key, args, prompt, k)
                results[-1]["provenance"] = str(manifest)
            print(f"{path}\t{prompt}")
    else:
        if not args.image:
            raise ConfigError(f"--task {args.task} needs --image X.png")
        inputs = list_image_inputs(args.image)
        codes = encode_images(bundle.vqvae, load_images(inputs, bundle.vqvae.image_size))
        if args.task == "caption":
            texts = caption_images(bundle, codes, _sampling(args, "greedy"), args.max_new_tokens)
            results = [{"image": str(p), "caption": c} for (_, p), c in zip(inputs, texts)]
        else:
            questions = questions_per_image(args.question, len(inputs))
            texts = answer_questions(bundle, codes, questions, _sampling(args, "greedy"), args.max_new_tokens)
            results = [
                {"image": str(p), "question": q, "answer": a}
                for (_, p), q, a in zip(inputs, questions, texts)
            ]
        for (_, p), text in zip(inputs, texts):
            print(f"{p}\t{text}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
