"""The `model:` section of a joint diffusion run (`model.kind: diffusion`, docs/diffusion.md).

    model:
      kind: diffusion
      image_size: 32
      image_latent: pixels  # pixels in [-1, 1], cut into patch x patch tokens; or autoencoder (ae_* settings)
      patch: 4
      text_len: 24          # the text latent: text_len word vectors of text_dim (mmfusion.diffusion.latents)
      text_dim: 16
      width: 128            # the denoiser transformer
      depth: 4
      heads: 4
      timesteps: 1000       # DDPM training steps T and the schedule
      schedule: cosine
      text_target: x0       # the text head predicts the clean latent (or eps)
      image_target: eps     # the image head predicts eps (or x0)
      image_snr_weight: 0   # > 0 (x0 head): weigh the image loss by max(1, min(SNR, this))
      text_summary: false   # add an MLP of the whole text latent to every image token
      image_summary: false  # add an MLP of the mean image token to every text token
      image_net: linear     # or unet: a conv encoder / decoder around the image tokens (conv_channels: 16)
      cond_prob: 0.5        # share of samples whose image or text is a clean condition (t2i / i2t training)
      uncond_prob: 0.1      # share whose image or text sits at max noise (the classifier-free branch)
      ema_decay: 0.999
      align_weight: 0.0     # consistency constraint (T10): contrastive shared-latent alignment
      adv_weight: 0.0       # consistency constraint (T10): the pair discriminator's reversed gradient

Importing this module is cheap (pydantic only): `mmfusion.config` composes it into the run config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..schema import Section


class DiffusionModelConfig(Section):
    """A UniDiffuser-style joint diffusion model over an image latent and a text latent (one denoiser, one
    timestep per modality), with EMA weights and the optional paired-generation consistency losses."""

    kind: Literal["diffusion"] = "diffusion"
    image_size: int = Field(32, ge=8, le=256)
    # the image latent: "pixels" (patch x patch patches) or "autoencoder" (latents.ImageAutoencoder: one global
    # latent vector of ae_latent_dim, as ae_tokens tokens, trained ae_steps steps on the run's training images)
    image_latent: Literal["pixels", "autoencoder"] = "pixels"
    patch: int = Field(4, ge=1)
    ae_latent_dim: int = Field(32, ge=1)
    ae_tokens: int = Field(4, ge=1)
    ae_channels: int = Field(32, ge=1)
    ae_steps: int = Field(2000, ge=0)
    ae_noise: float = Field(0.1, ge=0)
    text_len: int = Field(24, ge=1, le=256)
    text_dim: int = Field(16, ge=2, le=1024)
    text_seed: int = 0  # the fixed word-embedding table's seed
    width: int = Field(128, ge=8)
    depth: int = Field(4, ge=1, le=64)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    timesteps: int = Field(1000, ge=2, le=100_000)
    schedule: Literal["cosine", "linear"] = "cosine"
    cond_prob: float = Field(0.5, ge=0, le=1)
    uncond_prob: float = Field(0.1, ge=0, le=1)
    text_weight: float = Field(1.0, ge=0)
    # add an MLP of the whole text latent (and its timestep) to every image token (JointDenoiser)
    text_summary: bool = False
    # add an MLP of the mean image token (and the image timestep) to every text token (JointDenoiser)
    image_summary: bool = False
    # the image branch: "linear" (a linear patch embedding and head) or "unet" (mmfusion.diffusion.unet: a conv
    # encoder from S px down to the patch grid and a conv decoder back with skips, conv_channels at full size,
    # doubled at each halving; image_latent pixels, patch a power of 2 >= 2)
    image_net: Literal["linear", "unet"] = "linear"
    conv_channels: int = Field(16, ge=1)
    # what the text head predicts: "x0" (the clean latent; its loss is the latent's MSE) or "eps" (the noise)
    text_target: Literal["x0", "eps"] = "x0"
    image_target: Literal["eps", "x0"] = "eps"  # the same choice for the image head
    # > 0 (image_target x0 only): weight the image loss per sample by max(1, min(SNR(t), image_snr_weight))
    image_snr_weight: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    align_weight: float = Field(0.0, ge=0)
    align_dim: int = Field(64, ge=2)
    align_temperature: float = Field(0.1, gt=0)
    adv_weight: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> DiffusionModelConfig:
        if self.image_latent == "autoencoder":
            if self.image_size % 8:
                raise ValueError(
                    f"image_latent autoencoder needs image_size divisible by 8; got {self.image_size}"
                )
            if self.ae_latent_dim % self.ae_tokens:
                raise ValueError(
                    f"ae_latent_dim = {self.ae_latent_dim} is not divisible by ae_tokens = {self.ae_tokens}"
                )
        if self.image_net == "unet":
            if self.image_latent != "pixels":
                raise ValueError(f"image_net unet needs image_latent pixels; got {self.image_latent}")
            if self.patch < 2 or self.patch & (self.patch - 1):
                raise ValueError(f"image_net unet needs patch a power of 2 >= 2; got {self.patch}")
        if self.image_latent == "pixels" and self.image_size % self.patch:
            raise ValueError(f"image_size = {self.image_size} is not divisible by patch = {self.patch}")
        if self.width % self.heads:
            raise ValueError(f"width = {self.width} is not divisible by heads = {self.heads}")
        if self.cond_prob + self.uncond_prob > 1:
            raise ValueError(f"cond_prob + uncond_prob = {self.cond_prob + self.uncond_prob}: must be <= 1")
        return self

    @property
    def image_tokens(self) -> int:
        """Image latent tokens per image."""
        if self.image_latent == "autoencoder":
            return self.ae_tokens
        return (self.image_size // self.patch) ** 2

    @property
    def image_token_dim(self) -> int:
        """Values per image latent token."""
        if self.image_latent == "autoencoder":
            return self.ae_latent_dim // self.ae_tokens
        return 3 * self.patch**2


__all__ = ["DiffusionModelConfig"]
