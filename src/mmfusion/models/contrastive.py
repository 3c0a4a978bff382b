"""Two-tower image–text model trained with contrastive losses (A3, T1); CLIP-style."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import Batch
from ..data.collate import Collate, Input, Target
from ..layers import load_scalar_compat, scalar_parameter
from ..losses import clip_loss, dual_contrastive_loss, gather_with_grad
from ..modalities.clip_tokenizer import ClipTokenizer, load_text_tokenizer
from ..modalities.image import ImageEncoder, ImageLike, preprocess_images
from ..modalities.text import TextEncoder, TextTokenizer
from .contrastive_config import ModelConfig
from .persistence import load_weights, read_config, save_folder

MODEL_TYPE = "contrastive"


@dataclass
class ModelOutput:
    """What a model returns to the trainer: a scalar loss and metrics to log (floats or 0-d tensors).

    Read by the Trainer's step hooks (mmfusion.train.step_hooks), never logged:
    logits:  the head's detached output ((B, C) class logits or (B,) match logits), for per-sample data
             weighting (`data.sampler: ddwa`); None for models without a per-sample label.
    routing: MoE module name (as `named_modules()` names it) -> tokens per expert (E,) of this forward, for
             aux-loss-free balancing (`aux_free_bias`)."""

    loss: torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    routing: dict[str, torch.Tensor] = field(default_factory=dict)


class ContrastiveModel(nn.Module):
    """Text tower + image tower projected into one space, with a learnable temperature.

    `encode_text(list[str])` and `encode_image(images)` return L2-normalised (N, embed_dim) embeddings.
    """

    def __init__(self, config: ModelConfig, tokenizer: TextTokenizer | ClipTokenizer | None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        t, i = config.text, config.image
        if t.hf is not None:  # a pretrained transformers encoder with its own tokenizer (models.hf_text)
            from .hf_text import HFTextTower

            self.text_encoder = HFTextTower(t.hf, config.embed_dim, t.pooling, t.freeze, t.context_length)
            self.tokenizer = self.text_encoder.tokenizer
        else:
            eot_id = tokenizer.eot_id if t.arch == "clip" else None  # CLIP: pooled at the first <|endoftext|>
            self.text_encoder = TextEncoder(
                tokenizer.vocab_size,
                t.context_length,
                t.width,
                t.depth,
                t.heads,
                config.embed_dim,
                t.mlp_ratio,
                t.act,
                eot_id,
            )
        self.image_encoder = ImageEncoder(
            i.image_size,
            i.patch_size,
            i.width,
            i.depth,
            i.heads,
            config.embed_dim,
            i.mlp_ratio,
            i.stem,
            i.act,
            i.mean,
            i.std,
        )
        self.logit_scale = scalar_parameter(math.log(1.0 / config.init_temperature))  # (1,)
        load_scalar_compat(self, "logit_scale")

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def image_size(self) -> int:
        return self.config.image.image_size

    def inputs(self) -> dict[str, Input]:
        """The model's inputs for the one Collate: image at the image tower's size, text by the tokenizer."""
        from ..modalities.image import SPEC as IMAGE
        from ..modalities.text import SPEC as TEXT

        return {
            "image": Input(IMAGE, IMAGE.config(image_size=self.image_size)),
            "text": Input(TEXT, TEXT.config(context_length=self.config.text.context_length)),
        }

    def collate(self, target: Target | None = None) -> Collate:
        """Sample dicts -> Batch for this model: every sample needs both an image and a caption; meta keeps the
        captions and scenes (retrieval's ground truth). `target` adds a label (a CL-FT probe stage)."""
        return Collate(
            self.inputs(),
            self.tokenizer,
            target,
            required=("image", "text"),
            meta=("id", "text", "scene_key", "scene"),
        )

    def modality_parameters(self) -> dict[str, list[str]]:
        """Modality -> its parameter-name prefixes (per-modality gradient accumulation)."""
        return {"text": ["text_encoder."], "image": ["image_encoder."]}

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at 100 as in CLIP."""
        return self.logit_scale.exp().clamp(max=100.0).reshape(())

    # ---- public verbs ----------------------------------------------------------------------------
    def embed_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_encoder(ids.to(self.device)), dim=-1)

    def embed_image_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(images.to(self.device)), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str] | str, batch_size: int = 512) -> torch.Tensor:
        """Captions -> (N, embed_dim) L2-normalised float32 embeddings (on CPU)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = [
            self.embed_text_ids(self.tokenizer.encode(texts[s : s + batch_size])).float().cpu()
            for s in range(0, len(texts), batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, self.config.embed_dim)

    @torch.no_grad()
    def encode_image(self, images: Sequence[ImageLike] | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """PIL images, (H, W, 3) uint8 arrays or a float (B, 3, H, W) tensor in [-1, 1] -> (N, embed_dim).

        The model's own preprocessing converts modes and resizes to its image size.
        """
        pixels = preprocess_images(images, self.image_size)
        out = [
            self.embed_image_tensor(pixels[s : s + batch_size]).float().cpu()
            for s in range(0, pixels.shape[0], batch_size)
        ]
        return torch.cat(out)

    # ---- training --------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> ModelOutput:
        """batch["image"] (B, 3, H, W), batch["text"] (B, L) ids -> contrastive loss over the global batch."""
        img = self.embed_image_tensor(batch["image"])
        txt = self.embed_text_ids(batch["text"])
        img, txt = gather_with_grad(img), gather_with_grad(txt)
        scale = self.scale()
        img, txt = img.float(), txt.float()  # the loss in fp32 whatever the autocast policy
        if self.config.loss == "dual":
            loss = dual_contrastive_loss(txt, img, scale, self.config.intra_weight)
        else:
            loss = clip_loss(img, txt, scale)
        with torch.no_grad():
            acc = (
                ((img @ txt.t()).argmax(dim=1) == torch.arange(img.shape[0], device=img.device))
                .float()
                .mean()
            )
        return ModelOutput(loss, {"temperature": 1.0 / scale.detach(), "batch_i2t_acc": acc})

    # ---- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors + tokenizer.json into `directory`."""
        return save_folder(
            self,
            directory,
            MODEL_TYPE,
            self.config.model_dump(mode="json"),
            self.tokenizer,
            self.provenance(),
        )

    def provenance(self) -> dict[str, dict]:
        """Tower -> where its weights came from (mmfusion.models.provenance), saved into config.json."""
        from .provenance import model_provenance

        return model_provenance({"text_encoder": self.text_encoder, "image_encoder": self.image_encoder})

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> ContrastiveModel:
        """Inverse of save_pretrained; reads only JSON and safetensors (nothing is unpickled)."""
        config = ModelConfig.model_validate(read_config(directory, MODEL_TYPE))
        if config.text.hf is not None:  # the HF tower and its tokenizer come from <directory>/hf_text
            from .hf_text import loading_saved

            with loading_saved(directory):
                return load_weights(cls(config, None), directory, map_location)
        t = config.text
        tokenizer = load_text_tokenizer(directory, t.context_length, t.arch, t.vocab_size)
        return load_weights(cls(config, tokenizer), directory, map_location)
