#!/usr/bin/env python
"""VQ tokenizer calibration (issue 6 part 1, A8): VQ-VAEs on 32x32 SyntheticWorld images, or (--modality
audio) on SyntheticWorld audio spectrograms (CPU, seeded).

Data: --train-pool "train" images and --eval-images held-out "test" images of SyntheticWorld(seed=--seed),
preprocessed to [-1, 1]. Every setting of one seed starts from the same initial weights (torch.manual_seed
before building) and sees the same batch sequence. Adam (--lr), loss = MSE + commitment, --steps steps of
--batch images; threads = --threads.

Settings:
  vq        VectorQuantizer K=--codebook-size, EMA (decay 0.99) + k-means init + dead-code replacement
            (EMA count < --dead-threshold, default 3.0). Also the RVQ depth-1 row (identical model).
  control   the same without dead-code replacement (negative control).
  rvq2/rvq4 ResidualVQ with 2 / 4 levels of K codes each (same settings as vq).
  fsq       FSQ levels --fsq-levels (implicit codebook prod(levels)).

--backend mmfusion (default: mmfusion.models.quantizers) or vqtorch (the vector-quantize-pytorch
library's VectorQuantize / FSQ, same settings: VQVAE(backend="vqtorch")). Recipe options: --dead-sampling
error (mmfusion: dead codes re-seeded from batch vectors drawn with probability ~ their squared quantization
error; the recipe that meets the targets on seeds 0-2), --dead-patience, --rotation-trick (vqtorch),
--fsq-noise-dropout (vqtorch); RVQ only (both backends; `vq` stays their depth-1 model): --quantize-dropout
(--quantize-dropout-cutoff), --commitment-per-level sum|mean|final (none met rvq4 - vq >= 1 dB on seeds 0-2).

Measured at the end on the held-out images, eval mode: codebook usage (fraction of codes hit at least
once; RVQ: mean over levels), normalised perplexity (perplexity / K), PSNR (dB, [0, 1] pixel scale), tokens
per image. With --level-psnr, rvq settings also report the held-out PSNR when only the first 1..L levels are
decoded and when the encoder's output is decoded without quantization (the decoder's ceiling).

--modality audio: 0.5 s clips (16 kHz) -> AudioFrontEnd (project log-mel, 64 mels, fixed map to [-1, 1],
padded to 52 frames) -> VQVAE(in_channels=1, input_shape=(64, 52)), 16 x 13 = 208 tokens per clip.
Defaults then: settings vq, fsq, rvq2; --channels 16, K = 128, code dim 16, 400 steps, pools of 1024 / 512
clips. PSNR is measured on the normalised [-1, 1] spectrograms. Content check: the first tone's colour (8
pitches, chance 0.125) of each held-out clip predicted by 1-nearest-neighbour against the training pool
(a) on the codes of the first 4 token columns (Hamming distance; frames 0-15 lie inside the first tone for
1-3 objects), (b) on the reconstruction's first 16 frames vs the training originals (Euclidean), with (c)
the originals themselves as the ceiling. The PSNR of the mean training spectrogram is printed as a floor.
--plot writes original vs reconstructed spectrograms.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from mmfusion.data.synthetic import COLOURS, Scene, SyntheticWorld, WorldConfig
from mmfusion.modalities.audio import AudioFrontEnd
from mmfusion.models.vq import VQVAE, psnr

SETTINGS = ("vq", "control", "rvq2", "rvq4", "fsq")
AUDIO_DEFAULTS = {"settings": ["vq", "fsq", "rvq2"], "channels": 16, "codebook_size": 128, "code_dim": 16}
AUDIO_DEFAULTS.update(steps=400, train_pool=1024)
FIRST_TONE_FRAMES = 16  # 0.15 s: inside the first tone's slot (>= 1/6 s with 3 objects)
TARGETS = "usage >= 0.90, norm. perplexity >= 0.35, PSNR >= 17.5 dB; control usage <= 0.30; rvq4 - vq >= 1 dB; fsq usage >= 0.75"


def images(world: SyntheticWorld, split: str, n: int) -> torch.Tensor:
    arr = np.stack([world.sample(split, i, ("image",))["image"] for i in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def audio_clips(world: SyntheticWorld, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(spectrograms (n, 1, 64, 52) in [-1, 1], colour index of each clip's first (leftmost) tone (n,))."""
    samples = [world.sample(split, i, ("audio",)) for i in range(n)]
    colour = [COLOURS.index(Scene.from_dict(s["scene"]).left_to_right()[0].colour) for s in samples]
    return AudioFrontEnd()([s["audio"] for s in samples], 16000), torch.tensor(colour)


def nn_accuracy(query: torch.Tensor, ref: torch.Tensor, ref_y: torch.Tensor, y: torch.Tensor, hamming: bool):
    """1-nearest-neighbour accuracy of `query` rows against labelled `ref` rows."""
    q, r = query.flatten(1), ref.flatten(1)
    d = (q[:, None] != r[None]).sum(-1) if hamming else torch.cdist(q.float(), r.float())
    return (ref_y[d.argmin(1)] == y).float().mean().item()


def build(setting: str, args: argparse.Namespace) -> VQVAE:
    kw = dict(
        image_size=32,
        channels=args.channels,
        codebook_size=args.codebook_size,
        code_dim=args.code_dim,
        dead_code_threshold=args.dead_threshold,
        commitment=args.commitment,
        backend=args.backend,
    )
    if args.backend == "vqtorch":
        kw.update(rotation_trick=args.rotation_trick, fsq_noise_dropout=args.fsq_noise_dropout)
    else:
        kw.update(dead_code_patience=args.dead_patience, dead_code_sampling=args.dead_sampling)
    if args.modality == "audio":
        kw.update(in_channels=1, input_shape=AudioFrontEnd().shape)
    if setting == "control":
        kw["dead_code_threshold"] = 0.0
    if setting.startswith("rvq"):
        kw.update(
            quantizer="rvq", rvq_levels=int(setting[3:]), commitment_per_level=args.commitment_per_level
        )
        kw.update(
            quantize_dropout=args.quantize_dropout, quantize_dropout_cutoff=args.quantize_dropout_cutoff
        )
    elif setting == "fsq":
        kw.update(quantizer="fsq", fsq_levels=args.fsq_levels)
    return VQVAE(**kw)


@torch.no_grad()
def level_psnr(model: VQVAE, held: torch.Tensor) -> dict:
    """--level-psnr (rvq): held-out PSNR decoding the first n levels' codes, n = 1..L, and decoding the
    encoder's output without any quantization (what the decoder could do with perfect codes)."""
    chunks = held.split(128)
    levels = [
        psnr(torch.cat([model(c, num_levels=n).recon for c in chunks]), held)
        for n in range(1, model.config["rvq_levels"] + 1)
    ]
    plain = torch.cat([model._decode_codes(model.encoder(c).permute(0, 2, 3, 1)) for c in chunks])
    return {"psnr_levels": levels, "psnr_unquantized": psnr(plain, held)}


def run(setting: str, seed: int, train: torch.Tensor, held: torch.Tensor, args, labels=None) -> dict:
    torch.manual_seed(seed)
    model = build(setting, args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = None
    if args.lr_schedule == "cosine":  # cosine decay to 0.1 x lr over --steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
        )
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    first_psnr = None
    for step in range(args.steps):
        batch = train[torch.randint(0, train.shape[0], (args.batch,), generator=gen)]
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if step == 0:
            first_psnr = psnr(out.recon.detach(), batch)
    model.eval()
    with torch.no_grad():
        recons, idx = [], []
        for chunk in held.split(128):
            o = model(chunk)
            recons.append(o.recon)
            idx.append(o.indices)
        recon, indices = torch.cat(recons), torch.cat(idx)
    stats = model.quantizer.usage_stats(indices)
    extra = level_psnr(model, held) if args.level_psnr and model.quantizer_type == "rvq" else {}
    if labels is not None:  # audio content check (labels = (train colours, held-out colours))
        with torch.no_grad():
            train_idx = torch.cat([model.encode(c) for c in train.split(128)])
        cols, f = FIRST_TONE_FRAMES // 4, FIRST_TONE_FRAMES
        extra = {
            "tokens_per_image": int(np.prod(model.code_shape)),  # indices per clip (rvq: positions x levels)
            "psnr_mean_baseline": psnr(train.mean(0, keepdim=True).expand_as(held), held),
            "first_colour_acc_codes": nn_accuracy(
                indices[:, :, :cols], train_idx[:, :, :cols], labels[0], labels[1], True
            ),
            "first_colour_acc_recon": nn_accuracy(
                recon[..., :f], train[..., :f], labels[0], labels[1], False
            ),
            "first_colour_acc_original": nn_accuracy(
                held[..., :f], train[..., :f], labels[0], labels[1], False
            ),
        }
        extra["_recon"] = recon[:4]
    return {
        "setting": setting,
        "backend": args.backend,
        "seed": seed,
        "K": model.codebook_size,
        "usage": stats["usage"],
        "norm_perplexity": stats["normalized_perplexity"],
        "psnr": psnr(recon, held),
        "psnr_step0": first_psnr,
        "tokens_per_image": model.tokens_per_image,
        "seconds": time.perf_counter() - t0,
        **extra,
    }


def target_checks(rows: list[dict]) -> list[tuple[str, int, float, bool]]:
    """(target, seed, value, met) for every image target whose settings were run (issue 6 part 8)."""
    by = {(r["setting"], r["seed"]): r for r in rows}
    out = []
    for seed in dict.fromkeys(r["seed"] for r in rows):

        def get(setting: str, seed: int = seed) -> dict | None:
            return by.get((setting, seed))

        if vq := get("vq"):
            out.append(("vq usage >= 0.90", seed, vq["usage"], vq["usage"] >= 0.90))
            out.append(
                ("vq norm. perplexity >= 0.35", seed, vq["norm_perplexity"], vq["norm_perplexity"] >= 0.35)
            )
            out.append(("vq PSNR >= 17.5 dB", seed, vq["psnr"], vq["psnr"] >= 17.5))
        if c := get("control"):
            out.append(("control usage <= 0.30", seed, c["usage"], c["usage"] <= 0.30))
        depth = [r["psnr"] for r in (get("vq"), get("rvq2"), get("rvq4")) if r is not None]
        if get("vq") and get("rvq4"):
            gain = get("rvq4")["psnr"] - get("vq")["psnr"]
            out.append(("rvq4 - rvq1 PSNR >= 1 dB", seed, gain, gain >= 1.0))
            mono = all(a <= b for a, b in zip(depth, depth[1:]))
            out.append(("RVQ PSNR non-decreasing 1 -> 2 -> 4", seed, float(mono), mono))
        if f := get("fsq"):
            out.append(("fsq usage >= 0.75", seed, f["usage"], f["usage"] >= 0.75))
    return out


def plot(rows: list[dict], held: torch.Tensor, path: str) -> None:
    """Original vs reconstructed spectrograms of the first held-out clips, one row per setting of seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["seed"] == rows[0]["seed"]]
    n = held.shape[0] if held.shape[0] < 4 else 4
    fig, axes = plt.subplots(1 + len(shown), n, figsize=(2.2 * n, 2.0 * (1 + len(shown))), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(held[j, 0], origin="lower", aspect="auto", vmin=-1, vmax=1, cmap="magma")
        axes[0, j].set_title(f"original {j}", fontsize=8)
        for i, r in enumerate(shown, 1):
            axes[i, j].imshow(r["_recon"][j, 0], origin="lower", aspect="auto", vmin=-1, vmax=1, cmap="magma")
            axes[i, j].set_title(f"{r['setting']} (held-out {r['psnr']:.1f} dB)", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("mel bin")
    fig.suptitle(f"log-mel [-1, 1]: original vs VQ-VAE reconstruction (seed {rows[0]['seed']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", choices=["image", "audio"], default="image")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--settings", nargs="+", choices=SETTINGS, help="default: all (image), vq fsq rvq2 (audio)"
    )
    p.add_argument("--steps", type=int, help="default 500 (image), 400 (audio)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--lr-schedule", choices=["constant", "cosine"], default="constant", help="cosine: decay to 0.1 x lr"
    )
    p.add_argument("--codebook-size", type=int, help="default 256 (image), 128 (audio)")
    p.add_argument("--code-dim", type=int, help="default 32 (image), 16 (audio)")
    p.add_argument("--channels", type=int, help="default 32 (image), 16 (audio)")
    p.add_argument("--dead-threshold", type=float, default=3.0)
    p.add_argument("--commitment", type=float, default=0.25, help="commitment weight (default 0.25)")
    p.add_argument("--fsq-levels", type=int, nargs="+", default=[8, 6, 5])
    p.add_argument(
        "--backend", choices=["mmfusion", "vqtorch"], default="mmfusion",
        help="quantizers: ours, or the vector-quantize-pytorch library's (default mmfusion)",
    )  # fmt: skip
    p.add_argument(
        "--dead-sampling", choices=["uniform", "error"], default="uniform",
        help="mmfusion: dead codes re-seeded from uniformly drawn or error-weighted batch vectors",
    )  # fmt: skip
    p.add_argument("--dead-patience", type=int, help="mmfusion: also reset codes unused this many steps")
    p.add_argument("--rotation-trick", action="store_true", help="vqtorch: rotation-trick gradients")
    p.add_argument("--fsq-noise-dropout", type=float, default=0.0, help="vqtorch: FSQ noise dropout")
    p.add_argument(
        "--quantize-dropout", action="store_true",
        help="rvq: train on the first n ~ U{cutoff..levels} levels per batch (vq = depth 1 is unaffected)",
    )  # fmt: skip
    p.add_argument(
        "--quantize-dropout-cutoff", type=int, default=1, help="rvq: fewest levels kept (default 1)"
    )
    p.add_argument(
        "--commitment-per-level", choices=["sum", "mean", "final"], default="sum",
        help="rvq: sum / average the levels' commitment losses, or one on the summed codes (depth 1: identical)",
    )  # fmt: skip
    p.add_argument(
        "--level-psnr", action="store_true",
        help="rvq: also report held-out PSNR with the first 1..L levels and without quantization",
    )  # fmt: skip
    p.add_argument("--train-pool", type=int, help="default 2048 (image), 1024 (audio)")
    p.add_argument("--eval-images", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--plot", help="audio: PNG of original vs reconstructed spectrograms")
    args = p.parse_args(argv)
    image_defaults = {"settings": list(SETTINGS), "channels": 32, "codebook_size": 256, "code_dim": 32}
    image_defaults.update(steps=500, train_pool=2048)
    for k, v in (AUDIO_DEFAULTS if args.modality == "audio" else image_defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        world = SyntheticWorld(WorldConfig(seed=seed))
        labels = None
        if args.modality == "audio":
            train, train_y = audio_clips(world, "train", args.train_pool)
            held, held_y = audio_clips(world, "test", args.eval_images)
            labels = (train_y, held_y)
        else:
            train, held = images(world, "train", args.train_pool), images(world, "test", args.eval_images)
        for setting in args.settings:
            row = run(setting, seed, train, held, args, labels)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)
        if args.plot and seed == args.seeds[0] and args.modality == "audio":
            plot(rows, held, args.plot)
    if args.modality == "audio":
        print(
            f"\nPSNR of the mean training spectrogram: {rows[0]['psnr_mean_baseline']:.2f} dB (seed {rows[0]['seed']})"
        )
        print("first-tone colour by 1-NN: chance 0.125")
        print("| setting | seed | K | usage | norm. perplexity | PSNR (dB) | PSNR step 0 | tokens/clip "
              "| colour acc. codes | recon | original | s |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['setting']} | {r['seed']} | {r['K']} | {r['usage']:.3f} | {r['norm_perplexity']:.3f} | "
                f"{r['psnr']:.2f} | {r['psnr_step0']:.2f} | {r['tokens_per_image']} | "
                f"{r['first_colour_acc_codes']:.3f} | {r['first_colour_acc_recon']:.3f} | "
                f"{r['first_colour_acc_original']:.3f} | {r['seconds']:.0f} |"
            )
    else:
        print(f"\ntargets: {TARGETS}")
        print("| setting | seed | K | usage | norm. perplexity | PSNR (dB) | PSNR step 0 | tokens/img | s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['setting']} | {r['seed']} | {r['K']} | {r['usage']:.3f} | {r['norm_perplexity']:.3f} | "
                f"{r['psnr']:.2f} | {r['psnr_step0']:.2f} | {r['tokens_per_image']} | {r['seconds']:.0f} |"
            )
        for r in rows:
            if "psnr_levels" in r:
                levels = " / ".join(f"{v:.2f}" for v in r["psnr_levels"])
                print(
                    f"{r['setting']} seed {r['seed']}: PSNR with 1..{len(r['psnr_levels'])} levels {levels} dB; "
                    f"unquantized encoder output {r['psnr_unquantized']:.2f} dB"
                )
        checks = target_checks(rows)
        if checks:
            print("\n| target | seed | value | met |\n|---|---|---|---|")
            for name, seed, value, met in checks:
                print(f"| {name} | {seed} | {value:.3f} | {'yes' if met else 'NO'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
