#!/usr/bin/env python
"""SCD adversarial-input detection on attacks the project generates (issue 17 part 2, requirement Z2).

Per seed: a small two-tower model trained on the synthetic world (the quickstart recipe, narrower, --steps);
a gallery of --n test scenes (image + caption). The model's output for a query is its top-1 candidate of the
other modality (image -> caption, caption -> image); correct when its scene key is the query's.

- Detectors (mmfusion.safety.scd): distance = 1 - cos(query, top-1 candidate); mutation = fraction of
  --mutations random mutations whose top-1 changes. Thresholds calibrated on --n clean validation queries
  (against the validation gallery) at --fpr.
- Attacks (mmfusion.safety.attacks), on the clean-correct test queries: PGD L-inf (--eps in 1/255 units,
  --pgd-steps) on images, rounded to 8-bit pixels; greedy character edits (--k) and greedy synonym
  substitutions (--k words) on captions. An attack succeeds when the top-1 candidate's scene key changes.
- Reported per attack and detector: attack success rate, TPR on the successful adversarial inputs, FPR on all
  clean test queries, AUROC (clean test vs successful adversarial).

    .venv/bin/python benchmarks/scd.py --seeds 0 1 2 --out runs/bench/scd
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmfusion.batch import Batch
from mmfusion.config import config_from_dict
from mmfusion.data.synthetic import COLOURS, Scene, SyntheticWorld, WorldConfig
from mmfusion.data.tasks import paired_samples
from mmfusion.eval.concepts import calibrate_filters, concept_prompts, filter_report, negative_prompts, shows
from mmfusion.modalities.image import preprocess_images
from mmfusion.models.contrastive import ContrastiveModel
from mmfusion.models.multimodal import MultiModalModel
from mmfusion.run import train
from mmfusion.safety import watermark
from mmfusion.safety.attacks import char_attack, pgd_images, retrieval_loss, synonym_attack
from mmfusion.safety.filters import concept_vector, level_for
from mmfusion.safety.scd import (
    calibrate_threshold,
    combined_scores,
    detection_metrics,
    distance_scores,
    image_mutation_scores,
    mutate_images,
    text_mutation_scores,
    top1,
)


def recipe(seed: int, out: Path, steps: int) -> dict:
    tower = {"width": 64, "depth": 2, "heads": 4}
    return {
        "name": f"s{seed}",
        "out_dir": str(out),
        "seed": seed,
        "data": {
            "source": "synthetic",
            "synthetic": {"seed": seed, "n_train": 20000, "n_val": 100, "n_test": 100},
        },
        "model": {
            "embed_dim": 64,
            "text": {"vocab_size": 1000, "context_length": 32, **tower},
            "image": {"stem": "conv", "image_size": 32, "patch_size": 8, **tower},
        },
        "train": {
            "steps": steps,
            "batch_size": 128,
            "lr": 2.0e-3,
            "weight_decay": 0.1,
            "warmup_steps": 50,
            "grad_clip": 1.0,
            "checkpoint_every": steps,
            "progress": False,
        },
        "eval": {"batch_size": 500},
    }


def trained_model(seed: int, args, out: Path) -> tuple[ContrastiveModel, float]:
    """Seed's two-tower model: trained (seconds it took), or with --reuse the one a previous run left."""
    run = out / f"s{seed}"
    if not (args.reuse and (run / "model" / "config.json").is_file()):
        t0 = time.time()
        run = Path(
            train(config_from_dict(recipe(seed, out, args.steps)), overwrite=True, log=lambda _m: None)[
                "run_dir"
            ]
        )
        return ContrastiveModel.from_pretrained(run / "model").eval(), time.time() - t0
    return ContrastiveModel.from_pretrained(run / "model").eval(), 0.0


class Gallery:
    """n scenes of a split: images in [0, 1], captions, scene keys, and both embeddings."""

    def __init__(self, model: ContrastiveModel, world: SyntheticWorld, split: str, n: int):
        samples = [world.sample(split, i) for i in range(n)]
        self.x = (preprocess_images([s["image"] for s in samples], model.image_size) + 1) / 2  # (n, 3, H, W)
        self.texts = [s["text"] for s in samples]
        self.keys = np.array([s["scene_key"] for s in samples])
        self.scenes = [Scene.from_dict(s["scene"]) for s in samples]
        self.img = embed_images(model, self.x)
        self.txt = model.encode_text(self.texts)


def embed_images(model: ContrastiveModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.embed_image_tensor(x * 2 - 1).float()


def image_queries(model, g: Gallery, x: torch.Tensor, mutations: int, seed: int):
    """Scores and correctness of images x (rows of g) as queries against g's captions."""
    emb = embed_images(model, x)
    idx, _ = top1(emb, g.txt)
    dist = distance_scores(emb, g.txt[idx])
    mut = image_mutation_scores(x, lambda z: top1(embed_images(model, z), g.txt)[0], mutations, seed)
    return dist.numpy(), mut.numpy(), g.keys[idx.numpy()]


def text_queries(model, g: Gallery, texts: list[str], mutations: int, seed: int):
    emb = model.encode_text(texts)
    idx, _ = top1(emb, g.img)
    dist = distance_scores(emb, g.img[idx])
    mut = text_mutation_scores(texts, lambda t: top1(model.encode_text(t), g.img)[0], mutations, seed)
    return dist.numpy(), mut.numpy(), g.keys[idx.numpy()]


def text_attack(model, g: Gallery, i: int, kind: str, k: int, seed: int):
    """Attack caption i of the gallery: lower the margin sim(true image) - best sim(an image of another key)."""
    other = torch.from_numpy(g.keys != g.keys[i])

    def margin(texts: list[str]) -> torch.Tensor:
        sims = model.encode_text(texts) @ g.img.t()  # (B, n)
        return sims[:, i] - sims[:, other].max(dim=1).values

    def success(texts: list[str]) -> torch.Tensor:
        idx, _ = top1(model.encode_text(texts), g.img)
        return torch.from_numpy(g.keys[idx.numpy()] != g.keys[i])

    if kind == "char":
        return char_attack(g.texts[i], margin, success, k, generator=torch.Generator().manual_seed(seed + i))
    return synonym_attack(g.texts[i], margin, success, k)


def detectors(cal, clean, adv, fpr: float) -> dict:
    """TPR / FPR / AUROC of the distance, mutation and combined scores: (distance, mutation) arrays of the clean
    calibration, clean test and adversarial inputs; thresholds at `fpr` on the calibration arrays."""
    out = {}
    for k, name in enumerate(("distance", "mutation")):
        out[name] = detection_metrics(clean[k], adv[k], calibrate_threshold(cal[k], fpr))
    ref = {"distance": cal[0], "mutation": cal[1]}
    comb = [combined_scores(ref, {"distance": x[0], "mutation": x[1]}) for x in (cal, clean, adv)]
    out["combined"] = detection_metrics(comb[1], comb[2], calibrate_threshold(comb[0], fpr))
    return out


def _other(keys: np.ndarray, i: int, g: torch.Generator) -> int:
    """A random gallery index whose scene key differs from row i's."""
    choices = np.flatnonzero(keys != keys[i])
    return int(choices[int(torch.randint(len(choices), (1,), generator=g))])


def run_seed(seed: int, args, out: Path) -> dict:
    model, train_s = trained_model(seed, args, out)
    world = SyntheticWorld(WorldConfig(seed=seed))
    val, test = Gallery(model, world, "val", args.n), Gallery(model, world, "test", args.n)
    m, res = args.mutations, {"seed": seed, "train_s": round(train_s, 1)}

    # ---- image queries: PGD ----
    cal_d, cal_m, _ = image_queries(model, val, val.x, m, seed)
    clean_d, clean_m, pred = image_queries(model, test, test.x, m, seed)
    correct = np.flatnonzero(pred == test.keys)
    eps = args.eps / 255
    loss = retrieval_loss(
        lambda z: model.embed_image_tensor(z * 2 - 1).float(),
        test.txt,
        torch.from_numpy(correct),
        float(model.scale().detach()),
    )
    adv = pgd_images(
        test.x[correct], loss, eps, args.pgd_steps, generator=torch.Generator().manual_seed(seed)
    )
    adv = (adv * 255).round() / 255  # 8-bit pixels, as a served PNG carries them
    adv_d, adv_m, adv_pred = image_queries(model, test, adv, m, seed + 1)
    ok = adv_pred != test.keys[correct]
    res["image"] = {
        "clean_accuracy": float((pred == test.keys).mean()),
        "attack": f"pgd linf eps={args.eps}/255 steps={args.pgd_steps}",
        "attacked": int(correct.size),
        "success_rate": float(ok.mean()),
        **detectors((cal_d, cal_m), (clean_d, clean_m), (adv_d[ok], adv_m[ok]), args.fpr),
    }
    # a detector-aware attacker: targeted PGD onto a caption of another scene, 3x the steps, so the image lands
    # close to (not between) captions: the distance score is what it lowers
    g = torch.Generator().manual_seed(seed + 7)
    target = torch.tensor([_other(test.keys, int(i), g) for i in correct])
    tloss = retrieval_loss(
        lambda z: model.embed_image_tensor(z * 2 - 1).float(), test.txt, target, float(model.scale().detach())
    )
    tadv = pgd_images(test.x[correct], lambda z: -tloss(z), eps, 3 * args.pgd_steps, generator=g)
    tadv = (tadv * 255).round() / 255
    t_d, t_m, t_pred = image_queries(model, test, tadv, m, seed + 2)
    ok = t_pred != test.keys[correct]
    res["image_targeted"] = {
        "clean_accuracy": res["image"]["clean_accuracy"],
        "attack": f"targeted pgd linf eps={args.eps}/255 steps={3 * args.pgd_steps}",
        "attacked": int(correct.size),
        "success_rate": float(ok.mean()),
        **detectors((cal_d, cal_m), (clean_d, clean_m), (t_d[ok], t_m[ok]), args.fpr),
    }

    # ---- caption queries: character and synonym attacks ----
    cal_d, cal_m, _ = text_queries(model, val, val.texts, m, seed)
    clean_d, clean_m, pred = text_queries(model, test, test.texts, m, seed)
    correct = np.flatnonzero(pred == test.keys)
    for kind in ("char", "synonym"):
        results = [text_attack(model, test, int(i), kind, args.k, seed) for i in correct]
        adv_texts = [r.text for r in results if r.success]
        entry = {
            "clean_accuracy": float((pred == test.keys).mean()),
            "attack": f"{kind} k={args.k}",
            "attacked": int(correct.size),
            "success_rate": float(np.mean([r.success for r in results])),
            "examples": [[test.texts[i], r.text] for i, r in zip(correct, results) if r.success][:3],
        }
        if adv_texts:
            adv_d, adv_m, _ = text_queries(model, test, adv_texts, m, seed + 1)
            entry.update(detectors((cal_d, cal_m), (clean_d, clean_m), (adv_d, adv_m), args.fpr))
        res[kind] = entry
    return res


def run_filters(seed: int, args, out: Path) -> dict:
    """Concept filters: precision / recall per concept, modality and level; an evasion attack on the image
    filter (PGD lowering the concept score of images that show it) and the adaptive level (strict when the
    mutation SCD flags the input)."""
    model, _ = trained_model(seed, args, out)
    recall = {"normal": args.recall, "strict": args.strict_recall}
    filters = calibrate_filters(model, args.concepts, seed, "val", args.n_filter, recall)
    res: dict = {"seed": seed, "report": filter_report(model, filters, seed, "test", args.n_filter)}
    world = SyntheticWorld(WorldConfig(seed=seed))
    val, test = Gallery(model, world, "val", args.n), Gallery(model, world, "test", args.n)
    t_mut = calibrate_threshold(image_queries(model, val, val.x, args.mutations, seed)[1], args.fpr)
    clean_mut = image_queries(model, test, test.x, args.mutations, seed)[1]
    clean_levels = [level_for(f) for f in clean_mut > t_mut]
    embed = lambda z: model.embed_image_tensor(z * 2 - 1).float()  # noqa: E731
    evasion = {}
    for c in filters.concepts:
        pos = np.flatnonzero([shows(sc, c.name) for sc in test.scenes])
        vec = torch.tensor(c.vector)
        adv = pgd_images(
            test.x[pos],
            lambda z, v=vec: -(embed(z) @ v),
            args.eps / 255,
            args.pgd_steps,
            generator=torch.Generator().manual_seed(seed),
        )
        adv = (adv * 255).round() / 255
        mut = image_queries(model, test, adv, args.mutations, seed + 3)[1]
        flagged = mut > t_mut
        emb_adv, emb_clean = embed_images(model, adv).numpy(), test.img.numpy()

        def caught(emb, levels, name=c.name):
            return float(np.mean([name in b for b in filters.check("image", emb, levels)]))

        neg = np.setdiff1d(np.arange(len(test.scenes)), pos)
        adaptive_clean = filters.check("image", emb_clean, clean_levels)
        evasion[c.name] = {
            "positives": int(pos.size),
            "recall_clean_normal": caught(emb_clean[pos], "normal"),
            "recall_adv_normal": caught(emb_adv, "normal"),
            "recall_adv_strict": caught(emb_adv, "strict"),
            "scd_flagged_adv": float(flagged.mean()),
            "recall_adv_adaptive": caught(emb_adv, [level_for(f) for f in flagged]),
            "false_block_clean_normal": float(
                np.mean([c.name in b for b in filters.check("image", emb_clean[neg])])
            ),
            "false_block_clean_adaptive": float(np.mean([c.name in adaptive_clean[i] for i in neg])),
        }
    res["evasion"] = evasion
    return res


def run_adaptive(seed: int, args, out: Path) -> dict:
    """A detector-aware attacker against the mutation score: PGD with an expectation over transformation (EOT,
    Athalye et al. 2018): each step's loss is the mean over --eot random mutations (the detector's own noise and
    shift) of the retrieval loss, so the adversarial image stays wrong under mutations; 2x the PGD steps."""
    model, _ = trained_model(seed, args, out)
    world = SyntheticWorld(WorldConfig(seed=seed))
    val, test = Gallery(model, world, "val", args.n), Gallery(model, world, "test", args.n)
    m = args.mutations
    cal_d, cal_m, _ = image_queries(model, val, val.x, m, seed)
    clean_d, clean_m, pred = image_queries(model, test, test.x, m, seed)
    correct = np.flatnonzero(pred == test.keys)
    loss = retrieval_loss(
        lambda z: model.embed_image_tensor(z * 2 - 1).float(),
        test.txt,
        torch.from_numpy(correct),
        float(model.scale().detach()),
    )
    g = torch.Generator().manual_seed(seed + 11)

    def eot(z: torch.Tensor) -> torch.Tensor:
        return torch.stack([loss(mutate_images(z, g)) for _ in range(args.eot)]).mean(dim=0)

    adv = pgd_images(test.x[correct], eot, args.eps / 255, 2 * args.pgd_steps, generator=g)
    adv = (adv * 255).round() / 255
    adv_d, adv_m, adv_pred = image_queries(model, test, adv, m, seed + 4)
    ok = adv_pred != test.keys[correct]
    entry = {
        "clean_accuracy": float((pred == test.keys).mean()),
        "attack": f"eot pgd linf eps={args.eps}/255 steps={2 * args.pgd_steps} eot={args.eot}",
        "attacked": int(correct.size),
        "success_rate": float(ok.mean()),
        **detectors((cal_d, cal_m), (clean_d, clean_m), (adv_d[ok], adv_m[ok]), args.fpr),
    }
    return {"seed": seed, "adaptive": entry}


def fusion_classifier(world: SyntheticWorld, seed: int, steps: int):
    """A fusion classifier (the image encoder of MultiModalModel, cross-attention fusion, 8-way head) trained on
    the colour of a scene's leftmost object: 3000 training scenes, `steps` AdamW steps of batch 64."""
    x, y = paired_images(world, "train", 3000)
    torch.manual_seed(seed)
    model = MultiModalModel(
        {"image": {"image_size": 32, "patch_size": 8}}, head="classify", n_classes=8, dim=64
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=g)
        loss = model(Batch({"image": x[idx] * 2 - 1, "label": y[idx]}, {})).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def paired_images(world: SyntheticWorld, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n scenes of `split`: images in [0, 1] (n, 3, 32, 32) and the leftmost object's colour index (n,)."""
    samples = paired_samples(world, split, n, "colour", ("image",))
    x = (preprocess_images([s["image"] for s in samples], 32) + 1) / 2
    return x, torch.tensor([s["label"] for s in samples])


def run_fusion(seed: int, args, out: Path) -> dict:
    """SCD for a fusion classifier, with the seed's two-tower model as the semantic judge: distance = 1 - cos(the
    judge's image embedding, the judge's direction of the predicted colour); mutation = prediction flips; PGD
    against the classifier (the judge is not attacked)."""
    judge, _ = trained_model(seed, args, out)
    world = SyntheticWorld(WorldConfig(seed=seed))
    t0 = time.time()
    model = fusion_classifier(world, seed, args.fusion_steps)
    train_s = time.time() - t0
    logits = lambda z: model.logits(Batch({"image": z * 2 - 1}, {}))[0]  # noqa: E731

    def predict(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return logits(z).argmax(dim=1)

    vecs = torch.tensor(
        np.stack(
            [
                concept_vector(judge.encode_text(concept_prompts(c)), judge.encode_text(negative_prompts(c)))
                for c in COLOURS
            ]
        )
    )

    def scores(z: torch.Tensor, s: int):
        pred = predict(z)
        dist = 1 - (embed_images(judge, z) * vecs[pred]).sum(dim=1)
        return dist.numpy(), image_mutation_scores(z, predict, args.mutations, s).numpy(), pred

    (vx, _), (tx, ty) = paired_images(world, "val", args.n), paired_images(world, "test", args.n)
    cal_d, cal_m, _ = scores(vx, seed)
    clean_d, clean_m, pred = scores(tx, seed)
    correct = (pred == ty).nonzero().flatten()
    y = ty[correct]
    adv = pgd_images(
        tx[correct],
        lambda z: torch.nn.functional.cross_entropy(logits(z), y, reduction="none"),
        args.eps / 255,
        args.pgd_steps,
        generator=torch.Generator().manual_seed(seed),
    )
    adv = (adv * 255).round() / 255
    adv_d, adv_m, adv_pred = scores(adv, seed + 1)
    ok = (adv_pred != y).numpy()
    entry = {
        "clean_accuracy": float((pred == ty).float().mean()),
        "attack": f"fusion classifier: pgd linf eps={args.eps}/255 steps={args.pgd_steps}",
        "attacked": int(correct.numel()),
        "success_rate": float(ok.mean()),
        **detectors((cal_d, cal_m), (clean_d, clean_m), (adv_d[ok], adv_m[ok]), args.fpr),
    }
    # the same check as `mmfusion serve --scd` on /v1/classify: PNG inputs through the server's decoders, the
    # served mutations (one seed for every input), threshold from the validation images
    served = [served_mutation_scores(model, z, args) for z in (vx, tx, adv[torch.from_numpy(ok)])]
    entry["served mutation"] = detection_metrics(
        served[1], served[2], calibrate_threshold(served[0], args.fpr)
    )
    return {"seed": seed, "train_s": round(train_s, 1), "fusion": entry}


def served_mutation_scores(model, images: torch.Tensor, args) -> np.ndarray:
    """The mutation scores `mmfusion serve --scd` (task classify) gives images (n, 3, H, W) in [0, 1] sent as
    PNG to /v1/classify of `model`: serve.safety's mutations and scores through the server's Engine."""
    import io

    from PIL import Image

    from mmfusion.safety.scd import SCDCalibration
    from mmfusion.serve.engine import Engine
    from mmfusion.serve.safety import classify_mutation_scores, classify_mutations

    engine = Engine(model)
    cal = SCDCalibration("mutation", 0.0, args.fpr, 0, mutations=args.mutations, task="classify")

    def png(z: torch.Tensor) -> bytes:
        buf = io.BytesIO()
        Image.fromarray((z.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    def classify(samples: list[dict]) -> list[dict]:
        with torch.inference_mode():
            return [
                p
                for i in range(0, len(samples), 256)
                for p in engine.classify(
                    [{"image": engine.prepare("image", s["image"], "image")} for s in samples[i : i + 256]]
                )
            ]

    samples = [{"image": png(z)} for z in images]
    muts, owners = classify_mutations(samples, cal)
    return np.array(classify_mutation_scores(classify(samples), classify(muts), owners), dtype=np.float64)


TRANSFORMS = {
    "none (PNG)": lambda im: im,
    "JPEG q95": lambda im: _jpeg(im, 95),
    "JPEG q75": lambda im: _jpeg(im, 75),
    "JPEG q50": lambda im: _jpeg(im, 50),
    "Gaussian noise std 2": lambda im: np.clip(
        im + np.random.default_rng(0).normal(0, 2, im.shape), 0, 255
    ).astype(np.uint8),
    "shift 1 px": lambda im: np.roll(im, 1, axis=1),
    "resize 1/2 and back": lambda im: np.asarray(
        Image.fromarray(im)
        .resize((im.shape[1] // 2, im.shape[0] // 2), Image.BILINEAR)
        .resize(im.shape[1::-1], Image.BILINEAR)
    ),
}


def _jpeg(im: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def run_watermark(seed: int, args) -> dict:
    """Detection rate of the keyed watermark after each transform, and false positives (unmarked images, another
    key), on --n test images of the world at 32 and 64 px."""
    key, other = f"bench-key-{seed}".encode(), f"other-key-{seed}".encode()
    res: dict = {"seed": seed}
    for side in (32, 64):
        world = SyntheticWorld(WorldConfig(seed=seed, image_size=side))
        images = [world.sample("test", i, ("image",))["image"] for i in range(args.n)]
        marked = [watermark.embed(im, key) for im in images]
        mse = np.mean([np.mean((m.astype(float) - im) ** 2) for m, im in zip(marked, images)])
        row = {
            "psnr_db": float(10 * np.log10(255**2 / mse)),
            "fpr_unmarked": float(np.mean([watermark.detect(im, key) for im in images])),
            "fpr_other_key": float(np.mean([watermark.detect(m, other) for m in marked])),
        }
        for name, t in TRANSFORMS.items():
            z = [watermark.score(t(m), key) for m in marked]
            row[name] = {
                "detected": float(np.mean(np.array(z) >= watermark.DEFAULT_THRESHOLD)),
                "z_mean": float(np.mean(z)),
            }
        res[f"{side}px"] = row
    return res


def ms(vals) -> str:
    v = np.asarray(vals, dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}"


def print_adaptive(rows: list[dict], args) -> None:
    print_scd(rows, args, ("adaptive",))


def print_fusion(rows: list[dict], args) -> None:
    print_scd(rows, args, ("fusion",))


def print_scd(rows: list[dict], args, kinds=("image", "image_targeted", "char", "synonym")) -> None:
    print(f"\nseeds {args.seeds}, gallery {args.n}, thresholds at FPR {args.fpr} on clean validation queries")
    print("| attack | clean acc | success | detector | TPR | FPR | AUROC |")
    print("|---|---|---|---|---|---|---|")
    for kind in kinds:
        for det in ("distance", "mutation", "combined", "served mutation"):
            sel = [r[kind] for r in rows if det in r[kind]]
            if not sel:
                continue
            print(
                f"| {sel[0]['attack']} | {ms([s['clean_accuracy'] for s in sel])} | "
                f"{ms([s['success_rate'] for s in sel])} | {det} | {ms([s[det]['tpr'] for s in sel])} | "
                f"{ms([s[det]['fpr'] for s in sel])} | {ms([s[det]['auroc'] for s in sel])} |"
            )


def print_filters(rows: list[dict], args) -> None:
    print(
        f"\nfilters: seeds {args.seeds}, calibrated on {args.n_filter} val, measured on {args.n_filter} test"
    )
    print(
        "| modality | concept | positives | AUROC | normal precision | normal recall | strict precision | strict recall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mod in ("image", "text"):
        for c in args.concepts:
            r = [row["report"][mod][c] for row in rows]
            print(
                f"| {mod} | {c} | {ms([x['normal']['positives'] for x in r])} | {ms([x['auroc'] for x in r])} | "
                f"{ms([x['normal']['precision'] for x in r])} | {ms([x['normal']['recall'] for x in r])} | "
                f"{ms([x['strict']['precision'] for x in r])} | {ms([x['strict']['recall'] for x in r])} |"
            )
    print(
        "\n| concept | recall clean | recall attacked, normal | SCD flags attacked | recall attacked, adaptive "
        "| recall attacked, strict | false blocks clean normal | false blocks clean adaptive |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for c in args.concepts:
        e = [row["evasion"][c] for row in rows]
        keys = (
            "recall_clean_normal",
            "recall_adv_normal",
            "scd_flagged_adv",
            "recall_adv_adaptive",
            "recall_adv_strict",
            "false_block_clean_normal",
            "false_block_clean_adaptive",
        )
        print(f"| {c} | " + " | ".join(ms([x[k] for x in e]) for k in keys) + " |")


def print_watermark(rows: list[dict], args) -> None:
    print(
        f"\nwatermark: delta {watermark.DEFAULT_DELTA}, z >= {watermark.DEFAULT_THRESHOLD}, {args.n} test "
        f"images per seed, seeds {args.seeds}"
    )
    for side in ("32px", "64px"):
        r = [row[side] for row in rows]
        print(
            f"{side}: PSNR {ms([x['psnr_db'] for x in r])} dB; false positives: unmarked "
            f"{ms([x['fpr_unmarked'] for x in r])}, another key {ms([x['fpr_other_key'] for x in r])}"
        )
    print("| transform | detected 32 px | mean z 32 px | detected 64 px | mean z 64 px |")
    print("|---|---|---|---|---|")
    for t in TRANSFORMS:
        cells = []
        for side in ("32px", "64px"):
            cells += [
                ms([row[side][t]["detected"] for row in rows]),
                ms([row[side][t]["z_mean"] for row in rows]),
            ]
        print(f"| {t} | " + " | ".join(cells) + " |")


PARTS = ("scd", "adaptive", "fusion", "filters", "watermark")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--steps", type=int, default=500, help="training steps of each two-tower model")
    ap.add_argument("--n", type=int, default=300, help="gallery size (validation and test)")
    ap.add_argument("--fpr", type=float, default=0.05, help="stated false-positive rate of the thresholds")
    ap.add_argument("--eps", type=float, default=8, help="PGD L-inf radius in 1/255 pixel units")
    ap.add_argument("--pgd-steps", type=int, default=10)
    ap.add_argument(
        "--k", type=int, default=2, help="text attacks: most character edits / word substitutions"
    )
    ap.add_argument("--mutations", type=int, default=16, help="mutations per input for the mutation score")
    ap.add_argument("--eot", type=int, default=4, help="adaptive attack: mutations averaged per PGD step")
    ap.add_argument("--fusion-steps", type=int, default=300, help="training steps of the fusion classifier")
    ap.add_argument("--concepts", nargs="+", default=["red", "large", "circle"])
    ap.add_argument("--n-filter", type=int, default=1000, help="filter calibration / test samples")
    ap.add_argument("--recall", type=float, default=0.9, help="filters' normal-level recall target")
    ap.add_argument("--strict-recall", type=float, default=0.99, help="filters' strict-level recall target")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench/scd")
    ap.add_argument("--reuse", action="store_true", help="use the models a previous run trained in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    runners = {
        "scd": (lambda s: run_seed(s, args, out), print_scd),
        "adaptive": (lambda s: run_adaptive(s, args, out), print_adaptive),
        "fusion": (lambda s: run_fusion(s, args, out), print_fusion),
        "filters": (lambda s: run_filters(s, args, out), print_filters),
        "watermark": (lambda s: run_watermark(s, args), print_watermark),
    }
    for part in args.parts:
        run, report = runners[part]
        rows = []
        for seed in args.seeds:
            rows.append(run(seed))
            print(json.dumps(rows[-1]), flush=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"results_{part}.json").write_text(
                json.dumps({"args": vars(args), "rows": rows}, indent=2)
            )
        report(rows, args)


if __name__ == "__main__":
    main()
