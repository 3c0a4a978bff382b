"""Video modality: decoding (.npy arrays, folders of frames), clip preprocessing (frame sampling + per-frame image
preprocessing), the video encoder and its SPEC."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator
from torch import nn

from ..errors import DataError
from ..layers import Transformer, init_transformer_
from .base import EncoderConfigBase, MediaError, ModalitySpec, as_source
from .image import decode_image, patch_embedding, preprocess_image

VideoLike = (
    Any  # np.ndarray (T, H, W, 3) uint8 | list of PIL images / arrays | torch.Tensor (T, 3, H, W) in [-1, 1]
)


def sample_frame_indices(num_input: int, num_frames: int) -> list[int]:
    """Indices of `num_frames` frames spread uniformly over `num_input`: the centre of each of `num_frames`
    equal segments (TSN-style), floor((i + 0.5) * num_input / num_frames). Repeats frames when upsampling:
    8 -> 4 gives [1, 3, 5, 7]; 3 -> 6 gives [0, 0, 1, 1, 2, 2]."""
    if num_input < 1 or num_frames < 1:
        raise DataError(f"cannot sample {num_frames} frames from a clip of {num_input}")
    return [int((2 * i + 1) * num_input // (2 * num_frames)) for i in range(num_frames)]


def preprocess_video(frames: VideoLike, num_frames: int, size: int) -> torch.Tensor:
    """One clip -> float tensor (num_frames, 3, size, size) in [-1, 1].

    Frames are picked by sample_frame_indices, then each goes through image.preprocess_image.
    """
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise DataError(f"video tensor has shape {tuple(frames.shape)}; expected (T, 3, H, W)")
    elif isinstance(frames, np.ndarray):
        if frames.ndim not in (3, 4):
            raise DataError(f"video array has shape {frames.shape}; expected (T, H, W, 3) or (T, H, W)")
    elif not isinstance(frames, Sequence) or isinstance(frames, (str, Image.Image)):
        raise DataError(
            f"video is {type(frames).__name__}; expected a (T, H, W, 3) array or a list of frames"
        )
    idx = sample_frame_indices(len(frames), num_frames)
    return torch.stack([preprocess_image(frames[i], size) for i in idx])


def preprocess_videos(videos: Sequence[VideoLike], num_frames: int, size: int) -> torch.Tensor:
    """A batch of clips -> (B, num_frames, 3, size, size) in [-1, 1]."""
    return torch.stack([preprocess_video(v, num_frames, size) for v in videos])


class VideoEncoder(nn.Module):
    """ViViT-style encoder with joint space-time attention (Arnab et al. 2021, model 1), pooled at [CLS].

    videos (batch, frames, 3, H, W) in [-1, 1] -> (batch, embed_dim) unnormalised embedding. Frames are grouped
    into tubelets of `tubelet` consecutive frames (ViViT's tubelet embedding; 1 = per-frame patches): each tubelet
    is embedded like one ImageEncoder image with 3 * tubelet input channels (patchify conv = a Conv3d of temporal
    size `tubelet`, or the conv stem), so a single token sees the change between frames. A learned spatial
    position (per patch) plus a learned temporal position (per tubelet) is added and one Transformer attends over
    all tubelets x patches. Joint attention is the simplest and lets any patch compare positions across time; it
    costs O((frames / tubelet * patches)^2), fine for the short, small clips here.
    With per-frame 8 px patches a tiny encoder stayed at chance on motion direction after 600 steps; tubelets of
    2 frames learn it (see docs/fusion.md).
    """

    def __init__(
        self,
        num_frames: int,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        embed_dim: int,
        mlp_ratio: float = 4.0,
        stem: str = "patch",
        tubelet: int = 1,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if tubelet < 1 or num_frames % tubelet:
            raise ValueError(f"num_frames {num_frames} is not divisible by tubelet {tubelet}")
        self.num_frames, self.image_size, self.tubelet = num_frames, image_size, tubelet
        self.width = width
        self.patch_embed = patch_embedding(width, patch_size, stem, in_channels=3 * tubelet)
        n_patches = (image_size // patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.spatial_embedding = nn.Parameter(torch.randn(n_patches, width) * width**-0.5)
        self.temporal_embedding = nn.Parameter(torch.randn(num_frames // tubelet, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, depth, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        init_transformer_(self.transformer, width, depth)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def forward_tokens(self, videos: torch.Tensor) -> torch.Tensor:
        """videos (batch, frames, 3, H, W) -> tokens (batch, 1 + frames / tubelet * patches, width), [CLS] first,
        then tubelet-major (all patches of tubelet 0, then tubelet 1, ...)."""
        expected = (self.num_frames, 3, self.image_size, self.image_size)
        if videos.ndim != 5 or tuple(videos.shape[1:]) != expected:
            raise DataError(
                f"videos have shape {tuple(videos.shape)}; the encoder expects (batch, *{expected}) "
                "(use preprocess_videos)"
            )
        b = videos.shape[0]
        t = self.num_frames // self.tubelet
        groups = videos.reshape(b * t, 3 * self.tubelet, self.image_size, self.image_size)
        x = self.patch_embed(groups).flatten(2).transpose(1, 2)  # (batch * tubelets, patches, width)
        x = x + self.spatial_embedding.to(x.dtype)
        x = x.view(b, t, -1, x.shape[-1]) + self.temporal_embedding.to(x.dtype)[:, None]
        x = x.flatten(1, 2)  # (batch, tubelets * patches, width)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)
        return self.transformer(self.ln_pre(torch.cat([cls, x], dim=1)))

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln_post(self.forward_tokens(videos)[:, 0]))


class VideoEncoderConfig(EncoderConfigBase):
    """VideoEncoder (joint space-time ViT over tubelets of `tubelet` frames x patch_size^2 px).

    Defaults (4 px patches, 2-frame tubelets): a tiny encoder learns the motion direction of the synthetic clips in
    a few hundred steps; with per-frame 8 px patches it stayed at chance after 600 (docs/fusion.md)."""

    kind: Literal["video"] = "video"
    num_frames: int = Field(4, ge=1)
    image_size: int = Field(32, ge=8)
    patch_size: int = Field(4, ge=1)
    stem: Literal["patch", "conv"] = "patch"
    tubelet: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _tubelet_divides_frames(self) -> VideoEncoderConfig:
        if self.num_frames % self.tubelet:
            raise ValueError(f"tubelet {self.tubelet} must divide num_frames {self.num_frames}")
        return self


def build_video_encoder(cfg: VideoEncoderConfig) -> VideoEncoder:
    w = cfg.width
    return VideoEncoder(
        cfg.num_frames,
        cfg.image_size,
        cfg.patch_size,
        w,
        cfg.depth,
        cfg.heads,
        w,
        cfg.mlp_ratio,
        cfg.stem,
        cfg.tubelet,
    )


def check_clip(arr: Any) -> np.ndarray:
    """`arr` if it is a (T, H, W, 3) uint8 array with T > 0, else MediaError("corrupt_video")."""
    if not (
        isinstance(arr, np.ndarray)
        and arr.dtype == np.uint8
        and arr.ndim == 4
        and arr.shape[-1] == 3
        and arr.shape[0] > 0
    ):
        got = f"shape {arr.shape}, dtype {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise MediaError("corrupt_video", f"expected a (T, H, W, 3) uint8 array, got {got}")
    return arr


def decode_video(src: Any) -> np.ndarray:
    """A .npy (T, H, W, 3) uint8 array (path, file object or bytes; never unpickled) or a folder of frame images
    (sorted by name) -> (T, H, W, 3) uint8; MediaError("corrupt_video") otherwise."""
    if isinstance(src, (str, Path)) and Path(src).is_dir():
        return _decode_frames(Path(src))
    try:
        arr = np.load(as_source(src), allow_pickle=False)
    except Exception as e:
        raise MediaError("corrupt_video", f"cannot load array: {e}") from e
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
    return check_clip(arr)


def _decode_frames(folder: Path) -> np.ndarray:
    exts = Image.registered_extensions()
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts and p.name[0] != "."
    )
    if not files:
        raise MediaError("corrupt_video", f"folder {folder.name} has no frame images")
    frames = []
    for p in files:
        try:
            frames.append(decode_image(p))
        except MediaError as e:
            raise MediaError("corrupt_video", f"frame {folder.name}/{p.name}: {e.problem}") from None
    if len({f.shape for f in frames}) > 1:
        raise MediaError("corrupt_video", f"frames in {folder.name} differ in size")
    return np.stack(frames)


def video_placeholder(cfg: Any) -> np.ndarray:
    return np.zeros((cfg.num_frames, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)


def _preprocess(videos: Sequence[VideoLike], cfg: Any, tokenizer: Any = None) -> torch.Tensor:
    return preprocess_videos(list(videos), cfg.num_frames, cfg.image_size)


SPEC = ModalitySpec(
    name="video",
    encoder_config=VideoEncoderConfig,
    build_encoder=build_video_encoder,
    preprocess=_preprocess,
    placeholder=video_placeholder,
    decode=decode_video,
    extensions=("npy",),
)
