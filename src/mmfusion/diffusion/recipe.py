"""A joint diffusion run through the common Trainer (`model.kind: diffusion`), and its model folder.

    world = SyntheticWorld(WorldConfig(seed=..., image_size=cfg.image_size, ...))
    fit_diffusion(cfg, train, world, n_train, run_dir)   # Trainer + EMA callback; writes run_dir/model

The training data are the world's first `n_train` train scenes, rendered once; every step draws its batch
from a per-epoch permutation and each scene's caption template afresh ((seed, epoch, step) seeds both), so a
run is a pure function of its seed and resumes exactly. The model folder (config.json + model.safetensors,
`mmfusion.models.persistence`) holds the trained and the EMA denoiser; the text codec is rebuilt from the
config (its vocabulary is stored and checked on load).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..batch import Batch
from ..data.synthetic import TEMPLATES, Scene, SyntheticWorld, caption_for, make_split
from ..errors import CheckpointError, ConfigError, DataError
from ..train.config import refuse_train_settings
from .config import DiffusionModelConfig
from .latents import TextCodec
from .model import EMACallback, JointDiffusion

MODEL_TYPE = "joint_diffusion"


def images_to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    arr = np.ascontiguousarray(np.stack(list(images)) if not isinstance(images, np.ndarray) else images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise DataError(f"expected uint8 images (N, H, W, 3); got {arr.dtype} {tuple(arr.shape)}")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def text_codec(cfg: DiffusionModelConfig) -> TextCodec:
    return TextCodec(cfg.text_len, cfg.text_dim, cfg.text_seed)


class DiffusionData:
    """The Trainer's TrainData over rendered scenes: batches {"image": (B, 3, S, S), "text": (B, L, d)}."""

    def __init__(
        self, images: torch.Tensor, scenes: Sequence[Scene], codec: TextCodec, batch_size: int, seed: int
    ):
        if len(images) != len(scenes):
            raise DataError(f"{len(images)} images for {len(scenes)} scenes")
        self.images, self.scenes, self.codec = images, list(scenes), codec
        self.batch_size, self.seed = batch_size, seed

    def steps_per_epoch(self) -> int:
        return len(self.scenes) // self.batch_size

    def step_rows(self, epoch: int, step: int) -> tuple[np.ndarray, list[str]]:
        """(scene indices, captions) of step `step` of `epoch`: a slice of the epoch's permutation, and a
        random template per scene."""
        perm = np.random.default_rng((self.seed, epoch)).permutation(len(self.scenes))
        idx = perm[step * self.batch_size : (step + 1) * self.batch_size]
        rng = np.random.default_rng((self.seed, epoch, step, 1))
        caps = [
            caption_for(self.scenes[i], int(rng.integers(len(TEMPLATES[len(self.scenes[i].objects)]))))
            for i in idx
        ]
        return idx, caps

    def step_batches(
        self, epoch: int, start_step: int, rank: int, world: int, accumulation: int
    ) -> Iterator[list[Batch]]:
        parts = world * accumulation
        if self.batch_size % parts:
            raise ConfigError(
                f"train.batch_size = {self.batch_size} is not divisible by world x accumulation = {parts}"
            )
        m = self.batch_size // parts
        for step in range(start_step, self.steps_per_epoch()):
            idx, caps = self.step_rows(epoch, step)
            text = self.codec.encode(caps)
            micro = []
            for k in range(rank * accumulation, (rank + 1) * accumulation):
                sl = slice(k * m, (k + 1) * m)
                ones = torch.ones(m, dtype=torch.bool)
                data = {"image": self.images[idx[sl]], "text": text[sl]}
                micro.append(Batch(data, {"image": ones, "text": ones.clone()}, {"caption": caps[sl]}))
            yield micro


def world_data(world: SyntheticWorld, n: int, split: str = "train") -> tuple[torch.Tensor, list[Scene]]:
    """Samples 0..n-1 of `split`: images (n, 3, S, S) in [-1, 1] and their scenes."""
    samples = make_split(world, split, n, ("image",))
    return images_to_tensor([s["image"] for s in samples]), [Scene.from_dict(s["scene"]) for s in samples]


def check_train_settings(train: Any) -> None:
    """ConfigError for the `train:` settings a diffusion run does not support."""
    refuse_train_settings(train, "diffusion", "accumulation, checkpoints, resume and data-parallel DDP work")


def fit_diffusion(
    cfg: DiffusionModelConfig,
    train: Any,
    world: SyntheticWorld,
    n_train: int,
    run_dir: str | Path,
    *,
    seed: int = 0,
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_eval: Callable[[nn.Module, int], dict[str, float]] | None = None,
) -> tuple[JointDiffusion, dict[str, float]]:
    """Train a JointDiffusion on the world's first `n_train` train scenes with the common Trainer (`train`:
    a TrainConfig) in `run_dir`, with EMA after every step; writes `run_dir`/model; returns (model, last
    logged metrics)."""
    from ..train.trainer import Trainer

    check_train_settings(train)
    if world.config.image_size != cfg.image_size:
        raise ConfigError(
            f"the world renders {world.config.image_size}px images but model.image_size = {cfg.image_size}"
        )
    if train.threads:
        torch.set_num_threads(train.threads)
    run_dir = Path(run_dir)
    images, scenes = world_data(world, n_train)
    torch.manual_seed(seed)
    model = JointDiffusion(cfg)
    n = sum(p.numel() for p in model.net.parameters())
    log(
        f"model: joint diffusion denoiser, {n / 1e6:.2f}M parameters; {n_train} scenes; run directory {run_dir}"
    )
    if model.image_codec is not None:  # deterministic given the seed, so a resumed run retrains the same one
        mse = model.image_codec.fit(images, cfg.ae_steps, noise=cfg.ae_noise, seed=seed)
        log(f"image autoencoder: {cfg.ae_steps} steps, training reconstruction MSE {mse:.4f}")
    data = DiffusionData(images, scenes, text_codec(cfg), train.batch_size, seed)
    trainer = Trainer(model, data, train, run_dir, log=log, on_eval=on_eval, callbacks=[EMACallback()])
    last = trainer.fit(resume=resume)
    if trainer.is_main:
        save_diffusion(model, run_dir / "model", {"train": train.model_dump(mode="json"), "last": last})
    return model, last


def save_diffusion(model: JointDiffusion, directory: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write the model folder: config.json (model config, text vocabulary, `info`) + model.safetensors."""
    from ..models.persistence import save_folder

    config = {"config": model.cfg.model_dump(mode="json"), "vocab": text_codec(model.cfg).vocab}
    return save_folder(model, directory, MODEL_TYPE, {**config, "info": info or {}})


def is_diffusion_folder(path: str | Path) -> Path | None:
    """The model folder at `path` (or `path`/model, for a run directory) when it holds a diffusion model."""
    import json

    for d in (Path(path), Path(path) / "model"):
        f = d / "config.json"
        if f.is_file():
            try:
                if json.loads(f.read_text()).get("model_type") == MODEL_TYPE:
                    return d
            except (ValueError, AttributeError):
                return None
    return None


def load_diffusion(path: str | Path, map_location: str | torch.device = "cpu") -> JointDiffusion:
    """A JointDiffusion from a model folder or a run directory holding one as model/ (eval mode)."""
    from ..models.persistence import load_weights, read_config

    folder = is_diffusion_folder(path)
    if folder is None:
        raise CheckpointError(f"{path}: not a joint diffusion model folder or run directory (no config.json)")
    meta = read_config(folder, MODEL_TYPE)
    cfg = DiffusionModelConfig(**meta["config"])
    if meta.get("vocab") != text_codec(cfg).vocab:
        raise CheckpointError(f"{folder}: its text vocabulary differs from this version's world vocabulary")
    return load_weights(JointDiffusion(cfg), folder, map_location)


__all__ = [
    "MODEL_TYPE",
    "DiffusionData",
    "check_train_settings",
    "fit_diffusion",
    "images_to_tensor",
    "is_diffusion_folder",
    "load_diffusion",
    "save_diffusion",
    "text_codec",
    "world_data",
]
