"""The unified model folder: the decoder with everything generation needs to read and write its tokens.

Layout (written by `UnifiedBundle.save`, read by `UnifiedBundle.load` and `mmfusion.load_model`):
  config.json       {"model_type": "unified", "model": the run's `model:` section (UnifiedModelConfig)}
  decoder/          UnifiedDecoder.save_pretrained (config.json + model.safetensors)
  image_tokenizer/  VQVAE.save_pretrained
  audio_tokenizer/  optional: an audio VQVAE + frontend.json, as `mmfusion tokenize train --modality audio`
                    writes it (folders without it load with no audio tokenizer)
  text/             tokenizer.json (TextTokenizer)
  vocab.json        UnifiedVocab
  train.json        optional: the training settings, task sizes and the last logged metrics

Folders written before config.json existed load unchanged. A run directory loads as its `model/` folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError
from ..modalities.text import TextTokenizer
from ..models.vq import VQVAE, AudioFrontEnd
from .config import UnifiedModelConfig
from .sequences import SequenceBuilder, UnifiedVocab

MODEL_TYPE = "unified"
PARTS = ("decoder", "image_tokenizer", "text", "vocab.json")


def code_count(vq: VQVAE) -> int:
    """Vocabulary tokens one input of `vq` becomes (grid cells x residual levels)."""
    return vq.tokens_per_image * (vq.config["rvq_levels"] if vq.quantizer_type == "rvq" else 1)


def save_audio_tokenizer(vq: VQVAE, frontend: AudioFrontEnd, directory: str | Path) -> Path:
    """Write an audio tokenizer folder as `mmfusion tokenize train --modality audio` does (VQVAE + frontend.json)."""
    from .tokenize_cli import FRONTEND_FILE

    out = Path(vq.save_pretrained(directory))
    (out / FRONTEND_FILE).write_text(json.dumps({"modality": "audio", **frontend.to_dict()}, indent=2) + "\n")
    return out


def load_audio_tokenizer(directory: str | Path) -> tuple[VQVAE, AudioFrontEnd]:
    """(VQVAE, AudioFrontEnd) of an audio tokenizer folder; DataError when it is an image tokenizer."""
    from .tokenize_cli import FRONTEND_FILE, _tokenizer

    vq, frontend = _tokenizer(str(directory))
    if frontend is None:
        raise DataError(
            f"{directory} has no {FRONTEND_FILE}: an image tokenizer, not an audio one "
            "(make one with `mmfusion tokenize train --modality audio`)"
        )
    return vq, frontend


def is_unified_folder(path: str | Path) -> bool:
    """Whether `path` holds a unified model folder (its config.json says so, or, for folders written before
    that, it has decoder/ and vocab.json)."""
    d = Path(path)
    try:
        return json.loads((d / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return (d / "decoder").is_dir() and (d / "vocab.json").is_file()


@dataclass
class UnifiedBundle:
    """Everything generation needs: the decoder, its vocabulary, the text BPE, the VQ image tokenizer and,
    optionally, the audio tokenizer (VQVAE over AudioFrontEnd spectrograms). `config`: the run's model
    section (None: derived from the decoder's config when saved)."""

    decoder: torch.nn.Module
    vocab: UnifiedVocab
    text_tokenizer: TextTokenizer
    vqvae: VQVAE
    audio_vqvae: VQVAE | None = None
    audio_frontend: AudioFrontEnd | None = None
    config: UnifiedModelConfig | None = None

    def __post_init__(self) -> None:
        if (self.audio_vqvae is None) != (self.audio_frontend is None):
            raise ConfigError("UnifiedBundle: give audio_vqvae and audio_frontend together (or neither)")
        want = (0, 0)
        if self.audio_vqvae is not None:
            want = (self.audio_vqvae.codebook_size, code_count(self.audio_vqvae))
        if (self.vocab.n_audio, self.vocab.tokens_per_audio) != want:
            raise ConfigError(
                f"UnifiedBundle: vocab has n_audio={self.vocab.n_audio}, tokens_per_audio="
                f"{self.vocab.tokens_per_audio}; the audio tokenizer needs {want} "
                f"({'none given' if self.audio_vqvae is None else 'codebook size, codes per clip'})"
            )
        if self.config is None and hasattr(self.decoder, "cfg"):
            self.config = UnifiedModelConfig.from_decoder(self.decoder.cfg)

    @property
    def builder(self) -> SequenceBuilder:
        return SequenceBuilder(self.vocab, self.text_tokenizer)

    @property
    def tokenizer(self) -> TextTokenizer:
        """The text tokenizer (the name other model folders use for theirs)."""
        return self.text_tokenizer

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The decoder's and the tokenizers' parameters."""
        for m in (self.decoder, self.vqvae, self.audio_vqvae):
            if m is not None:
                yield from m.parameters()

    def eval(self) -> UnifiedBundle:
        for m in (self.decoder, self.vqvae, self.audio_vqvae):
            if m is not None:
                m.eval()
        return self

    def save(self, directory: str | Path, train_info: Mapping[str, Any] | None = None) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.decoder.save_pretrained(d / "decoder")
        self.vqvae.save_pretrained(d / "image_tokenizer")
        if self.audio_vqvae is not None:
            save_audio_tokenizer(self.audio_vqvae, self.audio_frontend, d / "audio_tokenizer")
        (d / "text").mkdir(exist_ok=True)
        self.text_tokenizer.save(d / "text")
        self.vocab.save(d / "vocab.json")
        if train_info is not None:
            (d / "train.json").write_text(json.dumps(dict(train_info), indent=2, default=str) + "\n")
        model = self.config.model_dump(mode="json") if self.config is not None else {}
        (d / "config.json").write_text(
            json.dumps({"model_type": MODEL_TYPE, "model": model}, indent=2) + "\n"
        )
        return d

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> UnifiedBundle:
        """Read a folder written by `save` (JSON + safetensors only); a run directory reads its model/."""
        from .model import UnifiedDecoder

        d = Path(directory)
        if not any((d / p).exists() for p in PARTS) and (d / "model").is_dir():
            d = d / "model"
        missing = [p for p in PARTS if not (d / p).exists()]
        if missing:
            raise DataError(
                f"{d} is not a unified model folder: missing {', '.join(missing)} "
                "(train one with `mmfusion train` and model.kind: unified)"
            )
        vocab = UnifiedVocab.load(d / "vocab.json")
        decoder = UnifiedDecoder.from_pretrained(d / "decoder").to(map_location).eval()
        vqvae = VQVAE.from_pretrained(d / "image_tokenizer", map_location=map_location)
        audio: tuple[VQVAE | None, AudioFrontEnd | None] = (None, None)
        if (d / "audio_tokenizer").exists():
            audio = load_audio_tokenizer(d / "audio_tokenizer")
            audio[0].to(map_location)
        if decoder.cfg.vocab_size != vocab.size:
            raise DataError(
                f"{d}: decoder vocab_size {decoder.cfg.vocab_size} != vocab.json size {vocab.size}"
            )
        config = None
        if (d / "config.json").is_file():
            saved = json.loads((d / "config.json").read_text()).get("model") or None
            config = UnifiedModelConfig.model_validate(saved) if saved else None
        try:
            tok = TextTokenizer.load(d / "text", context_length=64)
            return cls(decoder, vocab, tok, vqvae, *audio, config=config)
        except ConfigError as err:
            raise DataError(f"{d}: {err}") from None

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> UnifiedBundle:
        """`load` under the name `mmfusion.load_model` calls."""
        return cls.load(directory, map_location)


__all__ = [
    "MODEL_TYPE",
    "UnifiedBundle",
    "code_count",
    "is_unified_folder",
    "load_audio_tokenizer",
    "save_audio_tokenizer",
]
