"""Model folders: config.json + model.safetensors (+ tokenizer.json). Only JSON and safetensors are read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError


def save_folder(
    model: nn.Module,
    directory: str | Path,
    model_type: str,
    config: dict[str, Any],
    tokenizer=None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write `model`'s weights, its config under `model_type`, and the tokenizer (if any) into `directory`;
    `provenance` (tower -> where its weights came from, mmfusion.models.provenance) goes into config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"model_type": model_type, "model": config}
    if provenance is not None:
        meta["provenance"] = provenance
    (directory / "config.json").write_text(json.dumps(meta, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def read_config(directory: str | Path, model_type: str) -> dict[str, Any]:
    """The "model" section of `directory`/config.json, after checking the folder holds a `model_type` model."""
    cfg_path = Path(directory) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} not found: not a saved mmfusion model folder")
    meta = json.loads(cfg_path.read_text())
    if meta.get("model_type") != model_type:
        raise CheckpointError(
            f"{cfg_path}: model_type is {meta.get('model_type')!r}; expected {model_type!r}"
        )
    return meta["model"]


def load_weights(
    model: nn.Module, directory: str | Path, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load `directory`/model.safetensors into `model` (every key must match); returns it in eval mode."""
    weights = Path(directory) / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found")
    missing, unexpected = model.load_state_dict(
        load_file(str(weights), device=str(map_location)), strict=False
    )
    if missing or unexpected:
        raise CheckpointError(f"{weights}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model.to(map_location).eval()
