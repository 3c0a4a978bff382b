"""VQ-VAE tokenizer for images and log-mel spectrograms: (B, C, H, W) in [-1, 1] -> (H/4) x (W/4) discrete
tokens -> (B, C, H, W), its typed config (VQVAEConfig) and its model folder (config.json + model.safetensors).

The quantizers live in mmfusion.models.quantizers (VectorQuantizer, FSQ), .residual_vq (ResidualVQ) and
.vq_library (the vector-quantize-pytorch adapters, backend "vqtorch"). Audio clips become the VQ-VAE's input
through mmfusion.modalities.audio.AudioFrontEnd.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator, model_validator
from torch import nn

from ..errors import ConfigError, DataError
from ..modalities.audio import AudioFrontEnd  # re-exported: tests/serve import it from here
from ..schema import Section
from .persistence import load_weights, read_config, save_folder
from .quantizers import BACKENDS, DEAD_CODE_SAMPLING, FSQ, VectorQuantizer
from .residual_vq import COMMITMENT_PER_LEVEL, ResidualVQ
from .vq_library import LibFSQ, LibVectorQuantizer

MODEL_TYPE = "vqvae"
QUANTIZERS = ("vq", "rvq", "fsq")
# VQVAE arguments added after its first release, with their defaults (see VQVAEConfig.to_dict)
LATER_DEFAULTS = {
    "backend": "mmfusion",
    "dead_code_sampling": "uniform",
    "rotation_trick": False,
    "fsq_noise_dropout": 0.0,
    "quantize_dropout": False,
    "quantize_dropout_cutoff": 1,
    "commitment_per_level": "sum",
}
RVQ_OPTIONS = ("quantize_dropout", "quantize_dropout_cutoff", "commitment_per_level")
CHOICES = {
    "quantizer": QUANTIZERS,
    "backend": BACKENDS,
    "dead_code_sampling": DEAD_CODE_SAMPLING,
    "commitment_per_level": COMMITMENT_PER_LEVEL,
}


class VQVAEConfig(Section):
    """Everything VQVAE's constructor takes, typed and validated; maps 1:1 onto its arguments
    (`VQVAE.from_config(cfg)` builds the same module as `VQVAE(**dict(cfg))`). See VQVAE for their meaning.

    `to_dict()` is the "model" section of a tokenizer's config.json: every key of the first release, and the
    keys added later (LATER_DEFAULTS) only where they differ from their defaults, so that a default model's
    config.json stays as it was. `from_dict` reads one back; keys a folder predates take their defaults.
    """

    image_size: int = 32
    channels: int = Field(64, ge=1)
    codebook_size: int = Field(256, ge=1)
    quantizer: str = "vq"
    code_dim: int = Field(32, ge=1)
    num_res: int = Field(1, ge=0)
    rvq_levels: int = Field(4, ge=1)
    fsq_levels: list[int] = [8, 6, 5]
    decay: float = Field(0.99, ge=0.0, lt=1.0)
    commitment: float = Field(0.25, ge=0.0)
    kmeans_init: bool = True
    dead_code_threshold: float = Field(1.0, ge=0.0)
    dead_code_patience: int | None = Field(None, ge=1)
    in_channels: int = Field(3, ge=1)
    input_shape: list[int] | None = None
    backend: str = "mmfusion"
    dead_code_sampling: str = "uniform"
    rotation_trick: bool = False
    fsq_noise_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    quantize_dropout: bool = False
    quantize_dropout_cutoff: int = Field(1, ge=1)
    commitment_per_level: str = "sum"

    @field_validator(*CHOICES)
    @classmethod
    def _one_of(cls, v: str, info: Any) -> str:
        allowed = CHOICES[info.field_name]
        if v not in allowed:
            raise ValueError(f"{info.field_name} must be one of {allowed}; got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> VQVAEConfig:
        lib = self.backend == "vqtorch"
        if not lib and (self.rotation_trick or self.fsq_noise_dropout):
            raise ValueError("rotation_trick and fsq_noise_dropout need backend='vqtorch'")
        if lib and (self.dead_code_patience is not None or self.dead_code_sampling != "uniform"):
            raise ValueError("dead_code_patience and dead_code_sampling need backend='mmfusion'")
        if self.quantizer != "rvq" and any(getattr(self, k) != LATER_DEFAULTS[k] for k in RVQ_OPTIONS):
            raise ValueError(
                f"quantize_dropout, quantize_dropout_cutoff and commitment_per_level need quantizer='rvq'; "
                f"got quantizer={self.quantizer!r}"
            )
        shape = self.shape
        if len(shape) != 2 or min(shape) < 4 or shape[0] % 4 or shape[1] % 4:
            name = "image_size" if self.input_shape is None else "input_shape"
            raise ValueError(f"{name} must give (H, W) both divisible by 4 and >= 4; got {shape}")
        if self.quantizer == "rvq" and self.quantize_dropout_cutoff > self.rvq_levels:
            raise ValueError(
                f"quantize_dropout_cutoff must be in [1, rvq_levels={self.rvq_levels}]; "
                f"got {self.quantize_dropout_cutoff}"
            )
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        """(H, W) of the inputs: input_shape, or (image_size, image_size) when it is None."""
        return (self.image_size, self.image_size) if self.input_shape is None else tuple(self.input_shape)

    def to_dict(self) -> dict[str, Any]:
        """The "model" section of config.json (later keys only where they differ from LATER_DEFAULTS)."""
        out = self.model_dump(mode="json")
        return {k: v for k, v in out.items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> VQVAEConfig:
        """Validated config from keyword settings or a config.json "model" section; ConfigError names the key
        and says what is allowed."""
        try:
            return cls.model_validate(dict(settings))
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            where = "" if not key or msg.startswith(key) else f"{key} = {err.get('input')!r}: "
            raise ConfigError(f"VQVAE config: {where}{msg}") from None


def build_quantizer(cfg: VQVAEConfig) -> nn.Module:
    """The quantizer a VQVAEConfig describes, over vectors of size code_dim (len(fsq_levels) for "fsq")."""
    lib = cfg.backend == "vqtorch"
    if cfg.quantizer == "fsq":
        return LibFSQ(cfg.fsq_levels, cfg.fsq_noise_dropout) if lib else FSQ(cfg.fsq_levels)
    vq_kw: dict[str, Any] = dict(
        decay=cfg.decay,
        commitment=cfg.commitment,
        kmeans_init=cfg.kmeans_init,
        dead_code_threshold=cfg.dead_code_threshold,
    )
    if lib:
        vq_kw.update(rotation_trick=cfg.rotation_trick)
    else:
        vq_kw.update(dead_code_patience=cfg.dead_code_patience, dead_code_sampling=cfg.dead_code_sampling)
    if cfg.quantizer == "vq":
        return (LibVectorQuantizer if lib else VectorQuantizer)(cfg.code_dim, cfg.codebook_size, **vq_kw)
    rvq_kw = {k: getattr(cfg, k) for k in RVQ_OPTIONS}
    return ResidualVQ(cfg.code_dim, cfg.codebook_size, cfg.rvq_levels, backend=cfg.backend, **rvq_kw, **vq_kw)


class _ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@dataclass
class VQVAEOutput:
    recon: torch.Tensor  # (B, C, H, W) in roughly [-1, 1]
    indices: torch.Tensor  # (B, h, w) or (B, h, w, levels) for rvq
    loss: torch.Tensor  # recon_loss + commit_loss
    recon_loss: torch.Tensor
    commit_loss: torch.Tensor
    info: dict[str, Any]


def check_image_range(images: torch.Tensor, channels: int = 3) -> None:
    """Raise DataError unless `images` is a float (B, channels, H, W) batch that looks like [-1, 1] values."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != channels:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"VQVAE expects a (B, {channels}, H, W) float tensor in [-1, 1]; got {shape}")
    if not images.is_floating_point():
        raise DataError(
            f"VQVAE expects float images in [-1, 1]; got dtype {images.dtype} "
            "(use mmfusion.modalities.image.preprocess_images to convert [0, 255] pixels)"
        )
    hi, lo = images.max().item(), images.min().item()
    if hi > 1.5 or lo < -1.5:
        raise DataError(
            f"VQVAE expects images in [-1, 1]; got values in [{lo:.3g}, {hi:.3g}], which looks like "
            "[0, 255] pixels (use mmfusion.modalities.image.preprocess_images; for audio, AudioFrontEnd)"
        )


class VQVAE(nn.Module):
    """Small conv VQ-VAE: (B, C, H, W) in [-1, 1] -> (H/4) x (W/4) tokens -> (B, C, H, W).

    C = `in_channels` (3 for RGB images, 1 for AudioFrontEnd spectrograms); (H, W) = `input_shape`, or
    (image_size, image_size) when it is None. Configs saved before these keys existed load as C = 3, square.

    Encoder: conv3x3 -> 2 stride-2 conv4x4 (S -> S/4) -> `num_res` residual blocks -> 1x1 to the quantizer
    dim (code_dim, or len(fsq_levels) for "fsq"); the decoder mirrors it with transposed convs.
    quantizer: "vq" (VectorQuantizer), "rvq" (ResidualVQ with rvq_levels), "fsq" (FSQ with fsq_levels;
    codebook_size is then prod(fsq_levels)).
    backend: "mmfusion" (mmfusion.models.quantizers) or "vqtorch" (the vector-quantize-pytorch library's, see
    vq_library.LibVectorQuantizer / LibFSQ; `rotation_trick` and `fsq_noise_dropout` are its options).
    dead_code_sampling ("mmfusion" only): how dead codes are re-seeded (see VectorQuantizer).
    quantize_dropout, quantize_dropout_cutoff, commitment_per_level ("rvq" only, either backend): see
    ResidualVQ.
    The arguments are VQVAEConfig's fields (validated there); `cfg` holds them typed, `config` as saved.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 64,
        codebook_size: int = 256,
        quantizer: str = "vq",
        code_dim: int = 32,
        num_res: int = 1,
        rvq_levels: int = 4,
        fsq_levels: Sequence[int] = (8, 6, 5),
        decay: float = 0.99,
        commitment: float = 0.25,
        kmeans_init: bool = True,
        dead_code_threshold: float = 1.0,
        dead_code_patience: int | None = None,
        in_channels: int = 3,
        input_shape: Sequence[int] | None = None,
        backend: str = "mmfusion",
        dead_code_sampling: str = "uniform",
        rotation_trick: bool = False,
        fsq_noise_dropout: float = 0.0,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff: int = 1,
        commitment_per_level: str = "sum",
    ):
        super().__init__()
        cfg = VQVAEConfig.from_dict(
            dict(
                image_size=image_size,
                channels=channels,
                codebook_size=codebook_size,
                quantizer=quantizer,
                code_dim=code_dim,
                num_res=num_res,
                rvq_levels=rvq_levels,
                fsq_levels=fsq_levels,
                decay=decay,
                commitment=commitment,
                kmeans_init=kmeans_init,
                dead_code_threshold=dead_code_threshold,
                dead_code_patience=dead_code_patience,
                in_channels=in_channels,
                input_shape=input_shape,
                backend=backend,
                dead_code_sampling=dead_code_sampling,
                rotation_trick=rotation_trick,
                fsq_noise_dropout=fsq_noise_dropout,
                quantize_dropout=quantize_dropout,
                quantize_dropout_cutoff=quantize_dropout_cutoff,
                commitment_per_level=commitment_per_level,
            )
        )
        self.cfg = cfg
        self.config = cfg.to_dict()  # what save_pretrained writes to config.json
        self.backend = cfg.backend
        self.image_size, self.quantizer_type = cfg.image_size, cfg.quantizer
        self.in_channels, self.input_shape = cfg.in_channels, cfg.shape
        self.grid_shape = (cfg.shape[0] // 4, cfg.shape[1] // 4)  # (h, w) token grid
        self.grid = self.grid_shape[0] if cfg.shape[0] == cfg.shape[1] else None  # square side (None if not)
        self.quantizer: nn.Module = build_quantizer(cfg)
        in_channels, channels, num_res = cfg.in_channels, cfg.channels, cfg.num_res
        qdim = self.quantizer.dim
        c, c2 = channels, 2 * channels
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, c2, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(c2, c2, 4, stride=2, padding=1),
            *[_ResBlock(c2) for _ in range(num_res)],
            nn.SiLU(),
            nn.Conv2d(c2, qdim, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(qdim, c2, 3, padding=1),
            *[_ResBlock(c2) for _ in range(num_res)],
            nn.SiLU(),
            nn.ConvTranspose2d(c2, c, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, in_channels, 3, padding=1),
        )

    @property
    def tokens_per_image(self) -> int:
        """Token positions per input, (H/4) * (W/4) (each holds rvq_levels indices for "rvq")."""
        return self.grid_shape[0] * self.grid_shape[1]

    @property
    def code_shape(self) -> tuple[int, ...]:
        """Shape of one input's indices: (h, w), or (h, w, rvq_levels) for "rvq"."""
        levels = (self.cfg.rvq_levels,) if self.quantizer_type == "rvq" else ()
        return (*self.grid_shape, *levels)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def _quantize(self, images: torch.Tensor, **kw: Any):
        check_image_range(images, self.in_channels)
        if tuple(images.shape[-2:]) != self.input_shape:
            h, w = self.input_shape
            raise DataError(f"VQVAE expects {h}x{w} (H x W) inputs; got {tuple(images.shape[-2:])}")
        z = self.encoder(images).permute(0, 2, 3, 1)  # (B, h, w, D)
        return self.quantizer(z, **kw)

    def _decode_codes(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q.permute(0, 3, 1, 2).contiguous())

    def forward(self, images: torch.Tensor, **quantizer_kw: Any) -> VQVAEOutput:
        z_q, indices, info = self._quantize(images, **quantizer_kw)
        recon = self._decode_codes(z_q)
        recon_loss = F.mse_loss(recon, images)
        commit = info.pop("commit_loss")
        return VQVAEOutput(recon, indices, recon_loss + commit, recon_loss, commit, info)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> indices (B, H/4, W/4) ((B, H/4, W/4, levels) for rvq).
        Uses the quantizer as it is (call .eval() first to leave the codebook untouched)."""
        return self._quantize(images)[1]

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices from `encode` -> images (B, C, H, W), clamped to [-1, 1]."""
        return self._decode_codes(self.quantizer.indices_to_codes(indices)).clamp(-1, 1)

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_folder(self, directory, MODEL_TYPE, self.config)

    @classmethod
    def from_config(cls, config: VQVAEConfig | Mapping[str, Any]) -> VQVAE:
        """The model a VQVAEConfig (or its dict) describes: the same module as the equal constructor call."""
        cfg = config if isinstance(config, VQVAEConfig) else VQVAEConfig.from_dict(config)
        return cls(**dict(cfg))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> VQVAE:
        """Rebuild from config.json and load model.safetensors; returned in eval mode."""
        return load_weights(cls.from_config(read_config(directory, MODEL_TYPE)), directory, map_location)


def psnr(recon: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images (or normalised spectrograms) in [-1, 1] (peak-to-peak 2, i.e. the usual PSNR on
    [0, 1] pixels)."""
    mse = F.mse_loss(recon.clamp(-1, 1).float(), target.float()).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


__all__ = [
    "AudioFrontEnd",
    "LATER_DEFAULTS",
    "MODEL_TYPE",
    "QUANTIZERS",
    "VQVAE",
    "VQVAEConfig",
    "VQVAEOutput",
    "build_quantizer",
    "check_image_range",
    "psnr",
]
