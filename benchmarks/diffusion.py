#!/usr/bin/env python
"""Joint image + text diffusion benchmark (issue 18): train the model of configs/diffusion.yaml through the
common Trainer for each seed (and each variant), then judge it exactly on held-out scenes of the same world.

Per seed: the world SyntheticWorld(seed, 32 px, the recipe's object counts); a SyntheticJudge trained on its
train split (--judge-steps); for each variant (--variants: base = the recipe; consistency = the recipe with
--align-weight and --adv-weight, the T10 constraint; ar = the unified autoregressive model, see below) a model
trained --steps steps on --n-train scenes and evaluated on --n-eval test scenes (mmfusion.diffusion.evaluate: t2i attribute accuracy at guidance 1 and
--guidance, FID / IS under the judge, i2t caption accuracy through the scene parser, joint-pair
consistency), DDIM --ddim-steps, eta 0, EMA weights. Prints a table per run and the mean ± std over seeds;
writes --out/results.json, and with --grid a PNG of text->image samples and joint pairs of the first run.

The `ar` variant is the comparison issue 18 asks for: the unified AR decoder (mmfusion.unified; FSQ 8,6,5
VQ-VAE of 64 codes per image trained --ar-vq-steps steps, BPE of 256 ids, decoder --ar-dim / depth 4 / 4 heads)
trained on the same world and the same --n-train scenes, on the caption and text->image tasks only, for
--ar-steps steps of --ar-batch sequences (default: the diffusion run's steps x batch, so both see as many
training examples), judged by the same judge and scene parser: t2i at cfg 1 and --guidance (sampled,
temperature 1), i2t greedy. It has no joint sampling (joint_consistency is NaN); `ar_recon_acc` is the judge
on its tokenizer's reconstructions (the ceiling its t2i is measured against).

--speed also measures sampling images/s (text->image with guidance, so 2 denoiser passes per step) at 25 and
50 DDIM steps, batch 64, on --threads threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mmfusion.config import load_config
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig, caption_for
from mmfusion.diffusion.evaluate import evaluate_diffusion
from mmfusion.diffusion.latents import images_to_unit
from mmfusion.diffusion.recipe import fit_diffusion, load_diffusion, text_codec, world_data
from mmfusion.diffusion.sampling import sample
from mmfusion.eval.judge import SyntheticJudge

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("t2i_acc@1", "t2i_acc@G", "fid@1", "fid@G", "is@G", "i2t_acc@1", "joint_consistency", "real_acc")


def judge_for(world: SyntheticWorld, seed: int, steps: int, out: Path, given: str | None) -> SyntheticJudge:
    """The judge folder --judge (waiting up to an hour for another process to write it), or one trained here."""
    if given:
        folder = Path(given)
        for _ in range(3600):
            if (folder / "judge.json").is_file() and (folder / "judge.safetensors").is_file():
                time.sleep(2)  # let the writer finish
                return SyntheticJudge.from_pretrained(folder)
            time.sleep(1)
        raise SystemExit(f"--judge {given}: no judge appeared there")
    folder = out / f"judge_seed{seed}_{steps}"
    if (folder / "judge.json").is_file():
        return SyntheticJudge.from_pretrained(folder)
    judge = SyntheticJudge.train_on_world(world, steps=steps, seed=seed, device="cpu")
    judge.save_pretrained(folder)
    return judge


def speed(model, threads: int, batch: int = 64) -> dict[str, float]:
    torch.set_num_threads(threads)
    codec = text_codec(model.cfg)
    world = SyntheticWorld(WorldConfig(seed=0, image_size=model.cfg.image_size, object_count_probs=(1, 0, 0)))
    _, scenes = world_data(world, batch, "test")
    text = codec.encode([caption_for(s, 0) for s in scenes])
    out = {}
    for steps in (25, 50):
        sample(model, "image", text=text[:4], steps=2, guidance=3.0)  # warm-up
        t = time.perf_counter()
        sample(model, "image", text=text, steps=steps, guidance=3.0)
        out[f"images_per_s@{steps}"] = batch / (time.perf_counter() - t)
    return out


def grid(model, world: SyntheticWorld, path: Path, guidance: float, ddim: int) -> None:
    from mmfusion.eval.generation import save_image_grid

    codec = text_codec(model.cfg)
    _, scenes = world_data(world, 8, "test")
    prompts = [caption_for(s, 0) for s in scenes]
    t2i = sample(model, "image", text=codec.encode(prompts), steps=ddim, guidance=guidance, seed=0)
    joint = sample(model, "joint", n=8, steps=ddim, seed=1)
    images = torch.cat([images_to_unit(t2i.image), images_to_unit(joint.image)])
    caps = [f"t2i: {p}" for p in prompts] + [f"joint: {c}" for c in codec.decode(joint.text)]
    save_image_grid(
        images.numpy(), caps, path, ncols=8, title=f"text->image (guidance {guidance:g}) / joint pairs"
    )


def estimate_colours(images: torch.Tensor) -> list[str]:
    """(N, 3, S, S) in [-1, 1] -> the world colour whose direction from the background best matches the
    image's foreground (pixels weighted by their distance from the background): what colour a blurry
    x0 estimate leans to."""
    from mmfusion.data.synthetic.scene import BACKGROUND, COLOURS, RGB

    bg = torch.tensor(BACKGROUND, dtype=torch.float) / 127.5 - 1
    rgb = torch.tensor([RGB[c] for c in COLOURS], dtype=torch.float) / 127.5 - 1
    d = (images - bg[None, :, None, None]).norm(dim=1, keepdim=True)
    w = d / d.sum(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    lean = torch.nn.functional.normalize((images * w).sum(dim=(2, 3)) - bg, dim=1)
    return [COLOURS[i] for i in (lean @ torch.nn.functional.normalize(rgb - bg, dim=1).T).argmax(1).tolist()]


def denoise_check(
    run: str, judge_dir: str, guidance: float, ddim: int, grid_path: str | None = None, n: int = 200
) -> None:
    """Does the prompt reach the image? One-step denoising of real test images of world seed 0: per t, the
    judge's accuracy on the x0 estimate from x_t, and how often the estimate leans to the prompt's colour
    (`estimate_colours`) with the prompt and with the null condition (text at T - 1, the guidance branch);
    then per-attribute judge accuracy of text -> image samples at guidance 1 and `guidance`; with `grid_path`,
    a PNG of the first 8 test images (top) and their samples at `guidance` and 1."""
    from mmfusion.eval.generation import attribute_accuracy

    model, judge = load_diffusion(run), SyntheticJudge.from_pretrained(judge_dir)
    cfg, net, sched = model.cfg, model.ema_net, model.schedule
    world = SyntheticWorld(WorldConfig(seed=0, image_size=cfg.image_size, object_count_probs=(1, 0, 0)))
    images, scenes = world_data(world, n, "test")
    text = text_codec(cfg).encode([caption_for(s, 0) for s in scenes])
    target = [s.objects[0] for s in scenes]
    gen = torch.Generator().manual_seed(0)
    print("| t | eps MSE | judge acc of the one-step x0 estimate | estimate leans to the prompt's colour: "
          "prompt / null |\n|---|---|---|---|")  # fmt: skip
    T = cfg.timesteps
    for t in (100, 300, 500, 700, 900, T - 1):
        x0 = model.image_to_latent(images)
        eps, tt = torch.randn(x0.shape, generator=gen), torch.full((n,), t)
        xt = sched.q_sample(x0, tt, eps)
        null = torch.randn(text.shape, generator=gen)
        with torch.no_grad():
            e = net(xt, text, tt, torch.full((n,), -1)).eps_image
            e_null = net(xt, null, tt, torch.full((n,), T - 1)).eps_image
        est, est_null = (model.latent_to_image(sched.predict_x0(xt, tt, x)).clamp(-1, 1) for x in (e, e_null))
        acc = attribute_accuracy(images_to_unit(est).numpy(), scenes, judge)
        lean = [sum(c == o.colour for c, o in zip(estimate_colours(x), target)) / n for x in (est, est_null)]
        print(f"| {t} | {((e - eps) ** 2).mean().item():.4f} | {acc:.3f} | {lean[0]:.2f} / {lean[1]:.2f} |")
    print("\n| guidance | shape | colour | size | shape and colour |\n|---|---|---|---|---|")
    rows = [images_to_unit(images[:8])]
    for g in (guidance, 1.0):
        out = sample(model, "image", text=text, steps=ddim, guidance=g, seed=0).image
        rows.append(images_to_unit(out[:8]))
        pred = judge.predict_attributes(images_to_unit(out).numpy())
        acc = {
            a: sum(p[a] == getattr(o, a) for p, o in zip(pred, target)) / n
            for a in ("shape", "colour", "size")
        }
        both = sum(p["shape"] == o.shape and p["colour"] == o.colour for p, o in zip(pred, target)) / n
        print(f"| {g:g} | {acc['shape']:.3f} | {acc['colour']:.3f} | {acc['size']:.3f} | {both:.3f} |")
    if grid_path:
        from mmfusion.eval.generation import save_image_grid

        caps = [caption_for(s, 0) for s in scenes[:8]] * 3
        title = f"real / text->image at guidance {guidance:g} / at guidance 1"
        save_image_grid(torch.cat(rows).numpy(), caps, grid_path, ncols=8, title=title)


def ar_row(world: SyntheticWorld, seed: int, n_train: int, steps: int, args, judge) -> dict[str, float]:
    """Train and judge the unified AR model of the `ar` variant (module docstring) on `world`."""
    from mmfusion.diffusion.evaluate import caption_matches
    from mmfusion.eval.generation import attribute_accuracy, fid, inception_score
    from mmfusion.unified.bundle import UnifiedBundle
    from mmfusion.unified.generate_cli import caption_images, generate_images
    from mmfusion.unified.model import UnifiedConfig, UnifiedDecoder
    from mmfusion.unified.train import UnifiedTrainConfig, synthetic_setup, train_unified, world_task_data

    vq_kw = dict(channels=32, quantizer="fsq", codebook_size=256, code_dim=32)
    st = synthetic_setup(seed, world.config.image_size, n_train, vq_kw, args.ar_vq_steps, 256,
                         object_count_probs=world.config.object_count_probs)  # fmt: skip
    data = world_task_data(st.world, "train", n_train, st.vqvae, st.builder, tasks=["caption", "image"])
    longest = max(len(s.ids) for t in data.examples.values() for s in t)
    torch.manual_seed(seed)
    model = UnifiedDecoder(
        UnifiedConfig(st.vocab.size, dim=args.ar_dim, depth=4, heads=4, max_len=longest + 48)
    )
    t = time.perf_counter()
    train_unified(model, data.examples, st.vocab, UnifiedTrainConfig(
        steps=steps, batch_size=args.ar_batch, lr=3e-3, warmup_steps=steps // 20, log_every=max(1, steps // 20),
        seed=seed, device="cpu"))  # fmt: skip
    row: dict[str, float] = {
        "train_s": time.perf_counter() - t,
        "params": sum(p.numel() for p in model.parameters()),
    }
    bundle = UnifiedBundle(model.eval(), st.vocab, st.text_tokenizer, st.vqvae)
    images, scenes = world_data(world, args.n_eval, "test")
    real = images_to_unit(images).numpy()
    codes = torch.cat([st.vqvae.eval().encode(c) for c in images.split(256)])
    recon = images_to_unit(st.vqvae.decode(codes)).numpy()
    row.update(
        real_acc=attribute_accuracy(real, scenes, judge),
        ar_recon_acc=attribute_accuracy(recon, scenes, judge),
    )
    prompts = [caption_for(s, 0) for s in scenes]
    for name, g in (("1", 1.0), ("G", args.guidance)):
        gen = generate_images(bundle, prompts, n=1, cfg_scale=g)[0].numpy()
        row[f"t2i_acc@{name}"] = attribute_accuracy(gen, scenes, judge)
        row[f"fid@{name}"] = fid(real, gen, judge)
        if name == "G":
            row["is@G"] = inception_score(gen, judge, splits=5, seed=seed)[0]
    caps = caption_images(bundle, codes)
    row["i2t_acc@1"] = sum(caption_matches(c, s) for c, s in zip(caps, scenes)) / len(scenes)
    row["joint_consistency"] = float("nan")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "diffusion.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", default="base", help="comma list of base, consistency")
    ap.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    ap.add_argument("--n-train", type=int, help="training scenes (default: the recipe's)")
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--ddim-steps", type=int, default=25)
    ap.add_argument("--judge-steps", type=int, default=600)
    ap.add_argument(
        "--judge",
        help="a judge folder to use for every run (`python -m mmfusion.eval.judge_cli --out DIR`; the "
        "renderer is the same for every world seed, so one judge serves all), waited for when absent",
    )
    ap.add_argument("--align-weight", type=float, default=0.1)
    ap.add_argument("--adv-weight", type=float, default=0.05)
    ap.add_argument(
        "--ar-steps", type=int, help="ar variant: decoder steps (default: steps x batch / --ar-batch)"
    )
    ap.add_argument("--ar-batch", type=int, default=16, help="ar variant: sequences per step (default 16)")
    ap.add_argument("--ar-dim", type=int, default=128, help="ar variant: decoder width (default 128, 0.85 M)")
    ap.add_argument(
        "--ar-vq-steps", type=int, default=600, help="ar variant: FSQ tokenizer steps (default 600)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides key=value")
    ap.add_argument("--out", default="runs/bench/diffusion")
    ap.add_argument(
        "--grid", help="write a sample grid PNG of the first run (with --denoise-check: of RUN) here"
    )
    ap.add_argument("--speed", action="store_true", help="measure sampling images/s at 25 and 50 DDIM steps")
    ap.add_argument(
        "--collect",
        nargs="+",
        help="only print the table of these results.json files (runs split over processes)",
    )
    ap.add_argument(
        "--denoise-check",
        metavar="RUN",
        help="only print the one-step denoising and prompt-following tables of RUN (needs --judge)",
    )
    args = ap.parse_args()
    if args.denoise_check:
        return denoise_check(args.denoise_check, args.judge, args.guidance, args.ddim_steps, args.grid)
    if args.collect:
        rows = [r for f in args.collect for r in json.loads(Path(f).read_text())]
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        return table(rows, variants, args.guidance, args.ddim_steps, args.n_eval, args.threads)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, g = [], args.guidance
    for seed in args.seeds:
        for variant in args.variants.split(","):
            sets = [f"seed={seed}", f"data.synthetic.seed={seed}", f"train.threads={args.threads}", *args.set]
            sets += ["train.progress=false", f"name=diffusion_{variant}_seed{seed}", f"out_dir={out}"]
            if args.steps:
                sets.append(f"train.steps={args.steps}")
            if args.n_train:
                sets.append(f"data.synthetic.n_train={args.n_train}")
            if variant == "consistency":
                sets += [f"model.align_weight={args.align_weight}", f"model.adv_weight={args.adv_weight}"]
            elif variant not in ("base", "ar"):
                raise SystemExit(f"unknown variant {variant!r}: expected base, consistency or ar")
            cfg = load_config(args.config, sets)
            s = cfg.data.synthetic
            world = SyntheticWorld(WorldConfig(seed=s.seed, image_size=cfg.model.image_size,
                                               object_count_probs=s.object_count_probs))  # fmt: skip
            run = out / cfg.name
            if variant == "ar":
                judge = judge_for(world, seed, args.judge_steps, out, args.judge)
                ar_steps = args.ar_steps or cfg.train.steps * cfg.train.batch_size // args.ar_batch
                row = {"seed": seed, "variant": variant, "ar_steps": ar_steps}
                row.update(ar_row(world, seed, s.size("train"), ar_steps, args, judge))
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            t = time.perf_counter()
            if (run / "model" / "config.json").is_file():
                model = load_diffusion(run)
            else:
                model, _ = fit_diffusion(
                    cfg.model, cfg.train, world, s.size("train"), run, seed=seed, log=lambda m: None
                )
            train_s = time.perf_counter() - t
            judge = judge_for(world, seed, args.judge_steps, out, args.judge)
            t = time.perf_counter()
            res = evaluate_diffusion(
                model, world, judge, n=args.n_eval, steps=args.ddim_steps, guidance=(1.0, g), seed=seed
            )
            res = {k.replace(f"@{g:g}", "@G"): v for k, v in res.items()}
            row = {
                "seed": seed,
                "variant": variant,
                "train_s": train_s,
                "eval_s": time.perf_counter() - t,
                **res,
            }
            if args.speed and not rows:
                row.update(speed(model, args.threads))
                torch.set_num_threads(args.threads)
            if args.grid and not rows:
                grid(model, world, Path(args.grid), g, args.ddim_steps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    table(rows, args.variants.split(","), g, args.ddim_steps, args.n_eval, args.threads)


def table(rows: list[dict], variants: list[str], g: float, ddim: int, n_eval: int, threads: int) -> None:
    print(f"\nguidance G = {g:g}, DDIM {ddim} steps, {n_eval} test scenes per run")
    print("| variant | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        cells = []
        for c in COLUMNS:
            vals = [r[c] for r in mine]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        print(f"| {variant} ({len(mine)} seeds) | " + " | ".join(cells) + " |")
    for r in rows:
        if "images_per_s@25" in r:
            print(f"sampling (text->image, guidance on, batch 64, {threads} thread(s)): "
                  f"{r['images_per_s@25']:.1f} images/s at 25 DDIM steps, {r['images_per_s@50']:.1f} at 50")  # fmt: skip


if __name__ == "__main__":
    main()
