"""Run orchestration: config -> data -> model -> Trainer -> saved model -> evaluation, in one run directory.

runs/<name>/config.yaml        resolved config snapshot
           tokenizer.json      trained on the training captions (reused on --resume)
           checkpoints/        step-N/ {model,optimizer}.safetensors + state.json + MANIFEST.json
           metrics.jsonl       training log; tensorboard/ the same as TensorBoard events
           model/              final save_pretrained folder (config.json, model.safetensors, tokenizer.json)
           metrics.json        evaluation; plots/*.png
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .config import RunConfig, dump_config
from .errors import ConfigError, DataError
from .modalities.text import TextTokenizer
from .train import distributed as dist_utils
from .train.model_setup import finish_model, init_tokenizer, prepare_model
from .train.rng import seed_everything


def _quiet(message: str) -> None:
    """The log of non-main ranks."""


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
    if data.source == "webdataset" and (path or split == "val"):
        # the streaming loader: lazy shards, shuffle buffer, split over ranks and workers exactly once;
        # without data.val the validation split is a stratified hold-out of the training shards (D8)
        from .data.engine.stream import StreamingDataset

        which = "all" if path else "val"
        if split == "train" and not data.val:
            which = "train"
        return StreamingDataset(
            path or data.train,
            split=which,
            val_fraction=data.val_fraction,
            modalities=("image", "text"),
            on_error=data.on_error,
            shuffle=data.shuffle_buffer if split == "train" else 0,
            seed=cfg.seed,
            augment=data.augment if split == "train" else None,
        )
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


def build_train_data(
    cfg: RunConfig, dataset, tokenizer: TextTokenizer, batch_size: int | None = None, label: str | None = None
):
    """Step iteration over the image–text training set; `label` adds batch["label"] for a probe."""
    from torch.utils.data import IterableDataset

    from .data.loader import ImageTextCollator, MapData, StreamData

    batch_size = batch_size or cfg.train.batch_size
    collate = ImageTextCollator(tokenizer, cfg.model.image.image_size)
    if label is not None:
        from .train.stages import LabelledCollator

        collate = LabelledCollator(collate, label)
    if isinstance(dataset, IterableDataset):
        from .data.sources import count_samples

        n = dataset.num_samples() if hasattr(dataset, "num_samples") else count_samples(cfg.data.train)
        return StreamData(dataset, collate, batch_size, n, cfg.data.num_workers)
    return MapData(dataset, collate, batch_size, cfg.seed, cfg.data.num_workers)


def stage_subset(dataset, index: int, n_train: int | None):
    """The first `n_train` samples of a map-style training set (all of it when None)."""
    if n_train is None:
        return dataset
    from torch.utils.data import IterableDataset, Subset

    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ConfigError(
            f"train.stages.{index}.n_train: a subset needs a map-style training set (synthetic or jsonl data)"
        )
    if n_train > len(dataset):
        raise ConfigError(
            f"train.stages.{index}.n_train = {n_train}: the training split has only {len(dataset)} samples"
        )
    return dataset if n_train == len(dataset) else Subset(dataset, range(n_train))


def task_samples(cfg: RunConfig, split: str) -> list[dict[str, Any]]:
    """The samples of `split` of the configured synthetic task (mmfusion.tasks)."""
    from .data.synthetic import SyntheticWorld, WorldConfig
    from .tasks import make_task_data

    t = cfg.task
    world = SyntheticWorld(WorldConfig(seed=cfg.data.synthetic.seed, image_size=t.image_size))
    n = {"train": t.n_train, "val": t.n_val, "test": t.n_test}[split]
    return make_task_data(t.name, world, split, n, seed=t.seed)


def task_collate(cfg: RunConfig, tokenizer: TextTokenizer | None):
    """Samples -> Batch for the configured task (mmfusion.tasks.collate with the run's sizes)."""
    from functools import partial

    from .tasks import collate

    return partial(
        collate, tokenizer=tokenizer, image_size=cfg.task.image_size, num_frames=cfg.task.num_frames
    )


def mixture_sources(cfg: RunConfig) -> dict[str, list[dict[str, Any]]]:
    """The training sources of `task.mixture`: disjoint consecutive slices of the task's training samples,
    each keeping only its `modalities` (the others set to None, i.e. absent)."""
    from .data.synthetic import SyntheticWorld, WorldConfig
    from .tasks import TASKS, make_task_data

    t = cfg.task
    world = SyntheticWorld(WorldConfig(seed=cfg.data.synthetic.seed, image_size=t.image_size))
    total = sum(s.n for s in t.mixture.sources)
    samples = make_task_data(t.name, world, "train", total, seed=t.seed)
    out, start = {}, 0
    for source in t.mixture.sources:
        keep = set(source.modalities or TASKS[t.name].modalities)
        drop = [m for m in TASKS[t.name].modalities if m not in keep]
        out[source.name] = [{**s, **dict.fromkeys(drop)} for s in samples[start : start + source.n]]
        start += source.n
    return out


def mixture_weights(cfg: RunConfig, sources: dict[str, list[dict[str, Any]]]):
    """The target mixture `task.mixture.weighting` describes: K floats or a CurriculumSchedule."""
    from .data import samplers

    mix = cfg.task.mixture
    sizes = [len(v) for v in sources.values()]
    if mix.weighting == "proportional":
        return samplers.temperature_weights(sizes, 1.0)
    if mix.weighting == "uniform":
        return [1.0 / len(sizes)] * len(sizes)
    if mix.weighting == "temperature":
        return samplers.temperature_weights(sizes, mix.temperature)
    if mix.weighting == "mas":
        complexities = [samplers.source_complexity(v, mix.units) for v in sources.values()]
        return samplers.mas_weights(complexities, mix.alpha)
    return samplers.CurriculumSchedule([(p.step, p.weights) for p in mix.curriculum])


def plot_run_mixture(run: Path, names: list[str]) -> Path | None:
    """<run>/mixture.png: realised vs target share per source over training, from metrics.jsonl."""
    from .data.samplers import history_from_metrics, plot_mixture

    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    history = history_from_metrics(rows, names)
    return plot_mixture(history, run / "mixture.png", names) if history else None


def unsharded(trainer, model, fresh):
    """The trained model as a plain module to save: `model` itself, unless the trainer sharded it (FSDP2 /
    tensor parallel): then, on rank 0, `fresh()` loaded with the gathered full state (None on other ranks).
    A collective in that case: every rank calls it."""
    if not trainer.sharded:
        return model
    state = trainer.full_model_state()
    if state is None:
        return None
    plain = fresh()
    plain.load_state_dict(state)
    return plain


def _prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """Create (or check, on --resume) the run directory; returns it and whether this is the main process."""
    from .train.trainer import resolve_device

    out = run_dir(cfg)
    par = cfg.train.parallel
    dist_utils.init_from_env(resolve_device(cfg.train.device), par.timeout_s, par.init_timeout_s)
    is_main = dist_utils.rank() == 0
    ckpts = out / "checkpoints"
    if not resume and ckpts.exists() and any(ckpts.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"run directory {out} already has checkpoints: pass --resume to continue it or --overwrite to start over"
            )
        if is_main:
            shutil.rmtree(out)
    if resume and not (out / "config.yaml").is_file():
        raise ConfigError(f"--resume: {out} has no earlier run (no config.yaml); start it without --resume")
    out.mkdir(parents=True, exist_ok=True)
    return out, is_main


def train_task(cfg: RunConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Train `cfg.fusion_model` on the synthetic task `cfg.task`; save it and evaluate it on the test split
    with every modality and with each one removed (E4)."""
    from .data.loader import ListDataset, MapData
    from .models.multimodal import MultiModalModel
    from .tasks import TASKS, task_tokenizer
    from .train.trainer import Trainer

    out, is_main = _prepare_run_dir(cfg, resume, overwrite)
    seed_everything(cfg.seed)
    sources = mixture_sources(cfg) if cfg.task.mixture else None
    train_set = [s for v in sources.values() for s in v] if sources else task_samples(cfg, "train")
    has_text = "text" in TASKS[cfg.task.name].modalities
    if not resume and is_main:
        if has_text and init_tokenizer(cfg.train) is not None:  # the tokenizer of the model it starts from
            shutil.copyfile(init_tokenizer(cfg.train), out / "tokenizer.json")
        elif has_text:
            task_tokenizer(train_set, cfg.task.vocab_size, cfg.task.context_length).save(out)
        dump_config(cfg, out / "config.yaml")
    dist_utils.barrier()
    tokenizer = TextTokenizer.load(out, cfg.task.context_length) if has_text else None
    seed_everything(cfg.seed)
    model = MultiModalModel.from_config(cfg.fusion_model, tokenizer)
    if is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"model: {model.config.fusion} fusion over {', '.join(model.modalities)}, {n_params / 1e6:.2f}M "
            f"parameters; task {cfg.task.name}; run directory {out}"
        )
    student = prepare_model(model, cfg.train, resume, log if is_main else _quiet)
    if cfg.train.distill is not None:
        from .train.distill import drop_labels, wrap_for_distillation

        train_set = drop_labels(train_set, cfg.train.distill.n_labelled)
        model = wrap_for_distillation(model, cfg.train.distill)
        if is_main:
            log(f"distilling from {cfg.train.distill.teacher} ({cfg.train.distill.model_dump()})")
    collate = task_collate(cfg, tokenizer)
    if sources is not None:
        from .data.loader import MixtureData

        weights = mixture_weights(cfg, sources)
        if is_main:
            target = weights(0) if callable(weights) else weights
            log("mixture (target at step 0): " + ", ".join(f"{n}={p:.3f}" for n, p in zip(sources, target)))
    if cfg.train.stages:
        from .train.stages import fit_stages

        def make_data(i, stage):
            bs = stage.batch_size or cfg.train.batch_size
            if sources is not None:
                if stage.n_train is not None:
                    raise ConfigError(f"train.stages.{i}.n_train: a task.mixture run sizes its sources there")
                return MixtureData(sources, weights, collate, bs, cfg.seed, cfg.data.num_workers)
            subset = stage_subset(ListDataset(train_set), i, stage.n_train)
            return MapData(subset, collate, bs, cfg.seed, cfg.data.num_workers)

        last = fit_stages(model, cfg.train, out, make_data, resume=resume, log=log, is_main=is_main)
    else:
        if sources is not None:
            data = MixtureData(
                sources, weights, collate, cfg.train.batch_size, cfg.seed, cfg.data.num_workers
            )
        elif cfg.data.sampler == "ddwa":
            from .data.ddwa import DDWAData

            data = DDWAData(train_set, collate, cfg.train.batch_size, cfg.seed, cfg.data.ddwa)
        else:
            data = MapData(
                ListDataset(train_set), collate, cfg.train.batch_size, cfg.seed, cfg.data.num_workers
            )
        trainer = Trainer(model, data, cfg.train, out, log=log)
        last = trainer.fit(resume=resume)
        model = unsharded(trainer, model, lambda: MultiModalModel.from_config(cfg.fusion_model, tokenizer))
    result: dict[str, Any] = {"run_dir": str(out), "train": last, "eval": None}
    if is_main:
        finish_model(student, cfg.train, out, log)
        model.save_pretrained(out / "model")
        if sources is not None:
            plot = plot_run_mixture(out, list(sources))
            if plot is not None:
                log(f"realised vs target mixture: {plot}")
    return result


def evaluate_task(cfg: RunConfig, model, split: str = "test") -> dict[str, Any]:
    """Accuracy of a fusion model on `split` of the configured task, with every modality and with each one
    removed (E4)."""
    from .eval.missing import missing_modality_eval

    samples = task_samples(cfg, split)
    collate = task_collate(cfg, model.tokenizer)
    size = cfg.eval.batch_size
    accuracy = missing_modality_eval(
        model, [collate(samples[i : i + size]) for i in range(0, len(samples), size)]
    )
    metrics: dict[str, Any] = {
        "split": split,
        "task": cfg.task.name,
        "fusion": model.config.fusion,
        "n": len(samples),
    }
    metrics.update({f"accuracy_{k}": v for k, v in accuracy.items()})
    return metrics


def probe_eval_hook(cfg: RunConfig, split: str = "val"):
    """on_eval for probe stages: the probe's accuracy on `split` (loaded once, on first use)."""
    from .train.stages import probe_accuracy

    cache: dict[str, Any] = {}

    def on_eval(model, step: int) -> dict[str, float]:
        if "data" not in cache:
            cache["data"] = load_split(cfg, split)
        return {"probe_accuracy": probe_accuracy(model, cache["data"], cfg.eval.batch_size)}

    return on_eval


def evaluate_probe(cfg: RunConfig, model_dir: Path, split: str = "test") -> dict[str, Any]:
    """Accuracy of a saved CL-FT probe (model_dir/probe.safetensors) on `split`."""
    from .train.stages import ContrastiveProbe, probe_accuracy

    model = ContrastiveProbe.from_pretrained(model_dir)
    if cfg.model.image.image_size != model.image_size:
        cfg = cfg.model_copy(update={"model": model.config})
    dataset = load_split(cfg, split)
    return {
        "probe_label": model.config.probe.label,
        "probe_accuracy": probe_accuracy(model, dataset, cfg.eval.batch_size),
        "probe_n": len(dataset),
        "probe_chance": 1.0 / len(model.classes),
    }


def train(
    cfg: RunConfig,
    resume: bool = False,
    overwrite: bool = False,
    log=print,
    on_eval=None,
) -> dict[str, Any]:
    """Train the configured model; returns {"run_dir", "train": last metrics, "eval": metrics or None}.

    With `train.stages` the run goes through them in order (mmfusion.train.stages). `on_eval(model,
    step)` replaces the default evaluation hook of probe stages (the probe's val accuracy)."""
    from .models.contrastive import ContrastiveModel
    from .train.trainer import Trainer

    if cfg.task is not None:
        return train_task(cfg, resume, overwrite, log)
    if cfg.train.parallel.tensor.size > 1:
        raise ConfigError(
            "train.parallel.tensor.size > 1: the two-tower contrastive loss gathers features over every rank, "
            "which tensor-parallel groups would duplicate; tensor parallel is for task (fusion) runs"
        )
    out, is_main = _prepare_run_dir(cfg, resume, overwrite)
    seed_everything(cfg.seed)
    train_set = load_split(cfg, "train", progress=is_main and cfg.train.progress)
    if not resume and is_main:
        text_cfg = cfg.model.text
        if text_cfg.tokenizer or cfg.train.init_from:  # init_from: the tokenizer of the model it starts from
            source = Path(text_cfg.tokenizer or init_tokenizer(cfg.train) or cfg.train.init_from)
            source = source / "tokenizer.json" if source.is_dir() else source
            if not source.is_file():
                key = "model.text.tokenizer" if text_cfg.tokenizer else "train.init_from"
                raise ConfigError(f"{key} = {str(source.parent)!r}: no tokenizer.json there")
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
    if cfg.model.probe is not None:
        from .train.stages import ContrastiveProbe

        model = ContrastiveProbe(cfg.model, tokenizer)
    else:
        model = ContrastiveModel(cfg.model, tokenizer)
    if is_main:
        n_params = sum(p.numel() for p in model.parameters())
        probe = f" + {cfg.model.probe.label} probe" if cfg.model.probe is not None else ""
        log(f"model: two-tower contrastive{probe}, {n_params / 1e6:.2f}M parameters; run directory {out}")
    prepare_model(model, cfg.train, resume, log if is_main else _quiet)
    if cfg.train.stages:
        from .train.stages import fit_stages

        def make_data(i, stage):
            label = cfg.model.probe.label if stage.objective == "probe" else None
            subset = stage_subset(train_set, i, stage.n_train)
            return build_train_data(cfg, subset, tokenizer, stage.batch_size, label)

        def on_eval_for(i, stage):
            if stage.objective != "probe":
                return None
            return on_eval or probe_eval_hook(cfg)

        last = fit_stages(
            model, cfg.train, out, make_data, resume=resume, log=log, on_eval_for=on_eval_for, is_main=is_main
        )
    else:
        trainer = Trainer(model, build_train_data(cfg, train_set, tokenizer), cfg.train, out, log=log)
        last = trainer.fit(resume=resume)
        model = unsharded(trainer, model, lambda: type(model)(cfg.model, tokenizer))
    result: dict[str, Any] = {"run_dir": str(out), "train": last, "eval": None}
    if is_main:
        finish_model(model, cfg.train, out, log)
        model.save_pretrained(out / "model")
    return result
