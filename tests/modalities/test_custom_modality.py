"""Adding a modality is one file and one table entry (docs/modalities.md): a toy depth-map modality, defined in
this file, registered, read from a user's JSONL (.npy files), collated with a presence mask, and trained in a
cross-attention fusion model through the same run code as the built-in modalities."""

import json
from typing import Any, Literal

import numpy as np
import pytest
import torch
from pydantic import Field
from torch import nn

from mmfusion.layers import Transformer
from mmfusion.modalities import MODALITIES, register_modality
from mmfusion.modalities.base import EncoderConfigBase, MediaError, ModalitySpec, as_source


# ---- the "one file": a depth map (H, W) float32 ------------------------------------------------------------
class DepthEncoderConfig(EncoderConfigBase):
    kind: Literal["depth"] = "depth"
    image_size: int = Field(16, ge=4)
    patch_size: int = Field(4, ge=1)


class DepthEncoder(nn.Module):
    """Patchify conv over one channel + positions + a Transformer: (B, 1, S, S) -> (B, patches, width)."""

    def __init__(self, cfg: DepthEncoderConfig):
        super().__init__()
        self.width = cfg.width
        self.patch = nn.Conv2d(1, cfg.width, cfg.patch_size, cfg.patch_size)
        self.pos = nn.Parameter(torch.randn((cfg.image_size // cfg.patch_size) ** 2, cfg.width) * 0.02)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.patch(x).flatten(2).transpose(1, 2) + self.pos)


def decode_depth(src: Any) -> np.ndarray:
    try:
        arr = np.load(as_source(src), allow_pickle=False)
    except Exception as e:
        raise MediaError("corrupt_depth", f"cannot load depth map: {e}") from e
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise MediaError("corrupt_depth", f"expected an (H, W) float array, got {arr.shape} {arr.dtype}")
    return arr.astype(np.float32)


def preprocess_depth(maps, cfg, tokenizer=None) -> torch.Tensor:
    """(H, W) maps of any size -> (B, 1, S, S): each resized, then stacked."""
    size = (cfg.image_size, cfg.image_size)
    rows = [torch.from_numpy(np.ascontiguousarray(m))[None, None] for m in maps]
    return torch.cat([nn.functional.interpolate(r, size=size, mode="bilinear") for r in rows])


DEPTH = ModalitySpec(
    name="depth",
    encoder_config=DepthEncoderConfig,
    build_encoder=DepthEncoder,
    preprocess=preprocess_depth,
    placeholder=lambda cfg: np.zeros((cfg.image_size, cfg.image_size), np.float32),
    decode=decode_depth,
    extensions=("depth.npy",),
)
# -------------------------------------------------------------------------------------------------------------


@pytest.fixture
def depth_registered():
    register_modality(DEPTH)
    yield DEPTH
    MODALITIES.pop("depth", None)


def write_depth_corpus(root, split: str, n: int, seed: int):
    """Depth ramps: label "left" when the near side is on the left, else "right"; every 4th sample has no
    depth map (a caption only), one file is corrupt."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        side = ("left", "right")[int(rng.integers(2))]
        row = {"id": f"{split}-{i}", "text": "a depth map", "label": side}
        if i % 4:
            ramp = (
                np.linspace(0.0, 1.0, 24, dtype=np.float32)
                if side == "left"
                else np.linspace(1.0, 0.0, 24, dtype=np.float32)
            )
            depth = np.tile(ramp, (24, 1)) + rng.normal(0, 0.05, (24, 24)).astype(np.float32)
            np.save(root / split / f"{i}.npy", depth)
            row["depth"] = f"{split}/{i}.npy"
        rows.append(row)
    (root / split / "bad.npy").write_bytes(b"not an array")
    rows.append({"id": f"{split}-bad", "depth": f"{split}/bad.npy", "label": "left"})
    path = root / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_register_refuses_a_second_spec_of_the_same_name(depth_registered):
    other = ModalitySpec("depth", DepthEncoderConfig, DepthEncoder, preprocess_depth, lambda c: None)
    with pytest.raises(ValueError, match="already registered"):
        register_modality(other)
    with pytest.raises(ValueError, match="already registered"):
        register_modality(
            ModalitySpec("image", DepthEncoderConfig, DepthEncoder, preprocess_depth, lambda c: None)
        )


def test_a_registered_modality_trains_a_fusion_model_from_a_users_files(depth_registered, tmp_path):
    from mmfusion.config import config_from_dict
    from mmfusion.data.sources import JsonlDataset
    from mmfusion.evaluate import evaluate_fusion
    from mmfusion.models.multimodal import MultiModalModel
    from mmfusion.run import train

    paths = {
        s: write_depth_corpus(tmp_path, s, n, seed)
        for s, n, seed in (("train", 128, 0), ("val", 16, 1), ("test", 64, 2))
    }
    source = JsonlDataset(paths["train"], require=False)
    assert source[1]["depth"].shape == (24, 24) and "depth" not in source[0]  # sample 0: no depth map
    assert source[len(source) - 1].reason == "corrupt_depth"
    cfg = config_from_dict(
        {
            "name": "depth",
            "out_dir": str(tmp_path / "runs"),
            "data": {"source": "jsonl", **{k: str(v) for k, v in paths.items()}},
            "model": {"kind": "fusion", "encoders": {"depth": {"kind": "depth"}, "text": "tiny"}, "dim": 32},
            "train": {
                "steps": 40,
                "batch_size": 32,
                "lr": 3e-3,
                "warmup_steps": 4,
                "precision": "fp32",
                "device": "cpu",
            }
            | {"threads": 1, "progress": False, "log_every": 10, "checkpoint_every": 40},
        }
    )
    train(cfg, log=lambda m: None)
    model = MultiModalModel.from_pretrained(tmp_path / "runs" / "depth" / "model")
    assert model.config.encoders["depth"].kind == "depth" and model.config.classes == ["left", "right"]
    metrics = evaluate_fusion(cfg.model_copy(update={"model": model.config}), model, "test")
    # the depth map decides: rows without one (every 4th) are at chance, so about 3/4 + 1/8 when learned;
    # the text alone says nothing
    assert metrics["accuracy_all"] >= 0.8, metrics
    assert metrics["accuracy_without_depth"] <= 0.65, metrics
    assert metrics["skipped"] == {"corrupt_depth": 1}
