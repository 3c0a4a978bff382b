"""The LLaVA-style captioner's config (`model:` with kind vlm): a frozen image tower -> a trainable projector
-> a decoder-only Hugging Face causal LM read from a local folder (mmfusion.models.vlm).

    model:
      kind: vlm
      lm: {hf: /path/to/a/local/llama-or-gpt2-folder, freeze: true}
      image: {from_run: runs/quickstart, freeze: true}     # or the tower's own keys: image_size, patch_size ...
      projector: {hidden: 0, layers: 2}                     # hidden 0: the LM's width
      num_image_tokens: null                  # [CLS] + every patch token; k: [CLS] + patches pooled to a sqrt(k) grid
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from ..schema import Section
from .contrastive_config import ImageConfig


class LMConfig(Section):
    """`model.lm`: the causal LM. `hf`: a local transformers folder (config.json + weights + tokenizer files);
    nothing is downloaded. `freeze`: keep its weights fixed (train LoRA adapters through `train.lora`, or
    only the projector); false trains every LM weight."""

    hf: str = Field(min_length=1)
    freeze: bool = True


class VLMImageConfig(ImageConfig):
    """`model.image`: the image tower. `from_run`: a trained two-tower model folder or run directory whose
    image tower (config and weights) is taken; else a fresh tower with these keys. `freeze`: keep it fixed."""

    from_run: str | None = None
    freeze: bool = True


class ProjectorConfig(Section):
    """`model.projector`: image-tower width -> LM width. layers 1: one Linear; 2: Linear-GELU-Linear (LLaVA-1.5)
    with `hidden` units (0: the LM's width)."""

    hidden: int = Field(0, ge=0)
    layers: int = Field(2, ge=1, le=2)


class VLMConfig(Section):
    """A LLaVA-style captioner (Liu et al. 2023, arXiv:2304.08485): image tokens prepended to the prompt.

    Sequence fed to the LM as `inputs_embeds`: [bos] [image tokens] [prompt] [caption or answer] [eos]; the
    loss is next-token cross-entropy on the caption / answer tokens and eos only. `prompt` precedes a caption,
    `question_prompt` (with `{question}`) an answer. `max_text_tokens` caps prompt + target tokens. The image
    tokens are the tower's [CLS] token + its patch tokens, pooled to `num_image_tokens` (a square) when set;
    0: no image tokens (the LM alone)."""

    kind: Literal["vlm"] = "vlm"
    lm: LMConfig
    image: VLMImageConfig = VLMImageConfig()
    projector: ProjectorConfig = ProjectorConfig()
    num_image_tokens: int | None = Field(None, ge=0)
    prompt: str = "caption:"
    question_prompt: str = "question: {question} answer:"
    max_text_tokens: int = Field(48, ge=4, le=8192)

    @model_validator(mode="after")
    def _check(self) -> VLMConfig:
        k = self.num_image_tokens
        if k is not None and k > 0 and math.isqrt(k) ** 2 != k:
            raise ValueError(
                f"num_image_tokens = {k}: the patch grid is pooled to a square, so use a square number "
                "(1, 4, 9, 16 ...), 0 (no image tokens) or null (every patch token)"
            )
        if "{question}" not in self.question_prompt:
            raise ValueError(f"question_prompt = {self.question_prompt!r} must contain {{question}}")
        return self


__all__ = ["LMConfig", "ProjectorConfig", "VLMConfig", "VLMImageConfig"]
