"""A training run, whatever the model: config -> datasets -> tokenizer -> model -> Collate -> Trainer -> model folder.

    source (data:) -> modality specs -> Collate -> Batch -> model (model.kind) -> Trainer (train:)

runs/<name>/config.yaml        resolved config snapshot
           tokenizer.json      trained on the training texts (reused on --resume and by every rank)
           checkpoints/        step-N/ {model,optimizer}.safetensors + state.json + MANIFEST.json
           metrics.jsonl       training log; tensorboard/ the same as TensorBoard events
           model/              final save_pretrained folder (config.json, model.safetensors, tokenizer.json)
           metrics.json        evaluation (mmfusion.evaluate); plots/*.png
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .config import RunConfig, dump_config
from .data.collate import Target
from .data.splits import (
    dataset_texts,
    dataset_values,
    mixture_sources,
    open_split,
    source_fields,
    stage_subset,
)
from .errors import ConfigError, DataError
from .modalities.clip_tokenizer import load_text_tokenizer
from .modalities.text import TextTokenizer
from .train import distributed as dist_utils
from .train.model_setup import finish_model, init_tokenizer, prepare_model
from .train.rng import seed_everything


def _quiet(_message: str) -> None:
    """A log function for the ranks that do not print."""


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


# ---- what a run reads ---------------------------------------------------------------------------------------
def model_inputs(cfg: RunConfig) -> dict[str, str]:
    """Batch key -> modality kind of the configured model's inputs."""
    if cfg.kind == "fusion":
        return {k: c.kind for k, c in sorted(cfg.model.encoders.items())}
    return {"image": "image", "text": "text"}


def text_field(cfg: RunConfig) -> str | None:
    """The sample field the model's text input reads (None: the model reads no text)."""
    keys = [k for k, kind in model_inputs(cfg).items() if kind == "text"]
    return cfg.data.inputs.get(keys[0], keys[0]) if keys else None


def load_split(cfg: RunConfig, split: str, progress: bool = False, data=None):
    """The dataset of `split` for the configured model (`data`: a stage's own data section)."""
    data = data or cfg.data
    if cfg.kind == "contrastive":
        return open_split(data, split, ("image", "text"), True, cfg.seed, progress)
    if cfg.kind == "vlm":  # captions, or question + answer rows (read from the sample's meta)
        return open_split(data, split, ("image", "text"), False, cfg.seed, progress)
    return open_split(data, split, source_fields(data, model_inputs(cfg)), False, cfg.seed, progress)


def fusion_target(cfg: RunConfig, model_config) -> Target:
    """The Collate target of a fusion run: data.target's field, the model's classes (or class count)."""
    classes = tuple(model_config.classes) if model_config.classes else None
    n = None if classes else (model_config.n_classes if model_config.head == "classify" else 2)
    return Target(cfg.data.target.field, classes, n)


def infer_classes(cfg: RunConfig, train_set) -> RunConfig:
    """A fusion run whose target names no classes: string labels -> their sorted distinct values in the
    training split, integer labels -> max + 1 classes (unless model.n_classes is set). Deterministic, so
    every rank and a resumed run agree."""
    if cfg.kind != "fusion" or cfg.model.classes is not None or cfg.model.head != "classify":
        return cfg
    if cfg.data.source == "synthetic":
        return cfg  # a synthetic task fills in its own classes / n_classes
    values = dataset_values(train_set, cfg.data.target.field)
    if not values:
        raise DataError(
            f"no training sample has the target field {cfg.data.target.field!r} (data.target.field)"
        )
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if "n_classes" in cfg.model.model_fields_set:
            return cfg
        update: dict[str, Any] = {"n_classes": max(2, max(values) + 1)}
    else:
        update = {"classes": sorted({str(v) for v in values})}
        if len(update["classes"]) < 2:
            raise DataError(
                f"data.target.field {cfg.data.target.field!r} has one class only: {update['classes']}"
            )
        update["n_classes"] = len(update["classes"])
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=update)})


# ---- the run directory and the tokenizer ----------------------------------------------------------------------
def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> tuple[Path, bool]:
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


def _tokenizer_settings(cfg: RunConfig) -> tuple[str | None, int, int, str]:
    """(a tokenizer.json to reuse or None, vocab size, context length, the config key that sets the path)."""
    if cfg.kind == "contrastive":
        t = cfg.model.text
        return t.tokenizer, t.vocab_size, t.context_length, "model.text.tokenizer"
    t = cfg.data.tokenizer
    return t.path, t.vocab_size, t.context_length, "data.tokenizer.path"


def write_tokenizer(cfg: RunConfig, out: Path, train_set) -> None:
    """<run>/tokenizer.json: the given one, the init_from model's, or BPE trained on the training texts."""
    field = text_field(cfg)
    if field is None or cfg.kind == "vlm" or hf_text(cfg):  # vlm / HF towers bring their own tokenizer
        return
    path, vocab, context, key = _tokenizer_settings(cfg)
    if path or cfg.train.init_from:  # init_from: the tokenizer of the model it starts from
        source = Path(path or init_tokenizer(cfg.train) or cfg.train.init_from)
        source = source / "tokenizer.json" if source.is_dir() else source
        if not source.is_file():
            raise ConfigError(
                f"{key if path else 'train.init_from'} = {str(source.parent)!r}: no tokenizer.json there"
            )
        shutil.copyfile(source, out / "tokenizer.json")
        return
    texts = dataset_texts(train_set, field)
    if not texts:
        raise DataError(f"the training split has no texts (field {field!r}) to train the tokenizer on")
    TextTokenizer.train(texts, vocab, context).save(out)


def hf_text(cfg: RunConfig) -> bool:
    """A two-tower run whose text tower is a pretrained HF encoder (`model.text.hf`): it brings its tokenizer."""
    return cfg.kind == "contrastive" and cfg.model.text.hf is not None


def load_tokenizer(cfg: RunConfig, out: Path) -> TextTokenizer | None:
    if text_field(cfg) is None or cfg.kind == "vlm" or hf_text(cfg):
        return None
    if cfg.kind == "contrastive" and cfg.model.text.arch == "clip":  # model.text.tokenizer: a CLIP one
        t = cfg.model.text
        return load_text_tokenizer(out, t.context_length, t.arch, t.vocab_size)
    return TextTokenizer.load(out, _tokenizer_settings(cfg)[2])


# ---- models ----------------------------------------------------------------------------------------------------
def build_model(cfg: RunConfig, tokenizer: TextTokenizer | None):
    """A fresh model of the configured kind (seeded by the caller)."""
    if cfg.kind == "fusion":
        from .models.multimodal import MultiModalModel

        return MultiModalModel.from_config(cfg.model, tokenizer)
    if cfg.kind == "vlm":
        from .models.vlm import VLMModel

        return VLMModel.from_config(cfg.model)
    if cfg.model.probe is not None:
        from .train.stages import ContrastiveProbe

        return ContrastiveProbe(cfg.model, tokenizer)
    from .models.contrastive import ContrastiveModel

    return ContrastiveModel(cfg.model, tokenizer)


def check_vlm_lora(model, targets: list[str]) -> None:
    """train.lora.targets of a vlm run must name the LM's linear layers only (the image tower stays frozen)."""
    from .train.lora import resolve_targets

    try:
        names = resolve_targets(model.lm, targets)
    except ConfigError as e:
        raise ConfigError(
            f"train.lora.targets: {e}; a vlm model adapts its LM (e.g. q_proj, v_proj for Llama / Qwen2, "
            "c_attn for GPT-2)"
        ) from None
    if len(resolve_targets(model, targets)) != len(names):
        raise ConfigError(
            f"train.lora.targets = {targets}: some patterns also match the image tower or projector; name the "
            "LM's layers only (e.g. q_proj, v_proj)"
        )


def describe(cfg: RunConfig, model, out: Path) -> str:
    n = sum(p.numel() for p in model.parameters()) / 1e6
    if cfg.kind == "fusion":
        where = (
            f"task {cfg.data.synthetic.task}" if cfg.data.source == "synthetic" else f"{cfg.data.source} data"
        )
        return f"model: {model.config.fusion} fusion over {', '.join(model.modalities)}, {n:.2f}M parameters; {where}; run directory {out}"
    if cfg.kind == "vlm":
        lm = type(model.lm).__name__
        return (
            f"model: image tower -> projector -> {lm} ({cfg.model.lm.hf}), {n:.2f}M parameters, "
            f"{model.num_image_tokens} image tokens; run directory {out}"
        )
    probe = f" + {cfg.model.probe.label} probe" if cfg.model.probe is not None else ""
    return f"model: two-tower contrastive{probe}, {n:.2f}M parameters; run directory {out}"


def model_collate(cfg: RunConfig, model, probe_label: str | None = None):
    """The Collate of `model` for this run (a probe stage: the probe label as target)."""
    if cfg.kind == "fusion":
        return model.collate(cfg.data.inputs, fusion_target(cfg, model.config))
    target = None
    if probe_label is not None:
        from .train.stages import probe_target

        target = probe_target(probe_label)
    return model.collate(target)


def train_data(cfg: RunConfig, dataset, collate, batch_size: int, data=None, sources=None):
    """TrainData (the Trainer's step iteration) over `dataset`: shuffled epochs, a stream, a mixture, or DDWA."""
    from torch.utils.data import IterableDataset

    from .data.loader import MapData, MixtureData, StreamData

    data = data or cfg.data
    if sources is not None:
        return MixtureData(
            sources, mixture_weights(data, sources), collate, batch_size, cfg.seed, data.num_workers
        )
    if isinstance(dataset, IterableDataset):
        from .data.sources import count_samples

        n = dataset.num_samples() if hasattr(dataset, "num_samples") else count_samples(data.train)
        return StreamData(dataset, collate, batch_size, n, data.num_workers)
    if data.sampler == "ddwa":
        from .data.ddwa import DDWAData

        return DDWAData(dataset, collate, batch_size, cfg.seed, data.ddwa)
    return MapData(dataset, collate, batch_size, cfg.seed, data.num_workers)


def mixture_weights(data, sources: dict[str, Any]):
    """The target mixture `data.mixture.weighting` describes: K floats or a CurriculumSchedule."""
    from .data import samplers

    mix = data.mixture
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


def probe_eval_hook(cfg: RunConfig, split: str = "val"):
    """on_eval for probe stages: the probe's accuracy on `split` (loaded once, on first use)."""
    from .train.stages import probe_accuracy

    cache: dict[str, Any] = {}

    def on_eval(model, step: int) -> dict[str, float]:
        if "data" not in cache:
            cache["data"] = load_split(cfg, split)
        return {"probe_accuracy": probe_accuracy(model, cache["data"], cfg.eval.batch_size)}

    return on_eval


# ---- the run ---------------------------------------------------------------------------------------------------
def train(
    cfg: RunConfig, resume: bool = False, overwrite: bool = False, log=print, on_eval=None
) -> dict[str, Any]:
    """Train the configured model; returns {"run_dir", "train": last metrics, "eval": None}.

    With `train.stages` the run goes through them in order (mmfusion.train.stages), each on its own
    `stages[i].data` when given. `on_eval(model, step)` replaces the default evaluation hook of probe stages."""
    from .train.trainer import Trainer

    if cfg.kind == "unified":
        return train_unified(cfg, resume, overwrite, log)
    if cfg.kind == "diffusion":
        return train_diffusion(cfg, resume, overwrite, log)
    if cfg.kind == "contrastive" and cfg.train.parallel.tensor.size > 1:
        raise ConfigError(
            "train.parallel.tensor.size > 1: the two-tower contrastive loss gathers features over every rank, "
            "which tensor-parallel groups would duplicate; tensor parallel is for fusion models"
        )
    if cfg.kind == "vlm":  # its LM folder and tower run are checked before any data is read
        from .models.vlm import check_sources

        check_sources(cfg.model)
    out, is_main = prepare_run_dir(cfg, resume, overwrite)
    say = log if is_main else _quiet
    seed_everything(cfg.seed)
    train_set = load_split(cfg, "train", progress=is_main and cfg.train.progress)
    sources = None
    if cfg.data.mixture is not None:
        keys = list(model_inputs(cfg))
        sources = mixture_sources(cfg.data, keys, source_fields(cfg.data, model_inputs(cfg)), cfg.seed)
        train_set = [s for v in sources.values() for s in v] if cfg.data.source == "synthetic" else train_set
    cfg = infer_classes(cfg, train_set)
    if not resume and is_main:
        write_tokenizer(cfg, out, train_set)
        dump_config(cfg, out / "config.yaml")
    dist_utils.barrier()
    tokenizer = load_tokenizer(cfg, out)  # every rank and a resumed run read the one saved tokenizer
    seed_everything(cfg.seed)
    model = build_model(cfg, tokenizer)
    say(describe(cfg, model, out))
    if cfg.kind == "vlm" and cfg.train.lora is not None:
        check_vlm_lora(model, cfg.train.lora.targets)
    student = model
    prepare_model(model, cfg.train, resume, say)
    if cfg.train.distill is not None:
        from .train.distill import drop_labels, wrap_for_distillation

        train_set = drop_labels(list(train_set), cfg.train.distill.n_labelled)
        model = wrap_for_distillation(model, cfg.train.distill)
        say(f"distilling from {cfg.train.distill.teacher} ({cfg.train.distill.model_dump()})")
    if sources is not None:
        target = mixture_weights(cfg.data, sources)
        target = target(0) if callable(target) else target
        say("mixture (target at step 0): " + ", ".join(f"{n}={p:.3f}" for n, p in zip(sources, target)))
    if cfg.train.stages:
        from .train.stages import fit_stages

        def make_data(i, stage):
            label = cfg.model.probe.label if stage.objective == "probe" else None
            collate = model_collate(cfg, student, label)
            bs = stage.batch_size or cfg.train.batch_size
            if stage.data is not None:
                return train_data(
                    cfg,
                    stage_subset(load_split(cfg, "train", data=stage.data), i, stage.n_train),
                    collate,
                    bs,
                    stage.data,
                )
            if sources is not None:
                if stage.n_train is not None:
                    raise ConfigError(f"train.stages.{i}.n_train: a data.mixture run sizes its sources there")
                return train_data(cfg, None, collate, bs, sources=sources)
            return train_data(cfg, stage_subset(train_set, i, stage.n_train), collate, bs)

        def on_eval_for(i, stage):
            if stage.objective != "probe":
                return None
            return on_eval or probe_eval_hook(cfg)

        last = fit_stages(
            model, cfg.train, out, make_data, resume=resume, log=log, on_eval_for=on_eval_for, is_main=is_main
        )
    else:
        collate = model_collate(cfg, student)
        if cfg.train.distill is not None:
            from .train.distill import distillation_collate

            collate = distillation_collate(
                student, model.teacher, cfg.data.inputs, fusion_target(cfg, student.config)
            )
        data = train_data(cfg, train_set, collate, cfg.train.batch_size, sources=sources)
        trainer = Trainer(model, data, cfg.train, out, log=log)
        last = trainer.fit(resume=resume)
        model = unsharded(trainer, model, lambda: build_model(cfg, tokenizer))
    if is_main:
        finish_model(student, cfg.train, out, log)
        model.save_pretrained(out / "model")
        if sources is not None:
            plot = plot_run_mixture(out, list(sources))
            if plot is not None:
                log(f"realised vs target mixture: {plot}")
    return {"run_dir": str(out), "train": last, "eval": None}


def train_unified(cfg: RunConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict[str, Any]:
    """A unified model's run (mmfusion.unified.recipe): its rows, tokenizers prepared in the run directory, the
    common Trainer, the model folder <run>/model."""
    from .unified.recipe import fit_unified, load_rows

    out, is_main = prepare_run_dir(cfg, resume, overwrite)
    seed_everything(cfg.seed)
    rows = load_rows(cfg.data, cfg.model, "train", progress=is_main and cfg.train.progress)
    if not resume and is_main:
        dump_config(cfg, out / "config.yaml")
    val = load_rows(cfg.data, cfg.model, "val") if cfg.train.eval_every else None
    last = fit_unified(
        cfg.model,
        cfg.train,
        rows,
        out,
        seed=cfg.seed,
        resume=resume,
        is_main=is_main,
        log=log if is_main else _quiet,
        num_workers=cfg.data.num_workers,
        eval_rows=val,
    )
    return {"run_dir": str(out), "train": last, "eval": None}


def train_diffusion(
    cfg: RunConfig, resume: bool = False, overwrite: bool = False, log=print
) -> dict[str, Any]:
    """A joint diffusion model's run (mmfusion.diffusion.recipe): the synthetic world of data.synthetic rendered
    at the model's image size, the common Trainer with EMA, the model folder <run>/model."""
    from .data.synthetic import SyntheticWorld, WorldConfig
    from .diffusion.recipe import fit_diffusion

    if cfg.data.source != "synthetic" or cfg.data.synthetic.task is not None:
        raise ConfigError(
            f"data.source = {cfg.data.source!r}: a diffusion model trains on the synthetic world's scenes "
            "(data.source: synthetic without data.synthetic.task)"
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


__all__ = [
    "build_model",
    "load_split",
    "model_collate",
    "run_dir",
    "train",
    "train_diffusion",
    "train_unified",
]
