"""Exact judgements of a JointDiffusion model on held-out scenes of the synthetic world (E1, E2).

- t2i_acc@g: text -> image with guidance g; the SyntheticJudge must read the caption's left-most object's
  (shape, colour) in the generated image (`mmfusion.eval.generation.attribute_accuracy`).
- i2t_acc@g: image -> text; the scene parser (`mmfusion.unified.train.parse_caption`) must read exactly the
  scene's objects (size, colour, shape, left to right) from the generated caption. i2t_parsed: the share it
  reads at all.
- joint_consistency: joint (image, caption) pairs; the caption must parse and its left-most object's
  (shape, colour) must be what the judge reads in the image generated with it. joint_parsed as above.
- fid@g / is@g: FID and IS under the judge (not Inception) of the t2i images against the real test images.
- real_acc: the judge on the real test images (the ceiling t2i_acc is measured against); recon_acc (with
  image_latent autoencoder only): the judge on their autoencoder reconstructions (the latent's own ceiling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.synthetic import Scene, SyntheticWorld, caption_for
from .latents import images_to_unit
from .model import JointDiffusion
from .recipe import text_codec, world_data
from .sampling import sample


def caption_matches(caption: str, scene: Scene) -> bool:
    """Whether the scene parser reads exactly `scene`'s objects (left to right) from `caption`."""
    from ..unified.train import parse_caption

    return parse_caption(caption) == scene.key()


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


@torch.no_grad()
def evaluate_diffusion(
    model: JointDiffusion,
    world: SyntheticWorld,
    judge: Any,
    n: int = 200,
    steps: int = 25,
    guidance: Sequence[float] = (1.0, 3.0),
    caption_guidance: Sequence[float] = (1.0,),
    seed: int = 0,
    split: str = "test",
    batch: int = 100,
    fid_is: bool = True,
) -> dict[str, float]:
    """The metrics of the module docstring on samples 0..n-1 of `split` (DDIM `steps`, eta 0, EMA weights)."""
    from ..eval.generation import attribute_accuracy, fid, inception_score
    from ..unified.train import parse_caption

    model.eval()
    codec = text_codec(model.cfg)
    images, scenes = world_data(world, n, split)
    real = images_to_unit(images)
    out: dict[str, float] = {"n": float(n), "real_acc": attribute_accuracy(real, scenes, judge)}
    if model.image_codec is not None:
        recon = torch.cat(
            [model.latent_to_image(model.image_to_latent(images[c])) for c in _chunks(n, batch)]
        )
        out["recon_acc"] = attribute_accuracy(images_to_unit(recon), scenes, judge)
    prompts = codec.encode([caption_for(s, 0) for s in scenes])
    for g in guidance:
        gen = torch.cat(
            [
                sample(model, "image", text=prompts[c], steps=steps, guidance=g, seed=seed + k).image
                for k, c in enumerate(_chunks(n, batch))
            ]
        )
        fake = images_to_unit(gen)
        out[f"t2i_acc@{g:g}"] = attribute_accuracy(fake, scenes, judge)
        if fid_is:
            out[f"fid@{g:g}"] = fid(real, fake, judge)
            out[f"is@{g:g}"] = inception_score(fake, judge, splits=5, seed=seed)[0]
    for g in caption_guidance:
        caps: list[str] = []
        for k, c in enumerate(_chunks(n, batch)):
            lat = sample(model, "caption", image=images[c], steps=steps, guidance=g, seed=seed + k).text
            caps += codec.decode(lat)
        out[f"i2t_acc@{g:g}"] = sum(caption_matches(c, s) for c, s in zip(caps, scenes)) / n
        out[f"i2t_parsed@{g:g}"] = sum(parse_caption(c) is not None for c in caps) / n
    pairs_img, pairs_cap = [], []
    for k, c in enumerate(_chunks(n, batch)):
        s = sample(model, "joint", n=c.stop - c.start, steps=steps, seed=seed + 1000 + k)
        pairs_img.append(images_to_unit(s.image))
        pairs_cap += codec.decode(s.text)
    preds = judge.predict_attributes(torch.cat(pairs_img).numpy())
    hits, parsed = 0, 0
    for cap, p in zip(pairs_cap, preds):
        objs = parse_caption(cap)
        if objs is None:
            continue
        parsed += 1
        size, colour, shape = objs[0]
        hits += colour == p["colour"] and shape == p["shape"]
    out["joint_consistency"] = hits / n
    out["joint_parsed"] = parsed / n
    return out


__all__ = ["caption_matches", "evaluate_diffusion"]
