"""Image modality: decoding (any file Pillow reads), preprocessing (any PIL mode / size / array -> float tensor),
the ViT encoder and its SPEC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import Field
from torch import nn

from ..errors import DataError
from ..layers import Transformer, init_transformer_
from .base import EncoderConfigBase, MediaError, ModalitySpec, as_source

ImageLike = Any  # PIL.Image.Image | np.ndarray (H, W, 3|4|1 or H, W) uint8 | torch.Tensor (3, H, W) float


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Convert a PIL image (any mode: L, RGBA, P, I;16 ...) or an array to an (H, W, 3) uint8 array.

    RGBA / LA / palette-with-transparency images are composited on black so that transparent
    pixels do not leak arbitrary colour values.
    """
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, image)
        elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(image, dtype=np.float64)
            peak = arr.max() if arr.size and arr.max() > 0 else 1.0
            image = Image.fromarray((arr / peak * 255.0).astype(np.uint8))
        # np.asarray copies the pixels; convert() would copy them once more even when already RGB
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise DataError(
            f"image array has shape {arr.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        arr = (arr[:, :, :3].astype(np.float32) * alpha).round()
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise DataError("image array contains NaN or infinite values")
            scale = 255.0 if arr.max() <= 1.0 else 1.0
            arr = np.clip(arr * scale, 0, 255).round()
        arr = arr.astype(np.uint8)
    return arr


def preprocess_image(image: ImageLike, size: int) -> torch.Tensor:
    """One image -> float tensor (3, size, size) in [-1, 1].

    Accepts a PIL image of any mode and size, an (H, W[, C]) uint8/float array, or a float tensor
    (3, H, W) already in [-1, 1] (only resized). Resizing uses bilinear filtering with antialiasing.
    """
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise DataError(f"image tensor has shape {tuple(image.shape)}; expected (3, H, W)")
        t = image.float()
        if t.shape[1:] != (size, size):
            t = torch.nn.functional.interpolate(
                t[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )[0]
        return t
    arr = to_rgb_array(image)
    if arr.shape[:2] != (size, size):
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def preprocess_images(images: Sequence[ImageLike] | torch.Tensor, size: int) -> torch.Tensor:
    """A batch of images (list of image-likes, or a (B, 3, H, W) tensor) -> (B, 3, size, size) in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"image batch has shape {tuple(images.shape)}; expected (B, 3, H, W)")
        t = images.float()
        if t.shape[2:] != (size, size):
            t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True)
        return t
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    return torch.stack([preprocess_image(im, size) for im in images])


def to_uint8_image(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of preprocess_image: (3, H, W) in [-1, 1] -> (H, W, 3) uint8 (for plots)."""
    return (
        ((tensor.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    )


def conv_stem(width: int, patch_size: int, in_channels: int = 3) -> nn.Sequential:
    """Convolutional stem in place of the patchify conv (Xiao et al. 2021, "Early convolutions help
    transformers see better"): log2(patch) 3x3 stride-2 convs + GELU, channels doubling up to `width`,
    then a 1x1 conv. Same token grid as patch embedding; sees shapes that straddle patch borders.
    """
    steps = patch_size.bit_length() - 1
    if 2**steps != patch_size:
        raise ValueError(f"the conv stem needs a power-of-two patch_size, got {patch_size}")
    layers: list[nn.Module] = []
    c_in = in_channels
    for i in range(steps):
        c_out = max(16, width // 2 ** (steps - 1 - i))
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, width, 1, bias=False))
    return nn.Sequential(*layers)


def patch_embedding(width: int, patch_size: int, stem: str = "patch", in_channels: int = 3) -> nn.Module:
    """(B, C, H, W) -> (B, width, H/patch, W/patch): one strided conv ("patch", ViT) or `conv_stem` ("conv")."""
    if stem == "conv":
        return conv_stem(width, patch_size, in_channels)
    if stem != "patch":
        raise ValueError(f"unknown stem {stem!r}; expected 'patch' or 'conv'")
    return nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size, bias=False)


class ImageEncoder(nn.Module):
    """Vision Transformer: patch embedding + [CLS] + learned positions, pooled at [CLS] (as CLIP's ViT).

    images (batch, 3, H, W) in [-1, 1] -> (batch, embed_dim) unnormalised embedding.
    mean / std (per RGB channel, on the [0, 1] scale): when given, the encoder maps its [-1, 1] input to
    (x01 - mean) / std first, the input CLIP checkpoints were trained on (CLIPImageProcessor's image_mean /
    image_std); None keeps the [-1, 1] input as is. act: the MLP activation (mmfusion.layers.ACTIVATIONS).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        embed_dim: int,
        mlp_ratio: float = 4.0,
        stem: str = "patch",
        act: str = "gelu",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size = image_size
        self.normalise = mean is not None
        if self.normalise:
            # [-1, 1] -> (x01 - mean) / std as one affine map x * scale + shift (buffers, not weights)
            m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std if std is not None else (1.0,) * 3)
            s = s.view(3, 1, 1)
            self.register_buffer("input_scale", 0.5 / s, persistent=False)
            self.register_buffer("input_shift", (0.5 - m) / s, persistent=False)
        self.patch_embed = patch_embedding(width, patch_size, stem)
        n_patches = (image_size // patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(n_patches + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, depth, heads, mlp_ratio, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        init_transformer_(self.transformer, width, depth)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images (batch, 3, H, W) -> tokens (batch, 1 + patches, width), [CLS] first."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise DataError(
                f"images are {tuple(images.shape[-2:])}; the encoder expects {self.image_size}x{self.image_size} "
                "(use preprocess_images)"
            )
        if self.normalise:
            images = images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (batch, patches, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.transformer(self.ln_pre(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln_post(self.forward_tokens(images)[:, 0]))


class ImageEncoderConfig(EncoderConfigBase):
    """ImageEncoder (ViT)."""

    kind: Literal["image"] = "image"
    image_size: int = Field(32, ge=8)
    patch_size: int = Field(4, ge=1)
    stem: Literal["patch", "conv"] = "patch"


def build_image_encoder(cfg: ImageEncoderConfig) -> ImageEncoder:
    w = cfg.width
    return ImageEncoder(cfg.image_size, cfg.patch_size, w, cfg.depth, cfg.heads, w, cfg.mlp_ratio, cfg.stem)


def decode_image(src: Any) -> np.ndarray:
    """A path, file object or bytes -> (H, W, 3) uint8, fully decoded, EXIF orientation applied (any mode:
    grayscale, RGBA, palette, 16-bit); MediaError("corrupt_image") when Pillow cannot read it."""
    try:
        with Image.open(as_source(src)) as img:
            img.load()
            # in place: without an orientation tag nothing happens (the default returns a full copy)
            ImageOps.exif_transpose(img, in_place=True)
            return to_rgb_array(img)
    except Exception as e:
        raise MediaError("corrupt_image", f"cannot decode image: {e}") from e


def image_placeholder(cfg: Any) -> np.ndarray:
    return np.zeros((cfg.image_size, cfg.image_size, 3), dtype=np.uint8)


def _preprocess(images: Sequence[ImageLike], cfg: Any, tokenizer: Any = None) -> torch.Tensor:
    return preprocess_images(list(images), cfg.image_size)


IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")

SPEC = ModalitySpec(
    name="image",
    encoder_config=ImageEncoderConfig,
    build_encoder=build_image_encoder,
    preprocess=_preprocess,
    placeholder=image_placeholder,
    decode=decode_image,
    extensions=IMAGE_EXTS,
)
