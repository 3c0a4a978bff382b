"""A LLaVA-style captioner (Liu et al. 2023, arXiv:2304.08485): a frozen image tower -> a trainable projector
-> a decoder-only Hugging Face causal LM fed with `inputs_embeds`, the image tokens spliced in after [bos].

    images (B, 3, S, S) -> tower patch tokens (B, P, width) [-> pooled to k tokens] -> projector (B, k, d_lm)
    [bos] + image tokens + prompt + caption + eos  ->  LM  ->  next-token CE on the caption and eos only

Trained by the common Trainer (`forward(batch) -> ModelOutput`); LoRA on the LM's linear layers comes from
`train.lora` (mmfusion.train.lora; GPT-2's Conv1D too) and is merged before saving. The model folder is
self-contained: config.json + model.safetensors (image tower + projector) + lm/ (the LM's own save_pretrained
folder: config, safetensors weights, tokenizer files), so it loads with the source LM folder gone.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import Batch
from ..errors import CheckpointError, ConfigError, DataError
from ..modalities.image import ImageEncoder, ImageLike, preprocess_images
from .contrastive import ModelOutput
from .contrastive_config import ModelConfig
from .hf_lm import load_causal_lm
from .persistence import read_config
from .provenance import read_provenance
from .vlm_config import VLMConfig
from .vlm_data import IGNORE, PromptFormat, VLMCollate

MODEL_TYPE = "vlm"
LM_DIR = "lm"


def _tower_folder(from_run: str) -> Path:
    path = Path(from_run)
    folder = path / "model" if (path / "model").is_dir() else path
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.image.from_run = {from_run!r}: no model folder there (config.json); give a trained "
            "two-tower model folder or its run directory"
        )
    return folder


def resolve_image(config: VLMConfig) -> tuple[VLMConfig, dict[str, torch.Tensor] | None]:
    """The config with `model.image` taken from `image.from_run`'s two-tower model (its tower's keys), and
    that tower's weights; (config, None) without from_run."""
    if config.image.from_run is None:
        return config, None
    from safetensors.torch import load_file

    folder = _tower_folder(config.image.from_run)
    try:
        tower = ModelConfig.model_validate(read_config(folder, "contrastive"))
    except CheckpointError as e:
        raise ConfigError(f"model.image.from_run: {e}") from None
    keys = {**tower.image.model_dump(), "from_run": config.image.from_run, "freeze": config.image.freeze}
    config = config.model_copy(update={"image": config.image.model_validate(keys)})
    state = load_file(str(folder / "model.safetensors"))
    weights = {
        k.removeprefix("image_encoder."): v for k, v in state.items() if k.startswith("image_encoder.")
    }
    return config, {**weights, "__embed_dim__": torch.tensor(tower.embed_dim)}


def check_sources(config: VLMConfig) -> None:
    """ConfigError naming the key when `lm.hf` is not a usable causal-LM folder or `image.from_run` holds no
    model folder (cheap: config files only)."""
    from .hf_lm import check_lm_folder

    check_lm_folder(config.lm.hf)
    if config.image.from_run is not None:
        _tower_folder(config.image.from_run)


def _projector(width: int, d_lm: int, hidden: int, layers: int) -> nn.Module:
    if layers == 1:
        return nn.Linear(width, d_lm)
    hidden = hidden or d_lm
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, d_lm))


def _drop_aliases(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """state_dict hook: a parameter shared under two names (tied LM input / output embeddings) is kept once,
    so safetensors can write it."""
    for alias in _aliases(module):
        state.pop(prefix + alias, None)


def _fill_aliases(module: nn.Module, state: dict[str, Any], prefix: str, *_args: Any) -> None:
    """load_state_dict pre-hook: the inverse of _drop_aliases."""
    for alias, source in _aliases(module).items():
        if prefix + alias not in state and prefix + source in state:
            state[prefix + alias] = state[prefix + source]


def _aliases(module: nn.Module) -> dict[str, str]:
    """Second name -> first name of every parameter that the module holds under two names."""
    first: dict[int, str] = {}
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


class VLMModel(nn.Module):
    """Image tower + projector + HF causal LM (`lm`) and its tokenizer; see the module docstring.

    `caption(images)` / `answer(images, questions)` return strings; `forward(batch)` the training loss."""

    pretrained_base = True  # its LM comes with weights: train.lora adapts them without train.init_from

    def __init__(self, config: VLMConfig, lm: nn.Module, tokenizer: Any, tower: dict | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.text = PromptFormat(tokenizer, config)
        i = config.image
        embed_dim = int(tower.pop("__embed_dim__")) if tower else i.width
        self.image_encoder = ImageEncoder(
            i.image_size, i.patch_size, i.width, i.depth, i.heads, embed_dim, i.mlp_ratio, i.stem
        )
        if tower is not None:
            self.image_encoder.load_state_dict(tower)
        self.lm = lm
        d_lm = lm.get_input_embeddings().embedding_dim
        self.projector = _projector(i.width, d_lm, config.projector.hidden, config.projector.layers)
        self.image_encoder.requires_grad_(not i.freeze)
        self.lm.requires_grad_(not config.lm.freeze)
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_fill_aliases)
        self.sources: dict[str, dict] = {}  # tower -> where its weights came from (models.provenance)

    @classmethod
    def from_config(cls, config: VLMConfig) -> VLMModel:
        """A fresh captioner: the LM and tokenizer from `lm.hf`, the tower from `image.from_run` or new."""
        from .provenance import SCRATCH, folder_record

        config, tower = resolve_image(config)
        lm, tokenizer = load_causal_lm(config.lm.hf)
        model = cls(config, lm, tokenizer, tower)
        from_run = config.image.from_run
        model.sources = {
            "image_encoder": folder_record(_tower_folder(from_run)) if from_run else dict(SCRATCH),
            "lm": folder_record(config.lm.hf),
            "projector": dict(SCRATCH),
        }
        return model

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    @property
    def image_size(self) -> int:
        return self.config.image.image_size

    @property
    def num_image_tokens(self) -> int:
        k = self.config.num_image_tokens
        patches = (self.image_size // self.config.image.patch_size) ** 2 if k is None else k
        return 0 if k == 0 else 1 + patches

    def collate(self, target: Any = None) -> VLMCollate:
        """The run's Collate: images at the tower's size through the one Collate, text by the LM tokenizer."""
        from ..data.collate import Collate, Input
        from ..modalities.image import SPEC as IMAGE
        from .vlm_data import TEXT_FIELDS

        if target is not None:
            raise ConfigError("a vlm model trains on captions / answers; it takes no data.target")
        images = Collate(
            {"image": Input(IMAGE, IMAGE.config(image_size=self.image_size))},
            required=("image",),
            meta=("id", *TEXT_FIELDS, "scene"),
        )
        return VLMCollate(images, self.text)

    # ---- the forward pass -------------------------------------------------------------------------------
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [-1, 1] -> projected image tokens (B, num_image_tokens, d_lm): the tower's
        [CLS] token (the one a two-tower model aligns with captions) then its patch tokens, pooled to a square
        grid of `config.num_image_tokens` patches when set (0: no image tokens at all)."""
        k = self.config.num_image_tokens
        d_lm = self.lm.get_input_embeddings().embedding_dim
        if k == 0:
            return torch.zeros(images.shape[0], 0, d_lm, device=images.device)
        tower = self.image_encoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.image.freeze):
            tokens = tower.ln_post(tower.forward_tokens(images))  # (B, 1 + P, width), [CLS] first
        cls, patches = tokens[:, :1], tokens[:, 1:]
        if self.config.num_image_tokens is not None:
            g, side = self.image_size // self.config.image.patch_size, math.isqrt(k)
            grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, g, g)
            patches = F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)  # (B, k, width)
        return self.projector(torch.cat([cls, patches], dim=1))

    def splice(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """image (B, k, d) and ids (B, L) -> inputs_embeds (B, prefix + k + L - prefix, d): the image tokens
        after the [bos] prefix."""
        embed = self.lm.get_input_embeddings()(ids)
        p = len(self.text.prefix)
        return torch.cat([embed[:, :p], image.to(embed.dtype), embed[:, p:]], dim=1)

    def _insert(self, values: torch.Tensor, k: int, fill: Any) -> torch.Tensor:
        """A (B, L) tensor with k `fill` columns inserted after the prefix (labels, attention mask)."""
        p = len(self.text.prefix)
        pad = torch.full((values.shape[0], k), fill, dtype=values.dtype, device=values.device)
        return torch.cat([values[:, :p], pad, values[:, p:]], dim=1)

    def forward(self, batch: Batch) -> ModelOutput:
        """batch "image" (B, 3, S, S), "input_ids" / "labels" / "attention_mask" (B, L) -> caption loss."""
        image = self.image_tokens(batch["image"])
        ids = batch["input_ids"]
        embeds = self.splice(image, ids)
        mask = self._insert(batch["attention_mask"], image.shape[1], True)
        labels = self._insert(batch["labels"], image.shape[1], IGNORE)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask.long()).logits
        target = labels[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE)
        with torch.no_grad():
            scored = target != IGNORE
            correct = (logits[:, :-1].argmax(-1) == target) & scored
            acc = correct.sum() / scored.sum().clamp(min=1)
        return ModelOutput(loss, {"token_acc": acc})

    # ---- generation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: Sequence[ImageLike] | torch.Tensor,
        prompts: Sequence[str],
        max_new_tokens: int = 40,
        strategy: str = "greedy",
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
    ) -> list[str]:
        """One continuation per (image, prompt), decoded without special tokens. Rows are left-padded (positions
        count from each row's first real token, as in training) and decoded with the LM's KV cache."""
        if len(images) != len(prompts):
            raise DataError(f"{len(prompts)} prompts for {len(images)} images: give one prompt per image")
        if strategy not in ("greedy", "sample"):
            raise ConfigError(f"strategy {strategy!r}: expected greedy or sample")
        pixels = preprocess_images(images, self.image_size).to(self.device)
        image = self.image_tokens(pixels)
        rows = [
            self.splice(image[i : i + 1], torch.tensor([self.text.prompt_ids(p)], device=self.device))[0]
            for i, p in enumerate(prompts)
        ]
        width = max(r.shape[0] for r in rows)
        embeds = torch.zeros(len(rows), width, rows[0].shape[1], device=self.device, dtype=rows[0].dtype)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            embeds[i, width - r.shape[0] :] = r
            mask[i, width - r.shape[0] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        eos = self.text.eos
        # transformers >= 5.2x names the KV cache `cache`; earlier releases `past_key_values`
        key = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        new: list[torch.Tensor] = []
        done = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            if strategy == "greedy":
                token = logits.argmax(-1)
            else:
                logits = logits / max(temperature, 1e-5)
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
            token = torch.where(done, torch.full_like(token, eos), token)
            new.append(token)
            done |= token == eos
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.lm(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{key: getattr(out, key)},
            )
        ids = torch.stack(new, dim=1).tolist() if new else [[] for _ in rows]
        cut = [row[: row.index(eos)] if eos in row else row for row in ids]
        return [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in cut]

    def caption(self, images: Sequence[ImageLike] | torch.Tensor, **kw: Any) -> list[str]:
        """Images -> one caption each (greedy by default; kw: generate's options)."""
        return self.generate(images, [self.config.prompt] * len(images), **kw)

    def answer(
        self, images: Sequence[ImageLike] | torch.Tensor, questions: Sequence[str], **kw: Any
    ) -> list[str]:
        """Images and one question each -> the answers."""
        prompts = [self.config.question_prompt.format(question=q) for q in questions]
        return self.generate(images, prompts, **kw)

    # ---- persistence --------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + model.safetensors (image tower + projector) + lm/ (the LM's save_pretrained folder with
        its tokenizer). Merge LoRA adapters first (mmfusion.train.lora.merge_lora): lm/ holds plain weights."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(str(directory / LM_DIR))
        self.tokenizer.save_pretrained(str(directory / LM_DIR))
        state = {
            k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("lm.")
        }
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        meta = {
            "model_type": MODEL_TYPE,
            "model": self.config.model_dump(mode="json"),
            "provenance": self.sources,
        }
        (directory / "config.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> VLMModel:
        """Inverse of save_pretrained; reads JSON and safetensors only (the LM from the folder's lm/)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = VLMConfig.model_validate(read_config(directory, MODEL_TYPE))
        config = config.model_copy(update={"image": config.image.model_copy(update={"from_run": None})})
        lm, tokenizer = load_causal_lm(directory / LM_DIR, key=f"{directory}/{LM_DIR}")
        model = cls(config, lm, tokenizer)
        model.sources = read_provenance(directory) or {}
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{weights} not found")
        state = load_file(str(weights))
        own = {k for k in model.state_dict() if not k.startswith("lm.")}
        if own != set(state):
            raise CheckpointError(
                f"{weights}: missing keys {sorted(own - set(state))[:5]}, unexpected {sorted(set(state) - own)[:5]}"
            )
        model.load_state_dict(state, strict=False)
        return model.to(map_location).eval()


def is_vlm_folder(path: str | Path) -> Path | None:
    """The vlm model folder at `path` or `path/model` (a run directory), or None."""
    for d in (Path(path), Path(path) / "model"):
        try:
            if json.loads((d / "config.json").read_text()).get("model_type") == MODEL_TYPE:
                return d
        except (OSError, ValueError):
            continue
    return None


__all__ = ["VLMModel", "check_sources", "is_vlm_folder", "resolve_image"]
