#!/usr/bin/env python
"""Unified model benchmark (issue 6 parts 6 and 8): stability calibration, training speed, captioning,
text->image and likelihood retrieval of a small unified decoder on the synthetic world (CPU, seeded).

Two parts (both by default; --part stability / --part quality for one):

stability  For each seed: an EMA VQ-VAE (K=--stab-codebook, 32x32 images = 64 codes, 300 steps) and three
           decoders (dim 128, depth 2, 2 heads) trained --stab-steps steps of 8 sequences at a constant lr 1e-2
           (AdamW, no weight decay, 5 warm-up steps, clip 1): QK-norm without z-loss, the same without QK-norm
           (control), and QK-norm with z-loss 1e-2. Reports the largest attention logit over training, the
           image-token perplexity of the last 100 steps and its lowest 100-step window after the first, the
           image-token perplexity of 64 held-out text->image sequences, and mean |log Z| on a fixed held-out
           batch. (tests/unified/test_train.py runs the first two for seed 0 and 500 steps.)
quality    One unified model: VQ-VAE (--vq-kind: FSQ 8,6,5 = 240 codes by default, or EMA VQ with
           --codebook-size codes; 32x32 images = 64 codes; --vq-steps steps), BPE, decoder
           (--dim/--depth/--heads) trained --steps steps of --batch sequences at --lr over the mixed tasks
           (caption, text->image, VQA). Measures training tokens/s; on --eval held-out test scenes:
           captioning BLEU / ROUGE-L / CIDEr (greedy, references = all 6 templates of the scene);
           text->image FID, IS and attribute accuracy under the SyntheticJudge (a separately trained classifier;
           "FID under our judge", not Inception-FID), for the generated images, the VQ reconstructions
           (ceiling) and the generated images against shuffled scenes (chance); VQA exact-match accuracy;
           image->text retrieval by likelihood scoring (log p(caption | image) summed over caption tokens, for
           every image x caption pair of --retrieval scenes) R@1 / R@5, and the same retrieval with the
           two-tower model folder --contrastive (default runs/quickstart/model, `make demo`'s model, trained
           first with configs/quickstart.yaml when missing; `--contrastive none` skips it) on the same scenes.

Writes tables to stdout, --out/results.json and plots in --out: unified_samples.png (generated images with their
prompts), unified_captions.png (test images with generated caption and a reference), unified_curves.png
(training ce per modality), unified_stability.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from mmfusion.data.synthetic import TEMPLATES, caption_for, make_split
from mmfusion.eval.generation import (
    attribute_accuracy,
    caption_metrics,
    fid,
    inception_score,
    save_image_grid,
)
from mmfusion.eval.judge import SyntheticJudge
from mmfusion.unified.generate_cli import answer_questions, caption_images, generate_images
from mmfusion.unified.model import UnifiedConfig, UnifiedDecoder, unified_loss
from mmfusion.unified.sequences import collate
from mmfusion.unified.train import (
    UnifiedBundle,
    UnifiedTrainConfig,
    evaluate_vqvae,
    images_to_tensor,
    synthetic_setup,
    train_unified,
    world_task_data,
)


def setup(seed: int, image_size: int, n: int, vq_kw: dict, vq_steps: int, text_vocab: int):
    st = synthetic_setup(seed, image_size, n, vq_kw, vq_steps, text_vocab)
    train = world_task_data(st.world, "train", n, st.vqvae, st.builder)
    return st.world, st.text_tokenizer, st.vqvae, st.vocab, st.builder, train


# ---- stability -------------------------------------------------------------------------------------------


def stability(args) -> list[dict]:
    rows = []
    settings = (("qk-norm", True, 0.0), ("no qk-norm", False, 0.0), ("qk-norm + z-loss 1e-2", True, 1e-2))
    for seed in args.seeds:
        world, _, vq, vocab, builder, train = setup(
            seed, 32, 256, dict(channels=16, codebook_size=args.stab_codebook, code_dim=16), 300, 128
        )
        held = world_task_data(world, "test", 64, vq, builder, uncond_every=0)
        ids, mod, mask = collate([s for t in held.examples.values() for s in t[:16]], vocab.pad)
        img_ids, img_mod, img_mask = collate(held.examples["image"][:64], vocab.pad)
        for name, qk, z in settings:
            torch.manual_seed(seed)
            model = UnifiedDecoder(
                UnifiedConfig(vocab.size, dim=128, depth=2, heads=2, max_len=128, qk_norm=qk)
            )
            cfg = UnifiedTrainConfig(
                steps=args.stab_steps, batch_size=8, lr=1e-2, min_lr_ratio=1.0, warmup_steps=5,
                weight_decay=0.0, z_loss=z, log_every=100, seed=seed, device="cpu",
            )  # fmt: skip
            res = train_unified(model, train.examples, vocab, cfg)
            with torch.no_grad():
                log_z = unified_loss(model(ids, mod).logits, ids, mod, mask, 0.0)["log_z_abs"].item()
                held_ce = unified_loss(model(img_ids, img_mod).logits, img_ids, img_mod, img_mask, 0.0)
            row = {
                "part": "stability",
                "setting": name,
                "seed": seed,
                "steps": args.stab_steps,
                "max_attn_logit": res.max_attn_logit,
                "image_ppl": res.last["image_ppl"],
                "min_image_ppl": min(h["image_ppl"] for h in (res.history[1:] or res.history)),
                "held_image_ppl": float(np.exp(held_ce["ce_image"].item())),
                "ce": res.last["ce"],
                "held_log_z_abs": log_z,
                "curve": [(h["step"], h["max_attn_logit"], h["image_ppl"]) for h in res.history],
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    return rows


# ---- quality ---------------------------------------------------------------------------------------------


@torch.no_grad()
def caption_log_likelihood(bundle: UnifiedBundle, codes: torch.Tensor, captions: list[str], batch: int = 256):
    """(N images, M captions) matrix of log p(caption <eos> | <bos><caption><boi> image <eoi>)."""
    seqs = [bundle.builder.caption(c, t) for c in codes for t in captions]
    scores = []
    for s in range(0, len(seqs), batch):
        ids, mod, mask = collate(seqs[s : s + batch], bundle.vocab.pad)
        logp = bundle.decoder(ids, mod).logits[:, :-1].float().log_softmax(-1)
        tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        scores.append((tok * mask[:, 1:]).sum(1))
    return torch.cat(scores).reshape(len(codes), len(captions))


def recall(scores: torch.Tensor, k: int) -> float:
    """Image i's true caption is caption i: fraction with it in the top k."""
    top = scores.topk(k, dim=1).indices
    return (top == torch.arange(scores.shape[0])[:, None]).any(1).float().mean().item()


def ensure_contrastive(path: str) -> None:
    """Train the quickstart two-tower model into `path` (a run's `model/` folder) unless it exists."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return
    if folder.name != "model":
        raise SystemExit(
            f"--contrastive {path}: no model there, and only a run's 'model' folder can be trained"
        )
    from mmfusion.config import load_config
    from mmfusion.run import train

    root = Path(__file__).resolve().parents[1]
    overrides = [f"name={folder.parent.name}", f"out_dir={folder.parent.parent}"]
    print(f"--contrastive {path}: training it with configs/quickstart.yaml (about 3 min on 2 cores)")
    torch.set_num_threads(os.cpu_count() or 1)  # as `make demo` runs it (torch's default thread count)
    # the run seeds every generator; restore them so the benchmark does not depend on the model pre-existing
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    train(load_config(root / "configs" / "quickstart.yaml", overrides), overwrite=True)  # an unfinished run
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


@torch.no_grad()
def contrastive_scores(path: str, images: np.ndarray, captions: list[str]) -> torch.Tensor:
    from mmfusion import load_model

    model = load_model(path).eval()
    img = torch.nn.functional.normalize(model.encode_image(list(images)), dim=-1)
    txt = torch.nn.functional.normalize(model.encode_text(captions), dim=-1)
    return img @ txt.T


def quality(args, out_stem: Path) -> dict:
    if args.contrastive != "none":
        ensure_contrastive(args.contrastive)
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    vq_kw = dict(channels=32, quantizer=args.vq_kind, codebook_size=args.codebook_size, code_dim=32)
    world, tok, vq, vocab, builder, train = setup(args.seed, 32, args.samples, vq_kw, args.vq_steps, 256)
    test = make_split(world, "test", args.eval, ("image", "text", "vqa"))
    test_px = images_to_tensor([s["image"] for s in test])
    vq_stats = evaluate_vqvae(vq, test_px)
    longest = max(len(s.ids) for t in train.examples.values() for s in t)
    torch.manual_seed(args.seed)
    model = UnifiedDecoder(
        UnifiedConfig(vocab.size, dim=args.dim, depth=args.depth, heads=args.heads, max_len=longest + 48)
    )
    cfg = UnifiedTrainConfig(
        steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.steps // 20, log_every=args.steps // 20,
        seed=args.seed, device="cpu", progress=True,
    )  # fmt: skip
    res = train_unified(model, train.examples, vocab, cfg)
    bundle = UnifiedBundle(model.eval(), vocab, tok, vq)
    if args.save_model:
        bundle.save(args.save_model)

    codes = torch.cat([vq.encode(c) for c in test_px.split(256)])
    t1 = time.perf_counter()
    hyps = caption_images(bundle, codes)
    refs = [
        [caption_for(_scene(s["scene"]), k) for k in range(len(TEMPLATES[len(_scene(s["scene"]).objects)]))]
        for s in test
    ]
    caps = caption_metrics(hyps, refs)
    t_cap = time.perf_counter() - t1

    t1 = time.perf_counter()
    prompts = [s["text"] for s in test]
    gen, _ = generate_images(bundle, prompts, n=1, cfg_scale=args.cfg_scale)
    t_img = time.perf_counter() - t1
    real = np.stack([s["image"] for s in test])
    recon = ((vq.decode(codes).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    scenes = [s["scene"] for s in test]
    shuffled = scenes[1:] + scenes[:1]
    judge = SyntheticJudge.from_pretrained(args.judge) if args.judge else SyntheticJudge.train_on_world(
        world, steps=args.judge_steps, seed=args.seed, image_size=32, device="cpu"
    )  # fmt: skip
    judge_acc = judge.evaluate(world, "test", min(args.eval, 500))
    ref_real = np.stack([s["image"] for s in make_split(world, "val", args.eval, ("image",))])
    t2i = {
        "fid_generated": fid(real, gen.numpy(), judge),
        "fid_reconstructed": fid(real, recon, judge),
        "fid_real_val": fid(real, ref_real, judge),
        "attr_acc_generated": attribute_accuracy(gen.numpy(), scenes, judge),
        "attr_acc_reconstructed": attribute_accuracy(recon, scenes, judge),
        "attr_acc_real": attribute_accuracy(real, scenes, judge),
        "attr_acc_shuffled": attribute_accuracy(gen.numpy(), shuffled, judge),
        "is_generated": inception_score(gen.numpy(), judge, splits=5),
        "is_reconstructed": inception_score(recon, judge, splits=5),
        "is_real": inception_score(real, judge, splits=5),
    }

    qa = [(i, q) for i, s in enumerate(test) for q in s["vqa"]]
    answers = answer_questions(bundle, codes[[i for i, _ in qa]], [q["question"] for _, q in qa])
    vqa_acc = float(np.mean([a.strip() == q["answer"] for a, (_, q) in zip(answers, qa)]))

    n = min(args.retrieval, len(test))
    ll = caption_log_likelihood(bundle, codes[:n], prompts[:n])
    retrieval = {"unified_r1": recall(ll, 1), "unified_r5": recall(ll, 5), "n": n}
    if args.contrastive != "none":
        cs = contrastive_scores(args.contrastive, real[:n], prompts[:n])
        retrieval.update(contrastive_r1=recall(cs, 1), contrastive_r5=recall(cs, 5))

    save_image_grid(gen.numpy()[:16], prompts[:16], f"{out_stem}_samples.png", ncols=8,
                    title=f"text->image (cfg {args.cfg_scale}), unified model, {args.steps} steps")  # fmt: skip
    save_image_grid(real[:16], [f"gen: {h}\nref: {s['text']}" for h, s in zip(hyps[:16], test[:16])],
                    f"{out_stem}_captions.png", ncols=4, wrap=34, title="generated caption / reference")  # fmt: skip
    _plot_curves(res.history, f"{out_stem}_curves.png")
    return {
        "part": "quality",
        "seed": args.seed,
        "steps": args.steps,
        "params": sum(p.numel() for p in model.parameters()),
        "train_tokens_per_s": res.tokens / res.seconds,
        "train_seconds": res.seconds,
        "final": {k: res.last[k] for k in ("ce", "ce_text", "ce_image", "image_ppl", "max_attn_logit")},
        "vq": vq_stats,
        "judge_test_accuracy": judge_acc,
        "caption": caps,
        "caption_seconds": t_cap,
        "text_to_image": t2i,
        "image_seconds": t_img,
        "vqa_accuracy": vqa_acc,
        "vqa_questions": len(qa),
        "retrieval": retrieval,
        "examples": [{"ref": s["text"], "gen": h} for s, h in zip(test[:8], hyps[:8])],
        "total_seconds": time.perf_counter() - t0,
    }


def _scene(d):
    from mmfusion.data.synthetic import Scene

    return Scene.from_dict(d)


def _plot_curves(history: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    steps = [h["step"] for h in history]
    for key in ("ce", "ce_text", "ce_image"):
        ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_stability(rows: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    colours = {"qk-norm": "C0", "no qk-norm": "C3", "qk-norm + z-loss 1e-2": "C2"}
    for r in rows:
        steps = [c[0] for c in r["curve"]]
        label = r["setting"] if r["seed"] == rows[0]["seed"] else None
        a.plot(steps, [c[1] for c in r["curve"]], color=colours[r["setting"]], label=label)
        b.plot(steps, [c[2] for c in r["curve"]], color=colours[r["setting"]])
    for y, text in ((15, "target with QK-norm: <= 15"), (30, "control: >= 30")):
        b.axhline(y, color="grey", ls="--", lw=0.8)
        b.annotate(text, (b.get_xlim()[1], y), ha="right", va="bottom", fontsize=7, color="grey")
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_ylabel("max attention logit")
    b.set_xlabel("step")
    b.set_ylabel("image-token perplexity")
    a.legend(fontsize=7)
    fig.suptitle("constant lr 1e-2, batch 8, K=256; one line per seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "stability", "quality"], default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="stability seeds (default 0 1 2)")
    p.add_argument("--stab-steps", type=int, default=800, help="stability steps per run (default 800)")
    p.add_argument("--stab-codebook", type=int, default=256, help="stability VQ codebook size (default 256)")
    p.add_argument("--seed", type=int, default=0, help="quality seed")
    p.add_argument("--samples", type=int, default=2048, help="training scenes (default 2048)")
    p.add_argument(
        "--vq-kind", choices=["vq", "fsq"], default="fsq", help="image tokenizer (default fsq 8,6,5)"
    )
    p.add_argument("--codebook-size", type=int, default=256, help="codes for --vq-kind vq (default 256)")
    p.add_argument("--vq-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=600, help="decoder steps (default 600)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--eval", type=int, default=200, help="held-out test scenes (default 200)")
    p.add_argument("--retrieval", type=int, default=64, help="scenes in the retrieval pool (default 64)")
    p.add_argument("--judge", help="a SyntheticJudge folder (default: train one, --judge-steps)")
    p.add_argument("--judge-steps", type=int, default=400)
    p.add_argument(
        "--contrastive",
        default="runs/quickstart/model",
        help="two-tower model folder to compare retrieval with; when missing, the quickstart model "
        "(configs/quickstart.yaml, `make demo`'s recipe) is trained into it first; 'none' skips the comparison",
    )
    p.add_argument("--save-model", help="also save the unified model folder here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/unified_benchmark", help="folder for results.json and the plots")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out, stem = out_dir / "results.json", out_dir / "unified"
    result: dict = {"args": vars(args)}
    if args.part in ("all", "stability"):
        rows = stability(args)
        result["stability"] = rows
        _plot_stability(rows, f"{stem}_stability.png")
        print(
            "\n| setting | seed | max attn logit | image ppl (last 100 steps) | lowest 100-step window "
            "after the first | held-out image ppl | held-out mean abs log Z |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['setting']} | {r['seed']} | {r['max_attn_logit']:.1f} | {r['image_ppl']:.1f} | "
                  f"{r['min_image_ppl']:.1f} | {r['held_image_ppl']:.1f} | {r['held_log_z_abs']:.2f} |")  # fmt: skip
    if args.part in ("all", "quality"):
        q = quality(args, stem)
        result["quality"] = q
        c, t, r = q["caption"], q["text_to_image"], q["retrieval"]
        print("\n| metric | value |\n|---|---|")
        lines = {
            "train tokens/s (1 thread)": f"{q['train_tokens_per_s']:.0f}",
            "final ce text / image": f"{q['final']['ce_text']:.3f} / {q['final']['ce_image']:.3f}",
            "VQ held-out usage / PSNR": f"{q['vq']['usage']:.3f} / {q['vq']['psnr']:.2f} dB",
            "caption BLEU / ROUGE-L / CIDEr": f"{c['bleu']:.1f} / {c['rouge_l']:.3f} / {c['cider']:.3f}",
            "FID generated / reconstructed / real val": (
                f"{t['fid_generated']:.2f} / {t['fid_reconstructed']:.2f} / {t['fid_real_val']:.2f}"
            ),
            "attr acc generated / recon / real / shuffled": (
                f"{t['attr_acc_generated']:.3f} / {t['attr_acc_reconstructed']:.3f} / {t['attr_acc_real']:.3f}"
                f" / {t['attr_acc_shuffled']:.3f}"
            ),
            "IS (5 splits, mean) generated / recon / real": (
                f"{t['is_generated'][0]:.2f} / {t['is_reconstructed'][0]:.2f} / {t['is_real'][0]:.2f}"
            ),
            "VQA exact match": f"{q['vqa_accuracy']:.3f} ({q['vqa_questions']} questions)",
            f"retrieval R@1 / R@5 (unified, {r['n']} pool)": f"{r['unified_r1']:.3f} / {r['unified_r5']:.3f}",
        }
        if "contrastive_r1" in r:
            lines["retrieval R@1 / R@5 (two-tower)"] = (
                f"{r['contrastive_r1']:.3f} / {r['contrastive_r5']:.3f}"
            )
        for k, v in lines.items():
            print(f"| {k} | {v} |")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
