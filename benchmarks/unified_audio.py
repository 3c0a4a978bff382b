#!/usr/bin/env python
"""Audio captioning inside the unified model (issue 6 part 2: audio codes in the one vocabulary), CPU, seeded.

Per seed (world seed = seed): an audio VQ-VAE (EMA VQ, --audio-codebook codes, --audio-steps steps) over
AudioFrontEnd(n_mels=--n-mels, hop=--hop) spectrograms of 0.5 s synthetic-world clips (one tone per object, left
to right; colour -> pitch, shape -> waveform, size -> loudness), a 16x16 image VQ-VAE (K=64, --image-steps
steps), a BPE (128 ids), and a decoder (--dim/--depth/--heads) trained --steps steps of --batch sequences on the
mixed tasks caption (image -> caption) and audio_caption (clip -> caption) over --train scenes.

On --eval held-out test scenes, greedy audio captions (and, for reference, greedy image captions of the same
model) are scored:
- BLEU / ROUGE-L / CIDEr (mmfusion.eval.generation.caption_metrics; references = all templates of the scene);
  chance = the same captions scored against the references of a shuffled scene order;
- first-colour accuracy: the colour of the leftmost object, read from the caption by parsing it with the
  world's templates (unparsable captions count as wrong); uniform chance 1/8;
- colours exact: every object's colour right, left to right; count accuracy: the number of objects;
- parse rate: captions that follow a template;
- prior baselines: always answering the training scenes' most frequent first colour / object count (scenes
  have 1 object about half the time, so the count prior is ~0.48, not 1/3).

Writes a table to stdout, --out/unified_audio.json and --out/unified_audio.png (accuracy per seed vs chance).
The default front end (32 mels, hop 320 = 56 tokens per clip) is smaller than `mmfusion tokenize train
--modality audio`'s (64 mels, hop 160 = 208 tokens) to fit 3 seeds in ~5 min on one core.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from mmfusion.data.synthetic import (
    COLOURS,
    TEMPLATES,
    Scene,
    SyntheticWorld,
    WorldConfig,
    caption_for,
    make_split,
)
from mmfusion.eval.generation import caption_metrics
from mmfusion.modalities.audio import AudioFrontEnd
from mmfusion.models.vq import VQVAE
from mmfusion.unified.generate_cli import caption_audio, caption_images
from mmfusion.unified.model import UnifiedConfig, UnifiedDecoder
from mmfusion.unified.sequences import SequenceBuilder, UnifiedVocab
from mmfusion.unified.train import (
    UnifiedBundle,
    UnifiedTrainConfig,
    code_count,
    evaluate_vqvae,
    images_to_tensor,
    parse_caption,
    train_text_tokenizer,
    train_unified,
    train_vqvae,
    world_task_data,
)


def content_scores(captions: list[str], scenes: list[Scene]) -> dict[str, float]:
    """First-colour accuracy, all-colours-exact and object-count accuracy (via parse_caption), parse rate."""
    parsed = [parse_caption(c) for c in captions]
    keys = [s.key() for s in scenes]
    n = len(captions)
    return {
        "first_colour_acc": sum(p is not None and p[0][1] == k[0][1] for p, k in zip(parsed, keys)) / n,
        "colours_exact": sum(
            p is not None and [o[1] for o in p] == [o[1] for o in k] for p, k in zip(parsed, keys)
        )
        / n,
        "count_acc": sum(p is not None and len(p) == len(k) for p, k in zip(parsed, keys)) / n,
        "parse_rate": sum(p is not None for p in parsed) / n,
    }


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    world = SyntheticWorld(WorldConfig(seed=seed, image_size=16))
    frontend = AudioFrontEnd(n_mels=args.n_mels, hop=args.hop)
    torch.manual_seed(seed)
    audio_vq = VQVAE(
        image_size=16,
        channels=16,
        codebook_size=args.audio_codebook,
        code_dim=8,
        dead_code_threshold=3.0,
        in_channels=1,
        input_shape=frontend.shape,
    )
    image_vq = VQVAE(image_size=16, channels=16, codebook_size=64, code_dim=16, dead_code_threshold=3.0)
    # the tokenizers: trained on the training scenes' clips and images (test scenes are held out)
    samples = make_split(world, "train", args.train, ("image", "text", "audio", "vqa"))
    spec = frontend([s["audio"] for s in samples], [s["audio_sr"] for s in samples])
    train_vqvae(audio_vq, spec, args.audio_steps, seed=seed)
    train_vqvae(image_vq, images_to_tensor([s["image"] for s in samples]), args.image_steps, seed=seed)
    audio_stats = evaluate_vqvae(audio_vq, spec[:256])
    tok = train_text_tokenizer(samples, 128)
    vocab = UnifiedVocab(
        tok.vocab_size,
        image_vq.codebook_size,
        code_count(image_vq),
        audio_vq.codebook_size,
        code_count(audio_vq),
    )
    builder = SequenceBuilder(vocab, tok)
    audio_kw = dict(audio_vqvae=audio_vq, audio_frontend=frontend)
    tasks = ("caption", "audio_caption")
    train = world_task_data(world, "train", args.train, image_vq, builder, tasks, **audio_kw)
    held = world_task_data(world, "test", args.eval, image_vq, builder, tasks, **audio_kw)
    longest = max(len(s.ids) for seqs in train.examples.values() for s in seqs)
    torch.manual_seed(seed)
    model = UnifiedDecoder(
        UnifiedConfig(vocab.size, dim=args.dim, depth=args.depth, heads=args.heads, max_len=longest + 32)
    )
    cfg = UnifiedTrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        warmup_steps=min(50, args.steps - 1),
        seed=seed,
        log_every=max(1, args.steps // 10),
        device="cpu",
    )
    result = train_unified(model, train.examples, vocab, cfg)
    bundle = UnifiedBundle(model.eval(), vocab, tok, image_vq, audio_vq, frontend)
    scenes = [Scene.from_dict(s["scene"]) for s in held.samples]
    refs = [[caption_for(sc, k) for k in range(len(TEMPLATES[len(sc.objects)]))] for sc in scenes]
    shuffled = [refs[i] for i in np.random.default_rng(seed).permutation(len(refs))]
    row: dict = {
        "seed": seed,
        "tokens_per_clip": code_count(audio_vq),
        "audio_vq_usage": audio_stats["usage"],
        "audio_vq_psnr": audio_stats["psnr"],
        "train_ce_last": result.last["ce"],
    }
    captions = {"audio": caption_audio(bundle, held.audio_codes), "image": caption_images(bundle, held.codes)}
    for name, caps in captions.items():
        row[name] = {**caption_metrics(caps, refs), **content_scores(caps, scenes)}
        row[f"{name}_chance"] = caption_metrics(caps, shuffled)
    # prior baselines: always answer the training scenes' most frequent first colour / object count
    train_keys = [Scene.from_dict(s["scene"]).key() for s in train.samples]
    top_colour = Counter(k[0][1] for k in train_keys).most_common(1)[0][0]
    top_count = Counter(len(k) for k in train_keys).most_common(1)[0][0]
    row["prior"] = {
        "first_colour_acc": float(np.mean([sc.key()[0][1] == top_colour for sc in scenes])),
        "count_acc": float(np.mean([len(sc.objects) == top_count for sc in scenes])),
    }
    row["examples"] = [
        {"reference": s["text"], "audio_caption": a, "image_caption": i}
        for s, a, i in zip(held.samples[:6], captions["audio"], captions["image"])
    ]
    row["seconds"] = time.perf_counter() - t0
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("first_colour_acc", "colours_exact", "count_acc")
    prior = [np.mean([r["prior"][m] for r in rows]) if m != "colours_exact" else None for m in metrics]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(metrics))
    for k, name in enumerate(("audio", "image")):
        vals = np.array([[r[name][m] for m in metrics] for r in rows])
        ax.bar(
            x + (k - 0.5) * 0.38, vals.mean(0), 0.38, yerr=vals.std(0), label=f"{name} captions", capsize=3
        )
        for j in range(len(metrics)):
            ax.scatter(np.full(len(rows), x[j] + (k - 0.5) * 0.38), vals[:, j], color="k", s=8, zorder=3)
    ax.hlines(1 / len(COLOURS), x[0] - 0.4, x[0] + 0.4, colors="r", linestyles=":", label="uniform chance")
    for j, c in enumerate(prior):
        if c is not None:
            ax.hlines(
                c, x[j] - 0.4, x[j] + 0.4, colors="r", linestyles="--", label="prior" if j == 0 else None
            )
    ax.set_xticks(x, ["first colour", "all colours", "object count"])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"held-out accuracy ({len(rows)} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train", type=int, default=1024, help="training scenes (default 1024)")
    p.add_argument("--eval", type=int, default=128, help="held-out test scenes (default 128)")
    p.add_argument("--n-mels", type=int, default=32, help="front-end mel bands (default 32)")
    p.add_argument("--hop", type=int, default=320, help="front-end hop in samples at 16 kHz (default 320)")
    p.add_argument("--audio-codebook", type=int, default=64, help="audio VQ codes (default 64)")
    p.add_argument("--audio-steps", type=int, default=300, help="audio VQ-VAE steps (default 300)")
    p.add_argument("--image-steps", type=int, default=150, help="image VQ-VAE steps (default 150)")
    p.add_argument("--steps", type=int, default=1200, help="decoder steps (default 1200)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="runs/unified_audio", help="folder for the JSON and the plot")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args))
        r = rows[-1]
        print(
            f"seed {seed}: audio first colour {r['audio']['first_colour_acc']:.3f}, CIDEr {r['audio']['cider']:.3f}"
            f" ({r['seconds']:.0f} s)",
            flush=True,
        )
    (out / "unified_audio.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    plot(rows, out / "unified_audio.png")

    def ms(values: list[float], fmt: str) -> str:
        return f"{np.mean(values):{fmt}} ± {np.std(values):{fmt}}"

    prior = {m: ms([r["prior"][m] for r in rows], ".3f") for m in ("first_colour_acc", "count_acc")}
    print(
        f"\n{len(rows)} seeds, {args.eval} held-out scenes each, greedy; uniform chance: first colour 0.125"
    )
    print("| captions of | BLEU | CIDEr | ROUGE-L | first colour | all colours | count | parsed |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("audio", "image"):
        cells = [
            ms([r[name][m] for r in rows], f)
            for m, f in (("bleu", ".1f"), ("cider", ".2f"), ("rouge_l", ".3f"))
        ]
        cells += [
            ms([r[name][m] for r in rows], ".3f")
            for m in ("first_colour_acc", "colours_exact", "count_acc", "parse_rate")
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
        chance = [
            ms([r[f"{name}_chance"][m] for r in rows], f)
            for m, f in (("bleu", ".1f"), ("cider", ".2f"), ("rouge_l", ".3f"))
        ]
        print(f"| {name}, shuffled refs (chance) | " + " | ".join(chance) + " | | | | |")
    print(
        f"| prior (most frequent in training) | | | | {prior['first_colour_acc']} | | {prior['count_acc']} | |"
    )
    print(f"\nwrote {out / 'unified_audio.json'} and {out / 'unified_audio.png'}")


if __name__ == "__main__":
    main()
