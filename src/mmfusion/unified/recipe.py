"""A unified run through the common Trainer (`model.kind: unified`): tokenizers prepared once per run directory,
the decoder wrapped as a Batch -> ModelOutput model, task-mixed data, and the model folder saved at the end.

    setup = prepare_unified(cfg.model, train_rows, run_dir, is_main=..., log=log, seed=cfg.seed)
    model = setup.build_model()             # UnifiedModel: forward(Batch) -> ModelOutput(loss, metrics)
    data = setup.train_data(cfg.train.batch_size, cfg.seed, cfg.data.num_workers)
    Trainer(model, data, cfg.train, run_dir).fit()
    setup.bundle(model.decoder).save(run_dir / "model")

`fit_unified` does exactly that (and is what `mmfusion train` calls for a unified run).

The run directory keeps what the tokenizer preparation made, in `unified/` (image_tokenizer/, text/, optional
audio_tokenizer/, vocab.json, prepared.json last): the main process trains the VQ-VAE and the
BPE on the training split unless the config names them, every process then loads them from there, and a
resumed run reuses them, so every rank and every restart tokenizes identically.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..batch import Batch
from ..errors import ConfigError, DataError
from ..modalities.image import preprocess_image
from ..modalities.text import TextTokenizer
from ..models.contrastive import ModelOutput
from ..models.vq import VQVAE, AudioFrontEnd
from ..train import distributed as dist_utils
from ..train.config import refuse_train_settings
from .bundle import UnifiedBundle, code_count, load_audio_tokenizer, save_audio_tokenizer
from .config import UnifiedModelConfig
from .model import UnifiedConfig, UnifiedDecoder, unified_loss
from .rows import Example, ExampleDataset, MixedTaskData, UnifiedCollate, peek_rows, qa_pairs, row_examples
from .sequences import SequenceBuilder, UnifiedVocab

PREPARED = "unified"  # the run directory's folder of prepared tokenizers
CONTEXT_LENGTH = 64  # the text tokenizer's context (unused by the decoder, which has its own max_len)


class UnifiedModel(nn.Module):
    """The decoder as a Trainer model: forward(Batch of UnifiedCollate) -> ModelOutput.

    loss = (sum of token ce + z_loss * sum of (log Z)^2 over the trained tokens) / norm, where norm is the
    batch's meta["loss_norm"] (MixedTaskData: the step's trained tokens / micro-batches) or, without one, the
    batch's own trained tokens (the token mean of `unified_loss`). Metrics: ce, ce_text / ce_image and
    n_text / n_image (no task has audio targets), z_loss, log_z_abs, max_attn_logit (training mode)."""

    def __init__(self, decoder: UnifiedDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, batch: Batch) -> ModelOutput:
        if len(batch) == 0:  # every row of the micro-batch was skipped: a zero loss that reaches every weight
            return ModelOutput(sum((p * 0).sum() for p in self.parameters()), {})
        ids, mod, mask = batch["ids"], batch["modality"], batch["loss_mask"]
        out = self.decoder(ids, mod)
        losses = unified_loss(out.logits.float(), ids, mod, mask, z_loss=self.decoder.cfg.z_loss)
        loss = losses["loss"]
        norm = batch.meta.get("loss_norm")
        if norm is not None:
            n = mask[:, 1:].sum()
            loss = loss * (n / norm) if float(n) != norm else loss
        metrics: dict[str, Any] = {k: losses[k].detach() for k in ("ce", "z_loss", "log_z_abs")}
        for m in ("text", "image"):
            metrics[f"ce_{m}"] = losses[f"ce_{m}"].detach()
            metrics[f"n_{m}"] = losses[f"n_{m}"]
        if out.max_attn_logit == out.max_attn_logit:  # computed (not NaN)
            metrics["max_attn_logit"] = out.max_attn_logit
        return ModelOutput(loss, metrics)


@dataclass
class UnifiedSetup:
    """What `prepare_unified` made: the tokenizers and vocabulary, the decoder's config, the training
    examples (with their trained-token counts) over `rows`, and the rows skipped at preparation by reason."""

    config: UnifiedModelConfig
    vocab: UnifiedVocab
    text_tokenizer: TextTokenizer
    vqvae: VQVAE
    audio_vqvae: VQVAE | None
    audio_frontend: AudioFrontEnd | None
    decoder_config: UnifiedConfig
    rows: Any
    examples: list[Example]
    targets: list[int]
    skipped: Counter

    @property
    def task_sizes(self) -> dict[str, int]:
        return dict(Counter(e.task for e in self.examples))

    @property
    def collate(self) -> UnifiedCollate:
        return UnifiedCollate(
            self.vocab,
            self.text_tokenizer,
            self.vqvae,
            self.audio_vqvae,
            self.audio_frontend,
            self.decoder_config.max_len,
        )

    def build_model(self) -> UnifiedModel:
        """A fresh decoder (seed torch first for a reproducible initialisation)."""
        return UnifiedModel(UnifiedDecoder(self.decoder_config))

    def train_data(self, batch_size: int, seed: int, num_workers: int = 0) -> MixedTaskData:
        return MixedTaskData(
            ExampleDataset(self.rows, self.examples),
            self.targets,
            self.collate,
            batch_size,
            seed,
            self.config.temperature,
            num_workers,
        )

    def bundle(self, decoder: UnifiedDecoder) -> UnifiedBundle:
        return UnifiedBundle(
            decoder,
            self.vocab,
            self.text_tokenizer,
            self.vqvae,
            self.audio_vqvae,
            self.audio_frontend,
            self.config,
        )


# ---- preparing the tokenizers ------------------------------------------------------------------------------


def _training_images(cfg: UnifiedModelConfig, rows: Any, peeked: Sequence[Any]) -> torch.Tensor:
    """The first `image_tokenizer.train_images` readable images of the rows, resized, (N, 3, S, S) in [-1, 1]."""
    from ..data.sources import SkippedSample
    from ..modalities.base import read_field

    size, limit = cfg.image_tokenizer.image_size, cfg.image_tokenizer.train_images
    out = []
    for i, row in enumerate(peeked):
        if len(out) >= limit:
            break
        if isinstance(row, SkippedSample) or read_field(row, "image") is None:
            continue
        sample = rows[i]  # a manifest decodes its media here
        if isinstance(sample, SkippedSample):
            continue
        try:
            out.append(preprocess_image(read_field(sample, "image"), size))
        except (DataError, TypeError, ValueError):
            continue
    if not out:
        raise DataError(
            "no readable training image to train the image tokenizer on (for data without images, name a "
            "trained one: model.image_tokenizer.path)"
        )
    return torch.stack(out)


def _image_tokenizer(cfg: UnifiedModelConfig, rows, peeked, seed: int, log, progress: bool) -> VQVAE:
    from .train import evaluate_vqvae, train_vqvae

    t = cfg.image_tokenizer
    if t.path is not None:
        if not (Path(t.path) / "config.json").is_file():
            raise ConfigError(
                f"model.image_tokenizer.path = {t.path!r}: not a tokenizer folder (`mmfusion tokenize train`)"
            )
        vq = VQVAE.from_pretrained(t.path)
        if "image_size" in t.model_fields_set and vq.image_size != t.image_size:
            raise ConfigError(
                f"model.image_tokenizer.image_size = {t.image_size}, but the tokenizer at {t.path} works on "
                f"{vq.image_size}px images; leave image_size out"
            )
        return vq
    pixels = _training_images(cfg, rows, peeked)
    torch.manual_seed(seed)
    vq = VQVAE(
        image_size=t.image_size,
        channels=t.channels,
        quantizer=t.kind,
        codebook_size=t.codebook_size,
        code_dim=t.code_dim,
        dead_code_threshold=3.0,
    )
    train_vqvae(vq, pixels, t.steps, batch_size=t.batch_size, lr=t.lr, seed=seed, progress=progress)
    stats = evaluate_vqvae(vq, pixels[:256])
    log(
        f"image tokenizer ({t.kind}, {t.steps} steps on {len(pixels)} training images): usage "
        f"{stats['usage']:.3f}, PSNR {stats['psnr']:.2f} dB, {code_count(vq)} tokens per image"
    )
    return vq


def _text_tokenizer(cfg: UnifiedModelConfig, peeked, out: Path) -> None:
    """Write out/tokenizer.json: the configured one, or a BPE of the rows' captions, questions and answers."""
    from ..data.sources import SkippedSample
    from ..modalities.base import read_field

    if cfg.text_tokenizer is not None:
        src = Path(cfg.text_tokenizer)
        src = src / "tokenizer.json" if src.is_dir() else src
        if not src.is_file():
            raise ConfigError(f"model.text_tokenizer = {cfg.text_tokenizer!r}: no tokenizer.json there")
        shutil.copyfile(src, out / "tokenizer.json")
        return
    rows = [r for r in peeked if not isinstance(r, SkippedSample)]
    texts = [t for r in rows if isinstance(t := read_field(r, "text"), str) and t.strip()]
    texts += [t for r in rows for _, q, a in qa_pairs(r) for t in (q, a)]
    if not texts:
        raise DataError("the training rows have no captions, questions or answers to train the text BPE on")
    TextTokenizer.train(texts, vocab_size=cfg.text_vocab_size, context_length=CONTEXT_LENGTH).save(out)


def _prepare_folder(cfg: UnifiedModelConfig, rows, peeked, folder: Path, seed: int, log, progress) -> None:
    """Train / copy the tokenizers into `folder` and write the vocabulary (main process)."""
    audio_vq, frontend = load_audio_tokenizer(cfg.audio_tokenizer) if cfg.audio_tokenizer else (None, None)
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "text").mkdir(parents=True)
    vq = _image_tokenizer(cfg, rows, peeked, seed, log, progress)
    vq.save_pretrained(folder / "image_tokenizer")
    if audio_vq is not None:
        save_audio_tokenizer(audio_vq, frontend, folder / "audio_tokenizer")
    _text_tokenizer(cfg, peeked, folder / "text")
    tok = TextTokenizer.load(folder / "text", context_length=CONTEXT_LENGTH)
    audio = (audio_vq.codebook_size, code_count(audio_vq)) if audio_vq is not None else (0, 0)
    UnifiedVocab(tok.vocab_size, vq.codebook_size, code_count(vq), *audio).save(folder / "vocab.json")


def _load_folder(folder: Path):
    vocab = UnifiedVocab.load(folder / "vocab.json")
    tok = TextTokenizer.load(folder / "text", context_length=CONTEXT_LENGTH)
    vq = VQVAE.from_pretrained(folder / "image_tokenizer").eval()
    audio = (None, None)
    if (folder / "audio_tokenizer").is_dir():
        audio = load_audio_tokenizer(folder / "audio_tokenizer")
        audio[0].eval()
    return vocab, tok, vq, *audio


def _example_targets(
    examples: list[Example], peeked, builder: SequenceBuilder
) -> tuple[list[int], list[int]]:
    """(sequence length, trained tokens) of every example, from its texts alone (media are not needed: an
    image or clip is always tokens_per_image / tokens_per_audio codes)."""
    from .rows import example_fields

    v = builder.vocab
    image = torch.zeros(v.tokens_per_image, dtype=torch.long)
    audio = torch.zeros(max(v.tokens_per_audio, 1), dtype=torch.long)
    lengths, targets = [], []
    for ex in examples:
        s = example_fields(peeked[ex.row], ex)
        if ex.task == "caption":
            seq = builder.caption(image, s["text"])
        elif ex.task == "image":
            seq = builder.image(s["text"], image)
        elif ex.task == "vqa":
            seq = builder.vqa(image, s["question"], s["answer"])
        else:
            seq = builder.audio_caption(audio, s["text"])
        lengths.append(len(seq.ids))
        targets.append(int(seq.loss_mask.sum()))
    return lengths, targets


def prepare_unified(
    cfg: UnifiedModelConfig,
    rows: Any,
    run_dir: str | Path,
    *,
    is_main: bool = True,
    log: Callable[[str], None] = print,
    seed: int = 0,
    progress: bool = False,
) -> UnifiedSetup:
    """Tokenizers, vocabulary, decoder config and training examples of a unified run over `rows` (a map-style
    dataset of sample dicts: a JsonlDataset, a ListDataset, a list).

    The main process prepares `run_dir`/unified/ unless it already holds a preparation of this same config
    (a resumed run); then every process waits for it (a barrier) and loads it, so all of them tokenize alike.
    Rows that give no example are counted in `skipped` by reason (the Trainer adds these to its own counts)."""
    folder = Path(run_dir) / PREPARED
    peeked = peek_rows(rows)
    want = {"config": cfg.model_dump(mode="json"), "rows": len(peeked), "seed": seed}
    marker = folder / "prepared.json"
    ready = marker.is_file() and json.loads(marker.read_text()).get("key") == want
    if is_main and not ready:
        _prepare_folder(cfg, rows, peeked, folder, seed, log, progress)
        marker.write_text(json.dumps({"key": want}, indent=2) + "\n")
    dist_utils.barrier()
    vocab, tok, vq, audio_vq, frontend = _load_folder(folder)
    has_audio = audio_vq is not None
    examples, skipped_rows = row_examples(peeked, has_audio, cfg.tasks, cfg.uncond_every)
    if not examples:
        raise DataError(
            f"no training examples in {len(peeked)} rows: a row needs image + text (captioning), image + "
            "question + answer (VQA) or audio + text (audio captioning, with model.audio_tokenizer)"
        )
    builder = SequenceBuilder(vocab, tok)
    lengths, targets = _example_targets(examples, peeked, builder)
    max_len = cfg.max_len or max(lengths) + 32
    skipped = Counter(reason for _, reason in skipped_rows)
    if max(lengths) > max_len:
        keep = [i for i, n in enumerate(lengths) if n <= max_len]
        skipped["too_long"] += len(examples) - len(keep)
        examples, targets = [examples[i] for i in keep], [targets[i] for i in keep]
    dcfg = UnifiedConfig(vocab.size, dim=cfg.width, max_len=max_len, **cfg.decoder_options())
    setup = UnifiedSetup(cfg, vocab, tok, vq, audio_vq, frontend, dcfg, rows, examples, targets, skipped)
    if is_main:
        sizes = ", ".join(f"{t} {n}" for t, n in setup.task_sizes.items())
        gone = ", ".join(f"{r}={n}" for r, n in sorted(skipped.items()))
        log(
            f"unified data: {len(examples)} sequences from {len(peeked)} rows ({sizes}); vocabulary "
            f"{vocab.size} ids; max_len {max_len}" + (f"; skipped {gone}" if gone else "")
        )
    return setup


# ---- the run ----------------------------------------------------------------------------------------------


def image_size(cfg: UnifiedModelConfig) -> int:
    """The side images are tokenized at: `image_tokenizer.image_size`, or the named tokenizer folder's."""
    t = cfg.image_tokenizer
    if t.path is None or "image_size" in t.model_fields_set:
        return t.image_size
    try:
        return int(json.loads((Path(t.path) / "config.json").read_text())["model"]["image_size"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"model.image_tokenizer.path = {t.path!r}: not a tokenizer folder (`mmfusion tokenize train`)"
        ) from None


def load_rows(data: Any, cfg: UnifiedModelConfig, split: str, progress: bool = False) -> Any:
    """The rows of `split` ("train" | "val" | "test") of a run's `data:` section for a unified model: the
    synthetic world's scenes (image, caption, VQA pairs, and audio when the model has an audio tokenizer),
    rendered at the tokenizer's image size, or a JSONL manifest's rows with whatever fields each has."""
    if data.source == "synthetic":
        from ..data.loader import ListDataset
        from ..data.synthetic import SyntheticWorld, WorldConfig, make_split

        s = data.synthetic
        world = SyntheticWorld(
            WorldConfig(seed=s.seed, image_size=image_size(cfg), object_count_probs=s.object_count_probs)
        )
        n = (
            s.size(split)
            if hasattr(s, "size")
            else {"train": s.n_train, "val": s.n_val, "test": s.n_test}[split]
        )
        mods = ("image", "text", "vqa") + (("audio",) if cfg.audio_tokenizer else ())
        return ListDataset(make_split(world, split, n, mods, progress=progress))
    if data.source != "jsonl":
        raise ConfigError(
            f"data.source = {data.source!r}: a unified model reads synthetic or jsonl data (map-style rows)"
        )
    path = getattr(data, split)
    if not path:
        raise ConfigError(
            f"data.{split} is not set: a unified run on jsonl data needs it for the {split} split"
        )
    from ..data.sources import JsonlDataset

    return JsonlDataset(path, modalities=None, on_error=data.on_error)


def check_train_settings(train: Any) -> None:
    """ConfigError for the `train:` settings a unified run does not support yet."""
    refuse_train_settings(
        train,
        "unified",
        "data parallel DDP, accumulation, checkpoints and resume work",
        {
            "grad_checkpointing": bool(train.grad_checkpointing),
            "modality_accumulation": any(k > 1 for k in train.modality_accumulation.values()),
        },
    )


def fit_unified(
    cfg: UnifiedModelConfig,
    train: Any,
    rows: Any,
    run_dir: str | Path,
    *,
    seed: int = 0,
    resume: bool = False,
    is_main: bool = True,
    log: Callable[[str], None] = print,
    num_workers: int = 0,
    eval_rows: Any = None,
    eval_max_rows: int | None = 200,
    on_eval: Callable[[nn.Module, int], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Train a unified model on `rows` with the common Trainer (`train`: a TrainConfig) in `run_dir`, then
    (main process) write `run_dir`/model, a UnifiedBundle folder; returns the last logged metrics.

    Every `train.eval_every` steps the Trainer calls `on_eval`, by default `evaluate_unified` on the first
    `eval_max_rows` of `eval_rows` (held-out rows; logged as val/<metric>)."""
    from ..train.trainer import Trainer
    from .evaluate import eval_hook

    check_train_settings(train)
    if train.threads:  # before the tokenizers train, not only from the Trainer on
        torch.set_num_threads(train.threads)
    run_dir = Path(run_dir)
    setup = prepare_unified(cfg, rows, run_dir, is_main=is_main, log=log, seed=seed, progress=train.progress)
    torch.manual_seed(seed)
    model = setup.build_model()
    if is_main:
        n = sum(p.numel() for p in model.parameters())
        log(f"model: unified decoder, {n / 1e6:.2f}M parameters; run directory {run_dir}")
    if on_eval is None and eval_rows is not None:
        on_eval = eval_hook(setup, eval_rows, eval_max_rows)
    data = setup.train_data(train.batch_size, seed, num_workers)
    trainer = Trainer(model, data, train, run_dir, log=log, on_eval=on_eval)
    if not resume and trainer.is_main:  # a resumed run's checkpoint already holds them
        trainer.skipped.update(setup.skipped)
    last = trainer.fit(resume=resume)
    if trainer.is_main:
        info = {"train": train.model_dump(mode="json"), "tasks": setup.task_sizes, "last": last}
        setup.bundle(model.decoder).save(run_dir / "model", info)
    return last


__all__ = [
    "UnifiedModel",
    "image_size",
    "load_rows",
    "UnifiedSetup",
    "check_train_settings",
    "fit_unified",
    "prepare_unified",
]
