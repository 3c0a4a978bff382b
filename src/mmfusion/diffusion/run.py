"""`mmfusion train` for `model.kind: diffusion`: the synthetic world of `data.synthetic`, rendered at the
model's image size, trained through `recipe.fit_diffusion`; the run directory gets config.yaml,
checkpoints/, metrics.jsonl and model/ (the folder `mmfusion generate --model` reads)."""

from __future__ import annotations

from typing import Any


def train_diffusion(cfg: Any, resume: bool = False, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Run a RunConfig whose model.kind is diffusion; returns {"run_dir", "train", "eval"}."""
    from ..config import dump_config
    from ..data.synthetic import SyntheticWorld, WorldConfig
    from ..errors import ConfigError
    from ..run import prepare_run_dir
    from ..train.rng import seed_everything
    from .recipe import fit_diffusion

    if cfg.data.source != "synthetic" or cfg.data.synthetic.task is not None:
        raise ConfigError(
            f"data.source = {cfg.data.source!r}: a diffusion model trains on the synthetic world's image-caption "
            "scenes (data.source: synthetic, no data.synthetic.task)"
        )
    out, is_main = prepare_run_dir(cfg, resume, overwrite)
    seed_everything(cfg.seed)
    s = cfg.data.synthetic
    world = SyntheticWorld(
        WorldConfig(seed=s.seed, image_size=cfg.model.image_size, object_count_probs=s.object_count_probs)
    )
    if not resume and is_main:
        dump_config(cfg, out / "config.yaml")
    _, last = fit_diffusion(
        cfg.model, cfg.train, world, s.size("train"), out, seed=cfg.seed, resume=resume, log=log
    )
    return {"run_dir": str(out), "train": last, "eval": None}


__all__ = ["train_diffusion"]
