"""Composable multimodal model: per-modality encoders -> Linear to the fusion width -> fusion -> head (A12, E4).

    MultiModalModel(encoders={"image": "tiny", "text": "tiny"}, fusion="cross_attention",
                    head="classify", n_classes=25, tokenizer=tok)

is the same module as ``MultiModalModel.from_config(MultiModalConfig(...), tokenizer=tok)``; the seed's spelling
``MultiModalTransformer(text_encoder=..., image_encoder=..., fusion_method=...)`` (seed 004) builds it too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import Batch
from ..data.collate import Collate, Input, Target
from ..errors import CheckpointError, ConfigError
from ..fusion import FusionOutput, build_fusion
from ..layers import load_scalar_compat, scalar_parameter
from ..modalities import ENCODER_SIZES, MODALITIES, EncoderConfigBase
from ..modalities.audio import AudioEncoderConfig
from ..modalities.image import ImageEncoderConfig
from ..modalities.text import TextEncoderConfig, TextTokenizer
from ..modalities.video import VideoEncoderConfig
from .blocks import Head, build_encoder, modality_dropout, token_width  # noqa: F401 - re-exported
from .contrastive import ModelOutput
from .fusion_config import QUERY_PREFERENCE, MultiModalConfig, validate_section  # noqa: F401
from .persistence import load_weights, read_config, save_folder

MODEL_TYPE = "multimodal"


def _compute_dtype(device_type: str) -> str:
    """The dtype autocast runs matmuls in here and now: "bfloat16" / "float16", or "float32" when it is off."""
    if torch.is_autocast_enabled(device_type):
        return str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")
    return "float32"


# ---- the model --------------------------------------------------------------------------------------------
class MultiModalModel(nn.Module):
    """Encoders (one per batch key) -> per-modality LayerNorm + Linear to `dim` -> fusion -> head (A12).

    encoders: key -> built-in size ("tiny" | "small" | "base"), an encoder config (or dict), or an nn.Module with
              `forward_tokens(x) -> (B, N, width)`. Keys are the Batch's modality keys.
    A batch: data[key] per modality, mask[key] bool (B,) True = present, data["label"] (B,) int64 targets.
    Absent modalities: each encoder runs only on the rows where its modality is present (zeros elsewhere,
    and the fusion masks them), so placeholder rows can never change an output.
    Models holding nn.Module encoders train and predict, but cannot be saved (their config is unknown).
    """

    def __init__(
        self,
        encoders: Mapping[str, str | dict[str, Any] | EncoderConfigBase | nn.Module],
        fusion: str = "cross_attention",
        head: str = "classify",
        n_classes: int = 2,
        dim: int = 64,
        fusion_kwargs: dict[str, Any] | None = None,
        modality_dropout: float = 0.0,
        tokenizer: TextTokenizer | None = None,
        align_loss: float = 0.0,
        precision: Mapping[str, str] | None = None,
        classes: Sequence[str] | None = None,
    ):
        super().__init__()
        if not encoders:
            raise ConfigError("encoders: a model needs at least one encoder")
        modules = {k: v for k, v in encoders.items() if isinstance(v, nn.Module)}
        specs: dict[str, Any] = {}
        for key, spec in encoders.items():
            if isinstance(spec, nn.Module):
                continue
            if isinstance(spec, str) and spec.startswith("hf:"):  # a pretrained transformers text encoder
                spec = {"kind": "text", "hf": spec.removeprefix("hf:")}
            if isinstance(spec, str) and spec not in ENCODER_SIZES:
                raise ConfigError(
                    f"encoder {key!r}: unknown size {spec!r}; allowed: {', '.join(ENCODER_SIZES)} "
                    "(or pass an encoder config or an nn.Module)"
                )
            if isinstance(spec, EncoderConfigBase):
                spec = spec.model_dump()
            if isinstance(spec, str) and key == "text":
                spec = {"size": spec}
            hf = isinstance(spec, dict) and spec.get("hf")
            if (
                isinstance(spec, dict)
                and spec.get("kind", key) == "text"
                and tokenizer is not None
                and not hf
            ):
                # unset text sizes come from the tokenizer, so ids and positions always fit the encoder
                spec = {
                    "vocab_size": tokenizer.vocab_size,
                    "context_length": tokenizer.context_length,
                    **{k: v for k, v in spec.items() if v is not None},
                }
            specs[key] = spec
        # Module encoders are validated as a placeholder config (replaced below) so the rest is still checked.
        placeholder = {k: "tiny" for k in modules if k in MODALITIES}
        placeholder.update({k: {"kind": "image"} for k in modules if k not in MODALITIES})
        config = validate_section(
            MultiModalConfig,
            {
                "encoders": {**placeholder, **specs},
                "dim": dim,
                "fusion": fusion,
                "fusion_kwargs": fusion_kwargs or {},
                "head": head,
                "n_classes": len(classes) if classes is not None else n_classes,
                "classes": list(classes) if classes is not None else None,
                "modality_dropout": modality_dropout,
                "align_loss": align_loss,
                "precision": dict(precision or {}),
            },
        )
        self.config = config
        self.custom_encoders = sorted(modules)  # keys whose encoder is a user module (not serialisable)
        self.tokenizer = tokenizer
        names = sorted(config.encoders)
        self.encoders = nn.ModuleDict(
            {k: modules[k] if k in modules else build_encoder(config.encoders[k]) for k in names}
        )
        hf_tokenizers = [
            self.encoders[k].tokenizer
            for k in names
            if getattr(config.encoders[k], "hf", None) and k not in modules
        ]
        if hf_tokenizers:  # an HF text encoder brings its own tokenizer
            self.tokenizer = hf_tokenizers[0]
        self.projections = nn.ModuleDict(
            {
                k: nn.Sequential(nn.LayerNorm(token_width(enc)), nn.Linear(token_width(enc), config.dim))
                for k, enc in self.encoders.items()
            }
        )
        self.fusion = build_fusion(config.fusion, names, config.dim, **config.fusion_kwargs)
        self.head = Head(config.dim, config.n_classes if config.head == "classify" else 1)
        self._ran_in: dict[str, str] = {}  # part -> dtype name of its output in the last forward
        if config.align_loss > 0:
            self.align_proj = nn.ModuleDict({k: nn.Linear(config.dim, config.dim) for k in names})
            self.align_scale = scalar_parameter(math.log(1 / 0.07))  # (1,)
            load_scalar_compat(self, "align_scale")

    @classmethod
    def from_config(
        cls, config: MultiModalConfig | dict[str, Any], tokenizer: TextTokenizer | None = None
    ) -> MultiModalModel:
        """The model a (validated) MultiModalConfig describes: the same module as the equal constructor call."""
        if isinstance(config, dict):
            config = validate_section(MultiModalConfig, config)
        return MultiModalModel(
            encoders={k: v.model_dump() for k, v in config.encoders.items()},
            fusion=config.fusion,
            head=config.head,
            n_classes=config.n_classes,
            dim=config.dim,
            fusion_kwargs=dict(config.fusion_kwargs),
            modality_dropout=config.modality_dropout,
            tokenizer=tokenizer,
            align_loss=config.align_loss,
            precision=dict(config.precision),
            classes=config.classes,
        )

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def inputs(self, fields: Mapping[str, str] | None = None) -> dict[str, Input]:
        """The model's inputs for the one Collate: batch key -> Input(its modality, its encoder config, the
        sample field it reads: `fields.get(key)`, default the modality's name)."""
        fields = fields or {}
        return {
            k: Input(MODALITIES[c.kind], c, fields.get(k)) for k, c in sorted(self.config.encoders.items())
        }

    def collate(self, fields: Mapping[str, str] | None = None, target: Target | None = None) -> Collate:
        """Sample dicts -> Batch for this model (absent inputs masked); `target` (default: the "label" field,
        named by `config.classes` when it has them) adds data["label"]."""
        if target is None:
            classes = tuple(self.config.classes) if self.config.classes else None
            target = Target(
                "label",
                classes,
                None if classes else self.config.n_classes if self.config.head == "classify" else 2,
            )
        return Collate(self.inputs(fields), self.tokenizer, target)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- forward ----------------------------------------------------------------------------------------
    def _encoder_tokens(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """encoders[key].forward_tokens(x) (B, N, width), in the encoder's own precision when one is set."""
        enc, precision = self.encoders[key], self.config.precision.get(key)
        device_type = x.device.type
        if precision is None:
            self._ran_in[f"encoders.{key}"] = _compute_dtype(device_type)
            return enc.forward_tokens(x)
        if precision == "fp32":
            scope = torch.autocast(device_type, enabled=False)
        else:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            scope = torch.autocast(device_type, dtype=dtype)
        with scope:
            self._ran_in[f"encoders.{key}"] = _compute_dtype(device_type)
            y = enc.forward_tokens(x)
        return y.float()  # the projection runs under the run's policy (which casts again if it is not fp32)

    def modality_tokens(self, key: str, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Encode the present rows of modality `key` and project them: (B, ...) -> (B, N, dim), absent rows 0."""
        proj = self.projections[key]
        if bool(present.all()):
            return proj(self._encoder_tokens(key, x))
        if not bool(present.any()):  # one placeholder row only to learn N; its values are discarded
            shape = proj(self._encoder_tokens(key, x[:1])).shape
            return x.new_zeros((x.shape[0], *shape[1:]), dtype=torch.get_default_dtype())
        idx = present.nonzero().flatten()
        y = proj(self._encoder_tokens(key, x[idx]))  # (P, N, dim)
        return y.new_zeros((x.shape[0], *y.shape[1:])).index_copy(0, idx, y)

    def precision_report(self) -> dict[str, str]:
        """What each part ran in during the last forward: {"encoders.text": "bfloat16", ..., "fusion": ...,
        "head": ...}: the dtype autocast gave that part's matmuls (float32 where autocast was off); empty
        before the first forward. (Autocast keeps norms and softmax in fp32 whatever the region's dtype.)"""
        return dict(self._ran_in)

    def modality_parameters(self) -> dict[str, list[str]]:
        """Modality key -> the parameter-name prefixes that belong to it (its encoder and projection); used by
        per-modality gradient accumulation (train.modality_accumulation)."""
        return {k: [f"encoders.{k}.", f"projections.{k}."] for k in self.encoders}

    def encode(self, batch: Batch) -> FusionOutput:
        """Batch -> FusionOutput (pooled (B, dim), tokens, aux_loss, info). Applies modality dropout in training."""
        return self.encode_with_tokens(batch)[0]

    def encode_with_tokens(
        self, batch: Batch
    ) -> tuple[FusionOutput, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """encode() plus the projected per-modality tokens (B, N_m, dim) and the masks the fusion saw."""
        missing = [k for k in self.encoders if k not in batch.data]
        if missing:
            raise ConfigError(f"the batch has no {missing}; this model's modalities are {self.modalities}")
        device = self.device
        masks = {
            k: (batch.mask[k] if k in batch.mask else torch.ones(batch.data[k].shape[0], dtype=torch.bool))
            .to(device)
            .bool()
            for k in self.encoders
        }
        if self.training and self.config.modality_dropout > 0:
            masks = modality_dropout(masks, self.config.modality_dropout)
        feats = {k: self.modality_tokens(k, batch.data[k].to(device), masks[k]) for k in self.encoders}
        fused = self.fusion(feats, masks)
        self._ran_in["fusion"] = _compute_dtype(device.type)
        return fused, feats, masks

    def logits(self, batch: Batch) -> tuple[torch.Tensor, FusionOutput]:
        """(B, n_classes) for head="classify", (B,) for head="match"; and the fusion output."""
        fused = self.encode(batch)
        return self._head(fused), fused

    def logits_from_tokens(
        self, feats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Fusion + head on already projected tokens: feats key -> (B, N_k, dim) (`modality_tokens`), masks
        key -> (B,) bool (True = present) -> logits as `logits()` returns them. The fusion half of a split
        deployment and of the exported graph."""
        return self._head(self.fusion(feats, masks))

    def _head(self, fused: FusionOutput) -> torch.Tensor:
        out = self.head(fused.pooled)
        self._ran_in["head"] = _compute_dtype(out.device.type)
        return out.squeeze(-1) if self.config.head == "match" else out

    def alignment_loss(
        self, feats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> torch.Tensor:
        """Symmetric InfoNCE between the two modalities' pooled tokens over rows with label 1 and both present;
        0 when fewer than two such rows."""
        a, b = self.modalities
        rows = (labels == 1) & masks[a] & masks[b]
        if int(rows.sum()) < 2:
            return torch.zeros((), device=labels.device)
        za, zb = (F.normalize(self.align_proj[k](feats[k][rows].mean(dim=1)).float(), dim=-1) for k in (a, b))
        sim = self.align_scale.exp().clamp(max=100) * za @ zb.t()
        target = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2

    def forward(self, batch: Batch) -> ModelOutput:
        """Loss = task loss (cross-entropy / binary cross-entropy on data["label"]) + fusion aux_loss
        (+ align_loss * alignment_loss in training, when configured)."""
        fused, feats, masks = self.encode_with_tokens(batch)
        logits = self._head(fused)
        labels = batch.data["label"].to(logits.device)
        if self.config.head == "match":
            per_sample = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
            pred = (logits > 0).long()
        else:
            per_sample = F.cross_entropy(logits.float(), labels.long(), reduction="none")
            pred = logits.argmax(dim=-1)
        task = per_sample.mean()
        aux = fused.aux_loss.float()
        acc = (pred == labels.long()).float().mean().detach()
        metrics = {"accuracy": acc, "task_loss": task.detach(), "aux_loss": aux.detach()}
        if "load_cv" in fused.info:  # moe: std / mean of the tokens per expert (0 = balanced)
            metrics["load_cv"] = fused.info["load_cv"].detach()
        # per-modality monitoring (S7): the task loss over the samples in which each modality took part
        with torch.no_grad():
            for key, present in masks.items():
                if bool(present.any()) and len(masks) > 1:
                    metrics[f"loss/{key}"] = per_sample[present].mean()
        loss = task + aux
        if self.config.align_loss > 0 and self.training:
            align = self.alignment_loss(feats, masks, labels)
            loss = loss + self.config.align_loss * align
            metrics["align_loss"] = align.detach()
        return ModelOutput(loss, metrics, logits.detach(), self.routing_stats(fused))

    def routing_stats(self, fused: FusionOutput) -> dict[str, torch.Tensor]:
        """{"fusion": tokens per expert (E,)} when the fusion routes tokens to experts (moe), else {}."""
        counts = fused.info.get("tokens_per_expert")
        return {} if counts is None else {"fusion": counts.detach()}

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """Predicted labels (B,) int64: the argmax class, or 1 where the match logit is positive."""
        logits, _ = self.logits(batch)
        return (logits > 0).long() if self.config.head == "match" else logits.argmax(dim=-1)

    # ---- per-modality embeddings ------------------------------------------------------------------------
    @torch.no_grad()
    def embed_modality(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed inputs of encoder `key` -> (B, dim) L2-normalised mean of its projected tokens (the
        fusion's input; text averages over non-padding tokens). Each modality has its own space: these are
        for retrieval within a modality, caching and probes, not cross-modal similarity."""
        if key not in self.encoders:
            raise ConfigError(f"this model has no {key!r} encoder; it has {self.modalities}")
        was_training = self.training
        self.eval()
        try:
            x = x.to(self.device)
            tokens = self.projections[key](self.encoders[key].forward_tokens(x))
            if self.config.encoders[key].kind == "text":
                valid = (x != 0).to(tokens.dtype)[..., None]  # pad id 0
                pooled = (tokens * valid).sum(1) / valid.sum(1).clamp(min=1)
            else:
                pooled = tokens.mean(1)
        finally:
            self.train(was_training)
        return F.normalize(pooled.float(), dim=-1)

    def _key(self, kind: str) -> str:
        keys = [k for k, c in sorted(self.config.encoders.items()) if c.kind == kind]
        if not keys:
            raise ConfigError(f"this model has no {kind} encoder; it has {self.modalities}")
        return keys[0]

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (B, dim) L2-normalised embeddings (embed_modality on the tokenizer's ids)."""
        if self.tokenizer is None:
            raise ConfigError("this model has no tokenizer: it cannot encode raw text")
        return self._embed_raw("text", list(texts))

    def _embed_raw(self, kind: str, raws: list[Any]) -> torch.Tensor:
        key = self._key(kind)
        cfg = self.config.encoders[key]
        return self.embed_modality(key, MODALITIES[kind].preprocess(raws, cfg, self.tokenizer))

    def encode_image(self, images) -> torch.Tensor:
        """PIL images / uint8 arrays of any size -> (B, dim) L2-normalised embeddings (the image modality's
        preprocessing, as in training)."""
        return self._embed_raw("image", list(images))

    def encode_audio(self, waves, sample_rate: int | list[int]) -> torch.Tensor:
        """Waveforms ((n,) or (n, channels) arrays) at any sample rate (resampled to 16 kHz) -> (B, dim)
        L2-normalised embeddings; clips longer than the encoder's max_frames are cut (as in training)."""
        waves = list(waves)
        rates = [sample_rate] * len(waves) if isinstance(sample_rate, int) else list(sample_rate)
        return self._embed_raw("audio", list(zip(waves, rates)))

    def encode_video(self, videos) -> torch.Tensor:
        """Clips ((T, H, W, 3) uint8 arrays or lists of frames; T resampled to num_frames) -> (B, dim)
        L2-normalised embeddings."""
        return self._embed_raw("video", list(videos))

    # ---- persistence ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors (+ tokenizer.json) into `directory`."""
        if self.custom_encoders:
            raise CheckpointError(
                f"encoders {self.custom_encoders} are user modules without a config; "
                "save their state_dict yourself or build them from encoder configs"
            )
        from .provenance import model_provenance

        provenance = model_provenance({f"encoders.{k}": enc for k, enc in self.encoders.items()})
        config = self.config.model_dump(mode="json")
        return save_folder(self, directory, MODEL_TYPE, config, self.tokenizer, provenance)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> MultiModalModel:
        """Inverse of save_pretrained; reads only JSON and safetensors (nothing is unpickled)."""
        directory = Path(directory)
        config = validate_section(MultiModalConfig, read_config(directory, MODEL_TYPE))
        if any(getattr(c, "hf", None) for c in config.encoders.values()):  # from <directory>/hf_text
            from .hf_text import loading_saved

            with loading_saved(directory):
                return load_weights(MultiModalModel.from_config(config, None), directory, map_location)
        tokenizer = None
        if (directory / "tokenizer.json").is_file():
            text = [c for c in config.encoders.values() if c.kind == "text"]
            tokenizer = TextTokenizer.load(directory, text[0].context_length if text else 32)
        model = MultiModalModel.from_config(config, tokenizer)
        return load_weights(model, directory, map_location)


class MultiModalTransformer(MultiModalModel):
    """The seed's spelling (seed 004): `MultiModalTransformer(text_encoder=..., image_encoder=...,
    fusion_method=...)`; audio_encoder / video_encoder add those towers. Same module as MultiModalModel."""

    def __init__(
        self,
        text_encoder: str | dict[str, Any] | EncoderConfigBase | nn.Module | None = "tiny",
        image_encoder: str | dict[str, Any] | EncoderConfigBase | nn.Module | None = "tiny",
        fusion_method: str = "cross_attention",
        audio_encoder: str | dict[str, Any] | EncoderConfigBase | nn.Module | None = None,
        video_encoder: str | dict[str, Any] | EncoderConfigBase | nn.Module | None = None,
        **kwargs: Any,
    ):
        towers = {
            "text": text_encoder,
            "image": image_encoder,
            "audio": audio_encoder,
            "video": video_encoder,
        }
        super().__init__({k: v for k, v in towers.items() if v is not None}, fusion=fusion_method, **kwargs)


def build_task_model(
    task: str,
    size: str = "tiny",
    tokenizer: TextTokenizer | None = None,
    modalities: Sequence[str] | None = None,
    **kwargs: Any,
) -> MultiModalModel:
    """A MultiModalModel with `size` encoders for the task's modalities (or the subset `modalities`, e.g. a
    single-modality baseline) and its head; kwargs (fusion, dim, modality_dropout, fusion_kwargs ...) go to the
    constructor."""
    from ..data.tasks import TASKS

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    spec = TASKS[task]
    modalities = list(spec.modalities if modalities is None else modalities)
    extra = [m for m in modalities if m not in spec.modalities]
    if extra or not modalities:
        raise ConfigError(
            f"modalities {modalities}: task {task!r} has {list(spec.modalities)}; pick a non-empty subset"
        )
    return MultiModalModel(
        encoders={m: size for m in modalities},
        head=spec.head,
        n_classes=spec.n_classes,
        tokenizer=tokenizer,
        **kwargs,
    )


__all__ = [
    "ENCODER_SIZES",
    "AudioEncoderConfig",
    "ImageEncoderConfig",
    "MultiModalConfig",
    "MultiModalModel",
    "MultiModalTransformer",
    "TextEncoderConfig",
    "VideoEncoderConfig",
    "build_encoder",
    "build_task_model",
    "modality_dropout",
]
