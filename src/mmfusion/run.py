"""Run orchestration: config -> data -> model -> Trainer -> saved model -> evaluation, in one run directory.

runs/<name>/config.yaml        resolved config snapshot
           tokenizer.json      trained on the training captions (reused on --resume)
           checkpoints/        step-N/ {model,optimizer}.safetensors + state.json + MANIFEST.json
           metrics.jsonl       training log; tensorboard/ the same as TensorBoard events
           model/              final save_pretrained folder (config.json, model.safetensors, tokenizer.json)
           metrics.json        evaluation; plots/*.png
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .config import RunConfig, dump_config
from .errors import ConfigError, DataError
from .modalities.text import TextTokenizer
from .train import distributed as dist_utils
from .train.rng import seed_everything


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


def load_split(cfg: RunConfig, split: str, progress: bool = False):
    """The dataset of one split ("train" | "val" | "test") for an image–text model."""
    data = cfg.data
    if data.source == "synthetic":
        from .data.loader import ListDataset
        from .data.synthetic import SyntheticWorld, WorldConfig, make_split

        s = data.synthetic
        world = SyntheticWorld(
            WorldConfig(
                seed=s.seed, image_size=cfg.model.image.image_size, object_count_probs=s.object_count_probs
            )
        )
        n = {"train": s.n_train, "val": s.n_val, "test": s.n_test}[split]
        return ListDataset(make_split(world, split, n, modalities=("image", "text"), progress=progress))
    path = getattr(data, split)
    if not path:
        raise ConfigError(
            f"data.{split} is not set: data.source={data.source} needs a path for the {split} split"
        )
    from .data.sources import open_source

    return open_source(data.source, path, modalities=("image", "text"), on_error=data.on_error)


def dataset_texts(dataset) -> list[str]:
    """Every caption of a dataset (for tokenizer training), without decoding media where possible."""
    if hasattr(dataset, "texts"):
        return list(dataset.texts())
    if hasattr(dataset, "samples"):
        return [s["text"] for s in dataset.samples if s.get("text")]
    return [s["text"] for s in dataset if isinstance(s, dict) and s.get("text")]


def build_train_data(cfg: RunConfig, dataset, tokenizer: TextTokenizer):
    from torch.utils.data import IterableDataset

    from .data.loader import ImageTextCollator, MapData, StreamData

    collate = ImageTextCollator(tokenizer, cfg.model.image.image_size)
    if isinstance(dataset, IterableDataset):
        from .data.sources import count_samples

        return StreamData(
            dataset, collate, cfg.train.batch_size, count_samples(cfg.data.train), cfg.data.num_workers
        )
    return MapData(dataset, collate, cfg.train.batch_size, cfg.seed, cfg.data.num_workers)


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Train the configured model; returns {"run_dir", "train": last metrics, "eval": metrics or None}."""
    from .models.contrastive import ContrastiveModel
    from .train.trainer import Trainer, resolve_device

    out = run_dir(cfg)
    dist_utils.init_from_env(resolve_device(cfg.train.device))
    is_main = dist_utils.rank() == 0
    ckpts = out / "checkpoints"
    if not resume and ckpts.exists() and any(ckpts.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"run directory {out} already has checkpoints: pass --resume to continue it or --overwrite to start over"
            )
        if is_main:
            shutil.rmtree(out)
    if resume and not (out / "tokenizer.json").is_file():
        raise ConfigError(
            f"--resume: {out} has no earlier run (no tokenizer.json); start it without --resume"
        )
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    train_set = load_split(cfg, "train", progress=is_main and cfg.train.progress)
    if not resume and is_main:
        text_cfg = cfg.model.text
        if text_cfg.tokenizer:
            source = Path(text_cfg.tokenizer)
            source = source / "tokenizer.json" if source.is_dir() else source
            if not source.is_file():
                raise ConfigError(f"model.text.tokenizer = {text_cfg.tokenizer!r}: no tokenizer.json there")
            shutil.copyfile(source, out / "tokenizer.json")
        else:
            texts = dataset_texts(train_set)
            if not texts:
                raise DataError("the training split has no captions to train the tokenizer on")
            TextTokenizer.train(texts, text_cfg.vocab_size, text_cfg.context_length).save(out)
        dump_config(cfg, out / "config.yaml")
    dist_utils.barrier()
    # every rank (and a resumed run) reads the one saved tokenizer, so all agree on the vocabulary
    tokenizer = TextTokenizer.load(out, cfg.model.text.context_length)
    seed_everything(cfg.seed)
    model = ContrastiveModel(cfg.model, tokenizer)
    if is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: two-tower contrastive, {n_params / 1e6:.2f}M parameters; run directory {out}")
    trainer = Trainer(model, build_train_data(cfg, train_set, tokenizer), cfg.train, out, log=log)
    last = trainer.fit(resume=resume)
    result: dict[str, Any] = {"run_dir": str(out), "train": last, "eval": None}
    if trainer.is_main:
        model.save_pretrained(out / "model")
    return result
