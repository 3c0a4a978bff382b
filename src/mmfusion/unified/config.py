"""The `model:` section of a unified run (`model.kind: unified`): the decoder, its tokenizers, the task mixing.

    model:
      kind: unified
      width: 128            # the decoder (mmfusion.unified.model.UnifiedConfig; `width` is its `dim`)
      depth: 4
      heads: 4
      image_tokenizer:      # a folder from `mmfusion tokenize train`, or how to train one on the training images
        path: null
        kind: fsq           # fsq (8,6,5 = 240 codes) or vq (EMA VQ, `codebook_size` codes)
        steps: 600
      audio_tokenizer: null # a folder from `mmfusion tokenize train --modality audio`: adds audio captioning
      text_vocab_size: 256  # the BPE trained on the training split's captions, questions and answers
      temperature: 1.0      # task mixing: p_task ∝ n_task^(1/T)

Importing this module is cheap (pydantic only): `mmfusion.config` composes it into the run config.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..schema import Section

TaskName = Literal["caption", "image", "vqa", "audio_caption"]
# the UnifiedConfig fields a run sets (vocab_size comes from the tokenizers; max_len from the data when None)
DECODER_FIELDS = (
    "depth",
    "heads",
    "mlp_ratio",
    "qk_norm",
    "z_loss",
    "image_window",
    "window_layers",
    "modality_aware",
    "sparse_topk",
    "hierarchical_layers",
    "modality_gate",
    "dropout",
)
TRAINING_FIELDS = (
    "kind",
    "steps",
    "codebook_size",
    "channels",
    "code_dim",
    "batch_size",
    "lr",
    "train_images",
)


class ImageTokenizerSettings(Section):
    """The VQ image tokenizer: an existing folder (`path`, from `mmfusion tokenize train`), or the recipe that
    trains one on the run's training images (`mmfusion.unified.train.train_vqvae`: Adam, MSE + commitment,
    random batches; dead-code threshold 3). The defaults are the recipe `mmfusion train-unified` always used.

    image_size: the side images are resized to; with `path`, the folder's size (setting another is an error).
    train_images: at most this many training images (the first ones of the split) train it."""

    path: str | None = None
    kind: Literal["fsq", "vq"] = "fsq"
    steps: int = Field(600, ge=1)
    codebook_size: int = Field(256, ge=2)  # vq only (fsq has 8 x 6 x 5 = 240 codes)
    image_size: int = Field(32, ge=8, le=1024)
    channels: int = Field(32, ge=1)
    code_dim: int = Field(32, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0, le=1)
    train_images: int = Field(4096, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ImageTokenizerSettings:
        if self.image_size % 4:
            raise ValueError(f"image_size = {self.image_size}: must be divisible by 4 (two stride-2 convs)")
        given = [
            k
            for k in TRAINING_FIELDS
            if k in self.model_fields_set and getattr(self, k) != type(self).model_fields[k].default
        ]
        if self.path is not None and given:
            raise ValueError(
                f"{', '.join(given)}: training settings, but path = {self.path!r} names a trained tokenizer; "
                "leave them out (or drop path to train one)"
            )
        return self


class UnifiedModelConfig(Section):
    """A unified autoregressive model (docs/unified.md): one decoder over text BPE ids, VQ image codes and
    (optionally) audio codes, trained on caption, text->image, VQA and audio-caption sequences that the
    training rows give (mmfusion.unified.rows)."""

    kind: Literal["unified"] = "unified"
    width: int = Field(128, ge=2)
    depth: int = Field(4, ge=1, le=96)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    qk_norm: bool = True
    z_loss: float = Field(1e-4, ge=0)
    image_window: int | None = Field(None, ge=1)
    window_layers: Literal["all", "alternate"] = "all"
    modality_aware: bool = False
    sparse_topk: int | None = Field(None, ge=1)
    hierarchical_layers: int = Field(0, ge=0)
    modality_gate: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)
    # the decoder's longest sequence; None: the longest training sequence + 32
    max_len: int | None = Field(None, ge=1)
    image_tokenizer: ImageTokenizerSettings = ImageTokenizerSettings()
    audio_tokenizer: str | None = None
    text_vocab_size: int = Field(256, ge=16, le=1_000_000)
    # a tokenizer.json (or a folder with one) to use instead of training the BPE: HF tokenizers breaks ties
    # between equally frequent merges differently in every process, so pin one for bitwise-reproducible runs
    text_tokenizer: str | None = None
    temperature: float = Field(1.0, gt=0)
    # one caption-less text->image sequence per `uncond_every` image-caption rows (0 = none): the
    # unconditional branch classifier-free guidance needs
    uncond_every: int = Field(10, ge=0)
    # the tasks to train (None: every task the rows and tokenizers allow)
    tasks: list[TaskName] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _decoder(self) -> UnifiedModelConfig:
        from ..errors import ConfigError
        from .model import UnifiedConfig

        try:
            UnifiedConfig(vocab_size=1, dim=self.width, **self.decoder_options())
        except ConfigError as e:
            msg = str(e).removeprefix("UnifiedConfig.")
            raise ValueError("width" + msg[3:] if msg.startswith("dim ") else msg) from None
        if self.tasks is not None and "audio_caption" in self.tasks and self.audio_tokenizer is None:
            raise ValueError(
                "tasks has audio_caption, which needs audio_tokenizer (an audio tokenizer folder)"
            )
        return self

    def decoder_options(self) -> dict[str, Any]:
        """The UnifiedConfig keyword arguments this section sets (not vocab_size, dim or max_len)."""
        return {k: getattr(self, k) for k in DECODER_FIELDS}

    @classmethod
    def from_decoder(cls, cfg: Any) -> UnifiedModelConfig:
        """The section of a UnifiedConfig (for folders written before model folders had a config.json)."""
        return cls(width=cfg.dim, max_len=cfg.max_len, **{k: getattr(cfg, k) for k in DECODER_FIELDS})


__all__ = ["ImageTokenizerSettings", "TaskName", "UnifiedModelConfig"]
